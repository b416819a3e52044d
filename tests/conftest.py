"""Shared test fixtures: a tiny trial config and search space for the HPO tests."""

import json

import pytest

# One trial of this base config trains in about a second on 2 CPU cores.
TINY_BASE = {"dataset": "synthetic", "subset": 256, "batch_size": 64, "prep": 8, "layer1": 8, "layer2": 16,
             "layer3": 16, "total_epoch": 2, "peak_epoch": 1, "eval_batch_size": 500}
TINY_SPACE = {"peak_lr": {"_type": "loguniform", "_value": [0.01, 0.5]},
              "cutout": {"_type": "choice", "_value": [0, 4, 8]}}


@pytest.fixture
def files(tmp_path):
    """(base config file, search space file) for a tiny study."""
    base, space = tmp_path / "base.json", tmp_path / "space.json"
    base.write_text(json.dumps(TINY_BASE))
    space.write_text(json.dumps(TINY_SPACE))
    return base, space
