# Sourced by the GPU scripts: repository root, GPU_CACHE/OUT_DIR, wheels the image lacks, PYTHONPATH, PYTHON.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
GPU_CACHE=${GPU_CACHE:-.cache/gpu}
OUT_DIR=${OUT:-$GPU_CACHE/out}
mkdir -p "$OUT_DIR"
if compgen -G "$GPU_CACHE/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_CACHE"/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
# The shared CIFAR-10 pack decoded once into $GPU_CACHE/work/cifar10.npz (a CPU dry run has no pack).
if [ -f "$GPU_CACHE/cifar10_jpeg.npz" ]; then
  "$PYTHON" bench/gpu/compare.py --pack "$GPU_CACHE/cifar10_jpeg.npz" --work "$GPU_CACHE/work" --decode-only
fi
