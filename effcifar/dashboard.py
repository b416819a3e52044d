"""Optuna's web dashboard for an HPO or search run: `effcifar dashboard runs/NAME` shows its study in a browser.

optuna-dashboard has no login, and anyone who can reach it can edit and delete studies, so it listens
on loopback; another address needs `allow_network` and comes with a warning. On loopback it answers
only requests addressed to this machine by name (the Host header), and edits only from its own pages
(the Origin header): a web page elsewhere cannot drive it through the browser (DNS rebinding,
cross-site requests). An edit (a note, a deleted trial or study) takes the run directory's lock, so
it is refused while a command writes the run. The study is opened as it exists: a directory or
database without it is an error, never a new empty study.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import threading
import urllib.parse
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIServer, make_server

import optuna_dashboard

from effcifar.config import build_config
from effcifar.errors import ConfigError, WriteError
from effcifar.hpo.study import CONFIG_FILE as HPO_CONFIG, HpoConfig
from effcifar.nas.search import CONFIG_FILE as SEARCH_CONFIG, SearchConfig
from effcifar.rundir import locked
from effcifar.studies import load_study, open_storage

READ_METHODS = ("GET", "HEAD", "OPTIONS")


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request: the page's parallel requests never queue, and Ctrl-C always reaches the main loop."""

    daemon_threads = True  # an idle browser connection must not delay exit


def dashboard_url(host: str, port: int) -> str:
    """The address to print, so the user can open the dashboard's study list in a browser."""
    return f"http://{host}:{port}/dashboard"


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def network_warning(host: str, port: int, allow_network: bool) -> str | None:
    """The warning for serving beyond this machine (None on loopback); ConfigError unless `allow_network`."""
    if is_loopback(host):
        return None
    risk = "optuna-dashboard has no login, and anyone who can reach it can edit and delete studies"
    if not allow_network:
        raise ConfigError(f"--host {host}: {risk}; add --allow-network to serve it beyond this machine anyway")
    return f"the dashboard on {host}:{port} is reachable from the network: {risk}"


def loopback_names(host: str, port: int) -> set[str] | None:
    """The Host headers a loopback server answers (this machine by name or address, with the port); None beyond
    loopback, where the machine's names are not known here."""
    if not is_loopback(host):
        return None
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]")}


def guarded(app: Callable[..., Iterable[bytes]], names: set[str] | None, run_dir: Path,
            kind: str) -> Callable[..., Iterable[bytes]]:
    """The dashboard's WSGI app behind the checks of the module docstring: 403 for another Host or a foreign
    Origin, 409 for an edit while a command holds the run directory."""
    edits = threading.Lock()  # one edit at a time takes the run directory's lock

    def refuse(start_response: Callable[..., Any], status: str, reason: str) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [reason.encode() + b"\n"]

    def app_guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if names is not None and environ.get("HTTP_HOST", "").lower() not in names:
            return refuse(start_response, "403 Forbidden", "effcifar dashboard: this server answers requests to "
                                                           "this machine only")
        if environ.get("REQUEST_METHOD", "GET") in READ_METHODS:
            return app(environ, start_response)
        origin = environ.get("HTTP_ORIGIN")
        if names is not None and origin is not None and urllib.parse.urlsplit(origin).netloc.lower() not in names:
            return refuse(start_response, "403 Forbidden", "effcifar dashboard: edits come from its own pages only")
        with edits:
            try:
                with locked(run_dir, kind):
                    return list(app(environ, start_response))
            except WriteError as e:
                return refuse(start_response, "409 Conflict", f"effcifar dashboard: not edited: {e}")

    return app_guarded


def run_config(run_dir: Path, storage: str | None) -> HpoConfig | SearchConfig:
    """The saved config of an HPO or architecture-search run (where its study is stored, and its name)."""
    for name, cls in ((SEARCH_CONFIG, SearchConfig), (HPO_CONFIG, HpoConfig)):
        if (run_dir / name).is_file():
            config = build_config(cls, run_dir / name)
            if storage is not None:
                config = dataclasses.replace(config, storage=storage)
                config.validate()  # a URL that is not PostgreSQL is refused before anything opens it
            return config
    raise ConfigError(f"{run_dir}: not an HPO run directory or a search run directory (no {HPO_CONFIG} "
                      f"or {SEARCH_CONFIG})")


def serve_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, storage: str | None = None,
                    allow_network: bool = False, warn: Callable[[str], None] | None = None,
                    on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the run's study until interrupted; a host beyond loopback needs `allow_network` (and `warn`s).

    `on_ready(url)` is called once the server listens.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number in 1..65535")
    warning = network_warning(host, port, allow_network)
    run_dir = Path(run_dir)
    config = run_config(run_dir, storage)
    load_study(config, run_dir)  # it must exist; nothing is created
    app = guarded(optuna_dashboard.wsgi(open_storage(config, run_dir, read_only=True)),  # no URL to print
                  loopback_names(host, port), run_dir, "search" if isinstance(config, SearchConfig) else "hpo")
    try:
        server = make_server(host, port, app, server_class=ThreadingWSGIServer)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use on {host}: choose another with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if warning is not None and warn is not None:
        warn(warning)
    if on_ready is not None:
        on_ready(dashboard_url(host, port))
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a dashboard is stopped, not an error
            pass
