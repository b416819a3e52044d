"""The public API: every name in `effcifar.__all__` resolves and says what it is; the package's example runs."""

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

import effcifar

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves_and_has_a_docstring():
    for name in effcifar.__all__:
        value = getattr(effcifar, name)
        assert name == "__version__" or (value.__doc__ or "").strip(), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        effcifar.nothing  # noqa: B018


def test_importing_the_package_loads_neither_torch_nor_optuna():
    code = "import sys, effcifar; print(sorted(m for m in ('torch', 'optuna') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_the_package_example_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the example names a file of the repository
    failures, tried = doctest.testmod(effcifar, optionflags=doctest.ELLIPSIS)
    assert tried > 10 and failures == 0


def test_the_api_trains_an_architecture_file_without_importing_the_nas_package_by_hand():
    """`effcifar.train_network` with a TrainConfig's `arch`: the subnet builder is registered by the API."""
    code = "import effcifar; effcifar.train_network; from effcifar.train import subnet_builder; subnet_builder()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
