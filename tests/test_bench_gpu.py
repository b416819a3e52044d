"""The GPU scripts' CPU dry runs (so a typo never costs GPU time): the profile, the gpu preset's pipeline; idle-time arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from profile_recipes import idle_share  # noqa: E402


def test_idle_share_counts_the_gaps_between_overlapping_spans():
    assert idle_share([]) is None
    assert idle_share([(0, 10)]) == 0.0
    assert idle_share([(0, 4), (2, 5), (8, 10)]) == pytest.approx(0.3)  # busy 0-5 and 8-10 of 10
    assert idle_share([(6, 10), (0, 2), (1, 3)]) == pytest.approx(0.3)  # unsorted: busy 0-3 and 6-10


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
    assert ours["cold_timed_s"] > 0 and ours["whitening_s"] > 0 and ours["tta_s"] > 0 and ours["epochs_s"][0] > 0 and ours["gpu_idle_share"] is None
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
