"""Device, precision and autocast resolution, the same for every stage."""

import pytest
import torch

from effcifar import device as device_lib
from effcifar.errors import ConfigError


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:3"])
def test_device_names_are_checked_without_asking_for_the_gpu(name):
    device_lib.check_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu:0"])
def test_bad_device_names_are_one_line_errors_naming_the_field(name):
    with pytest.raises(ConfigError, match=f"field 'device': expected auto, cpu, cuda or cuda:N, got '{name}'"):
        device_lib.check_device_name(name)


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_lib, "cpu_has_bf16_matrix_units", lambda: True)
    assert device_lib.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(device_lib, "cpu_has_bf16_matrix_units", lambda: False)
    assert device_lib.resolve_precision("auto", cpu) == "fp32"
    assert device_lib.resolve_precision("fp16", cpu) == "fp16"  # asked for: as given
    with pytest.raises(ConfigError, match="field 'precision': expected one of auto, fp32, bf16, fp16, got 'fp8'"):
        device_lib.resolve_precision("fp8", cpu)


def test_autocast_factory_gives_fresh_contexts_of_the_precision():
    fp32, bf16 = device_lib.autocast_factory("cpu", "fp32"), device_lib.autocast_factory("cpu", "bf16")
    with fp32():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    for _ in range(2):  # a factory, not one context: each `with` gets its own
        with bf16():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
