"""The dashboard end to end: a served study whose trials a real headless Chromium lists."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from effcifar.config import save_config
from effcifar.dashboard import dashboard_url, network_warning, serve_dashboard
from effcifar.errors import ConfigError
from effcifar.hpo.study import HpoConfig, open_study
from effcifar.nas.search import SearchConfig
from effcifar.studies import open_storage

from test_rundir import HOLDER

SPACE = str(Path(__file__).resolve().parents[1] / "examples" / "search_space.json")
ACCURACIES = (0.91, 0.93, 0.92)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An HPO run directory whose study has three finished trials (no training)."""
    run = tmp_path / "hpo"
    run.mkdir()
    config = HpoConfig(space=SPACE, study=run.name)
    save_config(config, run / "hpo.yaml")
    study = open_study(config, open_storage(config, run))
    lr = optuna.distributions.FloatDistribution(0.01, 0.5, log=True)
    for i, acc in enumerate(ACCURACIES):
        study.add_trial(optuna.trial.create_trial(
            params={"peak_lr": 0.05 * (i + 1)}, distributions={"peak_lr": lr}, value=acc,
            user_attrs={"accuracy": acc, "train_time": 10.0 + i},
        ))
    return run


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_studies(url: str, process: subprocess.Popen, log: Path, timeout: float = 15.0) -> list[dict]:
    """Poll the dashboard's study list until the server answers (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url + "/api/studies", timeout=2) as response:
                return json.load(response)["study_summaries"]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"dashboard did not answer at {url} within {timeout} s")


@pytest.fixture
def server(run_dir: Path, tmp_path: Path):
    """serve_dashboard(run_dir, port=P) in a subprocess with the default host; stopped with Ctrl-C."""
    with serving(run_dir, tmp_path) as served:
        yield served


@contextlib.contextmanager
def serving(run_dir: Path, tmp_path: Path):
    """(port, study summaries) of serve_dashboard(run_dir) running in a subprocess until the block ends."""
    port, log = free_port(), tmp_path / "server.log"
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # background jobs ignore it
            f"from effcifar.dashboard import serve_dashboard; serve_dashboard({str(run_dir)!r}, port={port})")
    with log.open("wb") as out:  # a file, not a pipe: the request log must never block the server
        process = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    try:
        studies = wait_for_studies(f"http://127.0.0.1:{port}", process, log)
        yield port, studies
    finally:
        process.send_signal(signal.SIGINT)  # the child restored Python's Ctrl-C handler above
        try:
            assert process.wait(timeout=5) == 0, log.read_text()  # Ctrl-C stops it cleanly
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stop a server for good: SIGTERM (which, unlike SIGINT, a shell's background job does not ignore), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.mark.slow
def test_browser_lists_the_study_trials(browser, server, run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def page_text(driver) -> str:  # what the page shows (rendered text of the body)
        return driver.find_element(By.TAG_NAME, "body").text

    port, studies = server
    (study,) = [s for s in studies if s["study_name"] == run_dir.name]
    browser.get(f"{dashboard_url('127.0.0.1', port)}/studies/{study['study_id']}/trials")
    names = [f"Trial {i}" for i in range(len(ACCURACIES))]
    WebDriverWait(browser, 15).until(lambda d: all(n in page_text(d) for n in names))
    assert all(n in page_text(browser) for n in names) and f"{len(names)} Trials" in page_text(browser)
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and screenshot.stat().st_size > 1000


def outward_address() -> str | None:
    """This machine's address on its default route, if it has one other than loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: no packet is sent, the kernel only picks the interface
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_binds_loopback_by_default(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    outward = outward_address()
    if outward is not None:  # a machine without a network has nothing else to refuse on
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outward, port), timeout=2).close()


def test_a_host_beyond_loopback_needs_the_flag_and_is_warned_about():
    assert all(network_warning(host, 8080, False) is None for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    for host in ("0.0.0.0", "192.0.2.7", "::", "myhost.example"):
        with pytest.raises(ConfigError, match=f"--host {re.escape(host)}: optuna-dashboard has no login"):
            network_warning(host, 8080, False)
    assert network_warning("0.0.0.0", 8080, True) == ("the dashboard on 0.0.0.0:8080 is reachable from the network: "
                                                      "optuna-dashboard has no login, and anyone who can reach it can "
                                                      "edit and delete studies")


@pytest.mark.slow
def test_allow_network_serves_and_prints_the_warning(run_dir, tmp_path):
    port, log = free_port(), tmp_path / "cli.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "effcifar", "dashboard", str(run_dir), "--host", "0.0.0.0",
                                    "--allow-network", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its lines reach the log at once
    try:
        assert [s["study_name"] for s in wait_for_studies(f"http://127.0.0.1:{port}", process, log)] == [run_dir.name]
    finally:
        stop(process)
    text = log.read_text()
    assert "effcifar: warning: the dashboard on 0.0.0.0:" in text and "can edit and delete studies" in text
    assert f"dashboard of {run_dir}: http://0.0.0.0:{port}/dashboard" in text


def test_not_a_run_dir_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not an HPO run directory or a search run directory") as error:
        serve_dashboard(tmp_path, port=free_port())
    assert "\n" not in str(error.value)


def test_port_in_use_names_the_port_and_suggests_another(run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} is in use.*--port") as error:
            serve_dashboard(run_dir, port=port)
    assert "\n" not in str(error.value)


def test_dashboard_url():
    assert dashboard_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard"


@pytest.mark.slow
def test_serves_an_architecture_search_run(tmp_path):
    run = tmp_path / "search1"
    run.mkdir()
    save_config(SearchConfig(), run / "search.yaml")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "study.journal")))
    study = optuna.create_study(storage=storage, study_name="search1", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.42, user_attrs={"accuracy": 0.42}))
    with serving(run, tmp_path) as (_, studies):
        assert [s["study_name"] for s in studies] == ["search1"]


def request(port: int, method: str, path: str, host: str | None = None, origin: str | None = None) -> int:
    """The status of one request to the local dashboard, with these Host and Origin headers."""
    headers = {"Host": host or f"127.0.0.1:{port}", **({"Origin": origin} if origin else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_pages_elsewhere_cannot_drive_it_and_edits_wait_for_the_runs_writer(server, run_dir):
    """DNS rebinding (another Host), a cross-site edit (another Origin), an edit while a command writes the run."""
    port, _ = server
    evil = f"attacker.example:{port}"
    assert request(port, "GET", "/api/studies", host=evil) == 403
    assert request(port, "DELETE", "/api/studies/0", host=evil, origin=f"http://{evil}") == 403
    assert request(port, "DELETE", "/api/studies/0", origin=f"http://{evil}") == 403
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(run_dir), "hpo"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert request(port, "DELETE", "/api/studies/0") == 409  # an `hpo run` holds the run directory
    finally:
        stop(holder)
    with urllib.request.urlopen(f"http://localhost:{port}/api/studies", timeout=5) as response:  # the study stays
        assert [s["study_name"] for s in json.load(response)["study_summaries"]] == ["hpo"]
    assert request(port, "DELETE", "/api/studies/0", origin=f"http://localhost:{port}") == 204  # its own page


def test_a_storage_that_is_not_postgresql_is_refused_and_creates_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="field 'storage': expected a postgresql://"):
        serve_dashboard(run_dir, port=free_port(), storage="sqlite:///x.db")
    assert not (tmp_path / "x.db").exists()
