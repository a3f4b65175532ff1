"""Real local peers for delivery tests: an SMTP server (aiosmtpd) and an HTTP webhook receiver.

Both listen on 127.0.0.1 on a free port, record what they receive and answer from a script the
test sets. Import the fixtures explicitly::

    from tests.fakes_delivery import smtp_sink, webhook_receiver  # noqa: F401
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- SMTP -------------------------------------------------------------------------------------------
@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        reply = self.sink.rcpt_replies.popleft() if self.sink.rcpt_replies else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.sink.data_replies.popleft() if self.sink.data_replies else None
        if reply:
            self.sink.rejected += 1
            return reply
        raw = bytes(envelope.original_content or envelope.content)
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        self.sink.messages.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), raw, msg))  # type: ignore[arg-type]
        return "250 Message accepted for delivery"


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1. ``data_replies``/``rcpt_replies``: scripted error replies."""

    def __init__(
        self,
        *,
        security: str = "none",
        cert_dir: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[ReceivedMail] = []
        self.data_replies: deque[str] = deque()
        self.rcpt_replies: deque[str] = deque()
        self.rejected = 0
        self.logins: list[str] = []
        self.host = "127.0.0.1"
        self.port = free_port()
        self.security = security
        self.ca_file: Path | None = None
        kwargs: dict[str, Any] = {}
        if security != "none":
            import trustme

            assert cert_dir is not None
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            self.ca_file = cert_dir / "smtp-ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(server_ctx)
            if security == "tls":
                kwargs["ssl_context"] = server_ctx
            else:
                kwargs["tls_context"] = server_ctx
                kwargs["require_starttls"] = True
        if username is not None:
            expected = (username.encode(), (password or "").encode())

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
                ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == expected
                self.logins.append(auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?")
                return AuthResult(success=ok, handled=False)

            kwargs["authenticator"] = authenticator
            # Implicit TLS is invisible to aiosmtpd's auth_require_tls check (and it warns when AUTH is
            # required without it), so only STARTTLS requires both; ``logins`` shows who logged in.
            kwargs["auth_required"] = kwargs["auth_require_tls"] = security == "starttls"
        self.controller = Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
        if not self.controller.loop.is_closed():
            self.controller.loop.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A plain (no TLS, no login) SMTP server on 127.0.0.1."""
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


# --- webhook receiver -------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    #: Hold the answer until the receiver is closed (to make the client time out).
    hang: bool = False


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A threaded HTTP server on 127.0.0.1 recording every request; answers from ``script`` (default 200)."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.script: deque[Reply] = deque()
        #: Called with each request before its reply is sent, and after it was sent (crash tests).
        self.before_reply: Callable[[ReceivedRequest], None] | None = None
        self.after_reply: Callable[[ReceivedRequest], None] | None = None
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                request = ReceivedRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                receiver.requests.append(request)
                reply = receiver.script.popleft() if receiver.script else Reply()
                if receiver.before_reply is not None:
                    receiver.before_reply(request)
                if reply.hang:
                    receiver._release.wait(10)
                    return
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
                self.wfile.flush()
                if receiver.after_reply is not None:
                    receiver.after_reply(request)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(self, *replies: Reply | int) -> None:
        for r in replies:
            self.script.append(Reply(r) if isinstance(r, int) else r)

    def at(self, path: str) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.path == path]

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def new_whsec(seed: int) -> str:
    """A deterministic, valid ``whsec_`` secret for tests."""
    return "whsec_" + base64.b64encode(bytes((seed * 7 + i) % 256 for i in range(32))).decode()
