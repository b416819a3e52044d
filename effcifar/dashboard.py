"""Optuna's web dashboard for an HPO or search run: `effcifar dashboard runs/NAME` shows its study in a browser."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

import optuna_dashboard

from effcifar.config import build_config
from effcifar.errors import ConfigError
from effcifar.hpo.study import HpoConfig, load_run
from effcifar.nas.search import SearchConfig
from effcifar.studies import open_storage


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request: the page's parallel requests never queue, and Ctrl-C always reaches the main loop."""

    daemon_threads = True  # an idle browser connection must not delay exit


def dashboard_url(host: str, port: int) -> str:
    """The address to print, so the user can open the dashboard's study list in a browser."""
    return f"http://{host}:{port}/dashboard"


def run_config(run_dir: Path, storage: str | None) -> HpoConfig | SearchConfig:
    """The saved config of an HPO or architecture-search run (where its study is stored)."""
    if (run_dir / "search.yaml").is_file():
        config = build_config(SearchConfig, run_dir / "search.yaml")
        return config if storage is None else dataclasses.replace(config, storage=storage)
    config, _ = load_run(run_dir, storage)  # ConfigError unless run_dir holds a study
    return config


def serve_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, storage: str | None = None) -> None:
    """Serve the run's study until interrupted; loopback by default because the dashboard can edit the study."""
    app = optuna_dashboard.wsgi(open_storage(run_config(Path(run_dir), storage), Path(run_dir)))  # no URL to print
    try:
        server = make_server(host, port, app, server_class=ThreadingWSGIServer)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use on {host}: choose another with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a dashboard is stopped, not an error
            pass
