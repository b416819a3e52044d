"""Several workers on one PostgreSQL study (a real server: .ci/run installs and starts Debian's postgresql).

Set EFFCIFAR_TEST_POSTGRES to a database URL (with password) to run these; .ci/run does.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from effcifar.hpo.study import load_run
from effcifar.studies import redact_url

from conftest import TINY_BASE

URL = os.environ.get("EFFCIFAR_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not URL, reason="needs EFFCIFAR_TEST_POSTGRES (a PostgreSQL URL; .ci/run sets it)")
def hpo_command(files, out, study, trials, *extra):
    base, space = files
    return [sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--base", str(base),
            "--trials", str(trials), "--storage", URL, "--study", study, "--out", str(out), *extra]


def test_two_machines_share_one_study_exactly(tmp_path, files):
    study = f"shared-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen(hpo_command(files, tmp_path / f"worker{i}", study, 6, "--sampler", "random", "--pruner", "none",
                                          "--seed", str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    _, loaded = load_run(tmp_path / "worker0", URL)
    trials = loaded.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in trials) == list(range(6))
    by_worker = {t.user_attrs["worker_pid"] for t in trials}
    assert len(by_worker) == 2  # both machines took trials
    for t in trials:  # every trial's files are on the machine that ran it
        assert any((tmp_path / f"worker{i}" / t.user_attrs["run_dir"] / "summary.json").is_file() for i in range(2))
    password = URL.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    assert password
    for stdout, stderr in outputs:
        assert password not in stdout and password not in stderr
    for path in (tmp_path / "worker0").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".tsv"):
            assert password not in path.read_text(errors="ignore")
    assert redact_url(URL) in (tmp_path / "worker0" / "hpo.yaml").read_text()


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(tmp_path, files):
    study = f"killed-{uuid.uuid4().hex[:8]}"
    base, _ = files
    base.write_text(json.dumps({**TINY_BASE, "subset": 2048, "total_epoch": 4}))
    out = tmp_path / "w"
    cmd = hpo_command(files, out, study, 2, "--heartbeat", "1", "--seed", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("trials/*/logs.tsv")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(4)  # longer than 3 heartbeats: the trial is stale
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trials = load_run(out, URL)[1].get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = [t for t in trials
                 if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == failed[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == failed[0].params


def test_bad_password_is_one_line_and_not_printed(tmp_path, files):
    bad = URL.replace(URL.split("://", 1)[1].split("@", 1)[0], "effcifar:not-the-password-42")
    base, space = files
    r = subprocess.run([sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--base", str(base),
                        "--storage", bad, "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "not-the-password-42" not in r.stderr + r.stdout
    assert "cannot open storage postgresql" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
