"""The daemon's HTTP endpoint: ``GET /healthz`` (JSON, 200 or 503) and ``GET /metrics`` (Prometheus text).

A small threaded ``http.server`` on ``[daemon] listen``; it serves nothing else (404) and accepts
only GET and HEAD (405). Meant for a loopback address, a container health check or a Prometheus
scraper on a private network: it carries no secrets and no authentication.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from railwatch.errors import ConfigError, RailwatchError

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
MetricsFn = Callable[[], tuple[bytes, str]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9466`` for IPv6) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError([f'[daemon] listen: expected "host:port", got {listen!r}'])
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], health: HealthFn, metrics: MetricsFn) -> None:
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.health = health
        self.metrics = metrics


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "railwatch"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                ok, doc = self.server.health()
                self._reply(200 if ok else 503, "application/json", json.dumps(doc, default=str).encode(), body)
            elif path == "/metrics":
                payload, ctype = self.server.metrics()
                self._reply(200, ctype, payload, body)
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n", body)
        except Exception as exc:  # a failing probe must answer, not hang the scraper
            log.exception("health endpoint failed on %s", path)
            self._reply(500, "text/plain; charset=utf-8", f"error: {exc}\n".encode(), body)

    def _not_allowed(self) -> None:
        self._reply(405, "text/plain; charset=utf-8", b"only GET\n", True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _reply(self, code: int, ctype: str, payload: bytes, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)


class HealthServer:
    """Serves /healthz and /metrics from a background thread until :meth:`close`."""

    def __init__(self, listen: str, health: HealthFn, metrics: MetricsFn) -> None:
        host, port = parse_listen(listen)
        try:
            self._server = _Server((host, port), health, metrics)
        except OSError as exc:
            raise RailwatchError(
                f"cannot listen on {listen} ([daemon] listen): {exc.strerror or exc}; another process may use "
                "that port: stop it, or choose another port (\"\" turns the endpoint off)") from exc
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="railwatch-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%s/healthz and /metrics", self.host, self.port)

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which must be running
            self._server.shutdown()
        self._server.server_close()
