"""The GPU scripts' CPU dry runs (so a typo never costs GPU time), the profile's idle-time arithmetic and the table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from compare import summary_table  # noqa: E402
from profile_recipes import idle_share  # noqa: E402


def test_idle_share_counts_the_gaps_between_overlapping_spans():
    assert idle_share([]) is None
    assert idle_share([(0, 10)]) == 0.0
    assert idle_share([(0, 4), (2, 5), (8, 10)]) == pytest.approx(0.3)  # busy 0-5 and 8-10 of 10
    assert idle_share([(6, 10), (0, 2), (1, 3)]) == pytest.approx(0.3)  # unsorted: busy 0-3 and 6-10


def test_the_comparison_table_gives_each_time_as_a_multiple_of_airbench94s():
    rows = {"effcifar --recipe airbench": [(0.90, 2.9), (0.91, 3.1)], "airbench94 (airbench==0.1.8)": [(0.90, 2.5)]}
    lines = summary_table("NVIDIA H100", rows).splitlines()
    assert lines[-2].endswith("| 3.00 | 1.20x |") and lines[-1].endswith("| 2.50 | 1.00x |")
    assert summary_table("cpu", {"ours": [(0.5, 1.0)]}).endswith("| 1.00 | n/a |")  # no reference run: no ratio


@pytest.mark.slow
def test_profile_dry_run_on_cpu_writes_every_table(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/gpu/profile_recipes.py", "--device", "cpu", "--tiny", "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "airbench94: not profiled" in result.stdout
    regions = json.loads((tmp_path / "regions.json").read_text())
    ours = regions["ours"]
    assert regions["device"] == "cpu" and ours["steps"] >= 1 and len(ours["epochs_s"]) == 1
    assert ours["cold_timed_s"] > 0 and ours["whitening_s"] > 0 and ours["tta_s"] > 0 and ours["epochs_s"][0] > 0
    assert ours["gpu_idle_share"] is None
    assert "aten::conv2d" in (tmp_path / "ops_ours.txt").read_text()
    assert (tmp_path / "summary.md").read_text().splitlines()[2].startswith("| ours | ")


@pytest.mark.slow
def test_gpu_pipeline_dry_run_on_cpu_tabulates_every_stage(tmp_path):
    """bench/gpu/pipeline.sh with TINY=1: the gpu preset under the tests' tiny settings on synthetic data."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TINY": "1",
           "GPU_CACHE": str(tmp_path / "cache"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu/pipeline.sh"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "out" / "pipeline.md").read_text()
    for stage in ("baseline", "hpo", "hpo_best", "supernet", "search", "select", "retrain"):
        assert f"| {stage} | " in table and f"| {stage} | skipped" not in table, stage
    assert "--preset gpu" in table and "| nas | " in table
    settings = yaml.safe_load((tmp_path / "out" / "pipeline" / "pipeline.yaml").read_text())
    assert settings["supernet"]["space"] == "seed-widths"  # the preset's own value under the tiny settings
    assert (tmp_path / "out" / "pipeline" / "report" / "report.html").is_file()


def jpeg_pack(path: Path, train: int, test: int) -> None:
    """A pack laid out as the shared CIFAR-10 one (*_jpeg bytes, *_offsets, y_*, class_names), of random images."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {"class_names": np.array([f"class{i}" for i in range(10)])}
    for split, count in (("train", train), ("test", test)):
        blobs = []
        for _ in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            blobs.append(buffer.getvalue())
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0, *map(len, blobs)])
        arrays[f"y_{split}"] = np.arange(count) % 10
    np.savez(path, **arrays)


@pytest.mark.slow
def test_compare_dry_run_on_cpu_decodes_the_pack_and_times_every_arm(tmp_path):
    """bench/gpu/compare.py --device cpu --tiny: the pack decoded, ours and its default variants, resnet9, the table."""
    jpeg_pack(tmp_path / "pack.npz", train=2100, test=200)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/gpu/compare.py", "--device", "cpu", "--tiny", "--pack",
                             str(tmp_path / "pack.npz"), "--reference", str(tmp_path / "absent.tar.gz"), "--work",
                             str(tmp_path / "work"), "--out", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "airbench94 reference: needs CUDA; not run" in result.stdout
    table = json.loads((tmp_path / "runs" / "table.json").read_text())
    assert list(table) == ["effcifar --recipe airbench", "effcifar --recipe airbench (no compile)",
                           "effcifar --recipe airbench (fp16)", "effcifar --recipe airbench (fp16 weights, experiment)",
                           "effcifar resnet9 (24 epochs)"]
    assert all(len(runs) == 1 and 0 <= runs[0][0] <= 1 and runs[0][1] > 0 for runs in table.values())
    decoded = np.load(tmp_path / "work" / "cifar10.npz")
    assert decoded["x_train"].shape == (2100, 32, 32, 3) and decoded["x_test"].shape == (200, 32, 32, 3)


def test_the_stage_table_of_a_stopped_pipeline_marks_the_stage_it_stopped_in(tmp_path):
    """bench/pipeline.py's table (which bench/gpu/pipeline.sh prints when the time limit stops a run): a stage whose
    stage.json has no seconds yet started and did not finish; the final table needs results.json."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    bench_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_pipeline)
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "stage.json").write_text(json.dumps({"started": "t", "seconds": 12.0}))
    (tmp_path / "baseline" / "summary.json").write_text(json.dumps({"test_acc": 0.5}))
    (tmp_path / "hpo").mkdir()
    (tmp_path / "hpo" / "stage.json").write_text(json.dumps({"started": "t"}))
    rows = bench_pipeline.stage_table(tmp_path)
    assert "| baseline | 12 s | test 50.00% |" in rows and "| hpo | unfinished | |" in rows
    assert "| supernet | skipped | |" in rows and not any(row.startswith("| method") for row in rows)
