"""Where and in which arithmetic a run computes: device choice, precision, autocast, CPU threads.

Every stage that computes (training, supernet, search, selection) resolves its `device` and
`precision` settings here, so that `auto` means the same everywhere: the first GPU when there is
one; bf16 where the hardware runs it natively (most GPUs, CPUs with AMX tiles), else fp16 on a
GPU and fp32 on a CPU. A saved config may name a GPU the machine reading it lacks: names are
checked when a config is validated, the GPU itself only where a run starts (`resolve_device`).
"""

from __future__ import annotations

import platform
from typing import Callable

import torch

from effcifar.config import field_error

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32 runs without autocast

Autocast = Callable[[], torch.autocast]  # a factory: each `with autocast():` gets a fresh context


def check_device_name(name: str) -> None:
    """ConfigError (field 'device') unless `name` is auto, cpu, cuda or cuda:N; whether the GPU exists is not asked."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise field_error("device", "auto, cpu, cuda or cuda:N", name)


def check_precision(precision: str) -> None:
    """ConfigError (field 'precision') unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise field_error("precision", f"one of {', '.join(PRECISIONS)}", precision)


def device_type(name: str) -> str:
    """'cuda' or 'cpu': the kind of device a checked name means here, without asking for that GPU."""
    check_device_name(name)
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(name: str) -> torch.device:
    """'auto' means the first GPU when there is one; a bad name or a GPU this machine lacks is a ConfigError."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if torch.version.cuda else f"a PyTorch {torch.__version__} without CUDA"
            raise field_error("device", f"auto or cpu, or a GPU this machine has ({have})", name)
    return device


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX-BF16 tiles, where bf16 convolutions run 2-3x faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 where the hardware runs it natively (most GPUs, AMX CPUs), else fp16 on GPU, fp32 on CPU."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_matrix_units() else "fp32"


def autocast_factory(device: torch.device | str, precision: str) -> Autocast:
    """A factory of autocast contexts for a resolved precision (fp32: contexts that change nothing)."""
    kind = torch.device(device).type
    dtype = AMP_DTYPES.get(precision)
    return lambda: torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


def configure_threads(threads: int, device: torch.device) -> None:
    """Set torch's CPU threads (0: keep torch's default) and let cuDNN pick its fastest kernels on a GPU."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_name(device: torch.device) -> str:
    """Human-readable device name (GPU model or CPU with thread count), for summaries."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
