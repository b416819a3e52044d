"""Several workers on one PostgreSQL study (a real server: .ci/run installs and starts Debian's postgresql).

Set EFFCIFAR_TEST_POSTGRES to a database URL (with password) to run these; .ci/run does.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from effcifar.config import save_config
from effcifar.hpo.study import HpoConfig, load_run
from effcifar.studies import redact_url

from conftest import TINY_BASE

URL = os.environ.get("EFFCIFAR_TEST_POSTGRES")
pytestmark = [pytest.mark.slow,  # the second tier: worker processes on a real server
              pytest.mark.skipif(not URL, reason="needs EFFCIFAR_TEST_POSTGRES (a PostgreSQL URL; .ci/run sets it)")]
def hpo_command(files, out, study, trials, *extra):
    base, space = files
    return [sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--config", str(base),
            "--trials", str(trials), "--storage", URL, "--study", study, "--out", str(out), *extra]


def test_two_machines_share_one_study_exactly(tmp_path, files):
    """Both machines run the same command (docs/hpo.md); a third with another seed is refused."""
    study = f"shared-{uuid.uuid4().hex[:8]}"
    settings = ["--sampler", "random", "--pruner", "none", "--sampler-seed", "0"]
    procs = [subprocess.Popen(hpo_command(files, tmp_path / f"worker{i}", study, 6, *settings),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    _, loaded = load_run(tmp_path / "worker0", URL)
    trials = loaded.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in trials) == list(range(6))
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6  # one seed, yet no trial repeats another
    other_seed = subprocess.run(hpo_command(files, tmp_path / "worker2", study, 6, *settings[:-1], "1"),
                                capture_output=True, text=True, timeout=300)
    assert other_seed.returncode == 2 and "seed changed" in other_seed.stderr
    assert "Traceback" not in other_seed.stderr  # (Optuna's own log line about the existing study comes first)
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


def wait_until_stale(study: str, heartbeat: int = 1, timeout: float = 60.0) -> None:
    """Poll the database until a running trial of `study` has missed 3 heartbeats (as the workers judge it)."""
    storage = optuna.storages.RDBStorage(URL, heartbeat_interval=heartbeat, grace_period=3 * heartbeat)
    try:
        study_id = storage.get_study_id_from_name(study)
        deadline = time.monotonic() + timeout
        while not storage._get_stale_trial_ids(study_id):  # the check fail_stale_trials makes, without failing
            assert time.monotonic() < deadline, f"no trial of {study} went stale within {timeout} s"
            time.sleep(0.2)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(tmp_path, files):
    study = f"killed-{uuid.uuid4().hex[:8]}"
    base, _ = files
    base.write_text(json.dumps({**TINY_BASE, "subset": 2048, "epochs": 4}))
    out = tmp_path / "w"
    cmd = hpo_command(files, out, study, 2, "--heartbeat", "1", "--sampler-seed", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("trials/*/logs.tsv")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until_stale(study)  # no heartbeat for 3 heartbeats: the next worker fails and retries the trial
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


USER, _, PASSWORD = (URL or "postgresql://user:pw@host/db").split("://", 1)[1].split("@", 1)[0].partition(":")
SERVER = (URL or "postgresql://user:pw@host/db").split("@", 1)[1]  # host:port/db
ENCODED = urllib.parse.quote(PASSWORD, safe="")


def spellings(password: str) -> list[bytes]:
    """The forms a password could be written in: as given, percent-encoded (every character, or the unsafe ones)."""
    every = "".join(f"%{b:02X}" for b in password.encode())
    return [s.encode() for s in {password, urllib.parse.quote(password, safe=""), every, every.lower()}]


@pytest.mark.parametrize("url", [
    f"postgresql://{USER}:not-the-password-42@{SERVER}",
    f"postgresql://{USER}@{SERVER}?password=not-the-password-42",
    f"postgresql://{USER}@{SERVER}?sslmode=disable&PassWord=not%2Dthe%2Dpassword%2D42",
])
def test_bad_password_is_one_line_and_not_printed(tmp_path, files, url):
    base, space = files
    r = subprocess.run([sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--config", str(base),
                        "--storage", url, "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert not any(s.decode() in r.stderr + r.stdout for s in spellings("not-the-password-42"))
    assert f"cannot open storage postgresql://{USER}@{SERVER}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_password_reaches_no_file_and_no_screen(tmp_path):
    """A pipeline with both studies on PostgreSQL (the password in the authority for HPO, percent-encoded in the
    query for the search), --show-config, the read-only commands and a resume from PGPASSWORD: every byte every
    file holds and everything printed is searched for the password, in any spelling."""
    out = tmp_path / f"secret-{uuid.uuid4().hex[:8]}"  # the studies are named after it in the shared database
    in_query = f"postgresql://{USER}@{SERVER}?sslmode=disable&pass%77ord={ENCODED}"
    settings = ["--set", f"hpo.storage={URL}", "--set", f"search.storage={in_query}", "--set", "hpo.trials=2",
                "--set", "search.trials=4", "--set", "select.pool=1", "--set", "nas_eval.trials=0"]
    tiny = str(Path(__file__).parent / "data" / "pipeline_tiny.yaml")
    printed = []

    def run(*args: str, env: dict | None = None) -> str:
        r = subprocess.run([sys.executable, "-m", "effcifar", *args], capture_output=True, text=True, timeout=600,
                           env={**os.environ, **(env or {})})
        printed.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        return r.stdout

    shown = run("pipeline", "--config", tiny, *settings, "--show-config")
    assert yaml.safe_load(shown)["hpo"]["storage"] == f"postgresql://{USER}@{SERVER}"
    assert yaml.safe_load(shown)["search"]["storage"] == f"postgresql://{USER}@{SERVER}?sslmode=disable"
    run("pipeline", "--config", tiny, *settings, "--quiet", "--out", str(out))
    with_pgpassword = {"PGPASSWORD": PASSWORD}
    for action in ("status", "best", "export"):
        run("hpo", action, str(out / "hpo"), env=with_pgpassword)
    resumed = run("pipeline", "--config", str(out / "pipeline.yaml"), "--quiet", "--out", str(out), env=with_pgpassword)
    assert resumed.count("skipped (finished)") == 7 and "nas_eval: skipped (nas_eval.trials is 0)" in resumed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"pipeline.yaml", "hpo.yaml", "search.yaml", "trials.csv", "report.html"} <= {p.name for p in files}
    for secret in spellings(PASSWORD):
        assert not [p for p in files if secret in p.read_bytes()], secret
        assert not [text for text in printed if secret.decode() in text], secret


def test_read_only_commands_create_no_study_in_the_database(tmp_path):
    run = tmp_path / "never-ran"
    run.mkdir()
    name = f"absent-{uuid.uuid4().hex[:8]}"
    save_config(HpoConfig(space="space.json", storage=redact_url(URL), study=name), run / "hpo.yaml")
    for command in (["hpo", "status"], ["hpo", "best"], ["hpo", "export"], ["dashboard"], ["report"]):
        r = subprocess.run([sys.executable, "-m", "effcifar", *command, str(run)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PGPASSWORD": PASSWORD})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{run}: no study '{name}' in postgresql://{USER}@{SERVER} (studies there:" in r.stderr
    assert name not in optuna.study.get_all_study_names(URL)
    assert sorted(p.name for p in run.iterdir()) == ["hpo.yaml"]


class CuttableLink:
    """A TCP forwarder to the test's PostgreSQL server that can be cut: the database lost mid-study, as a stopped
    server or a broken network leave it (every connection through it closed at once)."""

    def __init__(self, host: str, port: int):
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                self.sockets += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def cut(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_database_lost_mid_study_is_one_line_naming_how_to_resume(tmp_path, files, workers):
    parts = urllib.parse.urlsplit(URL)
    link = CuttableLink(parts.hostname, parts.port or 5432)
    url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{link.port}").geturl()
    base, space = files
    base.write_text(json.dumps({**TINY_BASE, "subset": 2048, "epochs": 50}))  # a trial outlasts the test
    command = [*hpo_command(files, tmp_path / "hpo", f"lost-{uuid.uuid4().hex[:8]}", 4, "--workers", str(workers))]
    command[command.index(URL)] = url
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "hpo").glob("trials/*/logs.tsv")):  # a trial has trained an epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        link.cut()
        out, err = proc.communicate(timeout=60)
    finally:
        link.cut()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "lost the study's database postgresql://" in err, err
    assert "run the same command to resume" in err
    password = parts.password
    assert password and password not in out and password not in err
