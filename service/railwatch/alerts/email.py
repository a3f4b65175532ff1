"""The email adapter: one multipart message (plain text + HTML, chart inline) per delivery.

Subject: ``[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (confirmed)``. Every message of
one alert threads under a deterministic root Message-ID ``<railwatch.alert.<id>.<aoi>@<from
domain>>``: the ``alert.opened`` message carries it as its own Message-ID, later ones name it in
In-Reply-To and References. A message's own Message-ID derives from the delivery key, so a send
repeated after a crash is recognisably the same message.

Security modes: ``tls`` (implicit TLS, 465), ``starttls`` (587), ``none`` (loopback relays only,
enforced by the configuration). SMTP 4xx replies and connection failures are retryable; 5xx replies
are permanent.
"""

from __future__ import annotations

import html
import logging
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, cast

from railwatch.alerts.payload import Delivery, headline
from railwatch.alerts.subscribers import EmailSubscriber
from railwatch.errors import DeliveryError

__all__ = ["EmailNotifier", "build_message", "thread_root_id"]

log = logging.getLogger(__name__)


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def thread_root_id(alert_id: int, aoi_id: str, domain: str) -> str:
    """The Message-ID every message of one alert threads under."""
    return f"<railwatch.alert.{alert_id}.{_token(aoi_id)}@{domain}>"


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.{digits}f}"


def _when(stamp: str | None) -> str:
    return stamp.replace("T", " ").replace("Z", " UTC") if stamp else "n/a"


def _facts(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows describing one alert event payload."""
    cars = p.get("estimated_cars") or {}
    alert = p.get("alert") or {}
    scene = p.get("scene") or {}
    aoi = p.get("aoi") or {}
    interval = ""
    if cars.get("low") is not None and cars.get("high") is not None:
        interval = f" ({_fmt(cars['low'])}–{_fmt(cars['high'])})"
    rows = [
        ("AOI", f"{aoi.get('name')} ({aoi.get('id')})"),
        ("Event", str(p.get("type"))),
        ("State", str(p.get("state"))),
        ("Estimated cars", _fmt(cars.get("value")) + interval),
        ("Baseline cars", _fmt(p.get("baseline_cars"))),
        ("Peak cars", _fmt(p.get("peak_cars"))),
        ("Score", _fmt(p.get("score"), 1)),
        ("Sensor", str(p.get("sensor") or "n/a")),
    ]
    if scene:
        rows.append(("Scene", f"{scene.get('id')}, acquired {_when(scene.get('acquired'))}"))
    rows.append(("Alert", f"#{alert.get('id')} {alert.get('kind')}, opened by the scene of "
                          f"{_when(alert.get('opened_acquired'))}"))
    return rows


def _render_text(p: Mapping[str, Any], *, has_chart: bool) -> str:
    kind = p.get("type")
    lines: list[str] = []
    if kind == "test":
        lines += [str(p.get("message")), "", f"Subscriber: {p.get('subscriber')}",
                  f"Sent: {_when(p.get('created_at'))}"]
    elif kind == "digest":
        events = p.get("events") or []
        lines += [f"{len(events)} alert events were held because this subscription allows at most "
                  f"{p.get('max_per_hour')} notifications per hour:", ""]
        lines += [f"  - {headline(e)}  [{e.get('type')}, event {(e.get('event') or {}).get('id')}]" for e in events]
    else:
        lines.append(headline(p))
        lines.append("")
        width = max(len(k) for k, _ in _facts(p))
        lines += [f"{k.ljust(width)}  {v}" for k, v in _facts(p)]
        evidence = p.get("evidence") or []
        if evidence:
            lines += ["", "Evidence:"] + [f"  - {e}" for e in evidence]
        if has_chart:
            lines += ["", "The activity chart is in the HTML version of this message."]
    lines += ["", "-- ", f"railwatch {p.get('railwatch_version')} · delivery {p.get('delivery_id')}"]
    return "\n".join(lines) + "\n"


def _render_html(p: Mapping[str, Any], *, chart_cid: str | None) -> str:
    e = html.escape
    kind = p.get("type")
    parts = ['<html><body style="font-family: sans-serif">']
    if kind == "test":
        parts.append(f"<p><strong>{e(str(p.get('message')))}</strong></p>")
        parts.append(f"<p>Subscriber: {e(str(p.get('subscriber')))}<br>Sent: {e(_when(p.get('created_at')))}</p>")
    elif kind == "digest":
        events = p.get("events") or []
        parts.append(f"<p>{len(events)} alert events were held because this subscription allows at most "
                     f"{e(str(p.get('max_per_hour')))} notifications per hour:</p><ul>")
        parts += [f"<li>{e(headline(ev))}</li>" for ev in events]
        parts.append("</ul>")
    else:
        parts.append(f"<h2>{e(headline(p))}</h2>")
        parts.append('<table cellpadding="4" style="border-collapse: collapse">')
        parts += [f"<tr><th align=\"left\">{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(p)]
        parts.append("</table>")
        if chart_cid:
            parts.append(f'<p><img src="cid:{e(chart_cid)}" alt="activity chart" style="max-width: 100%"></p>')
        evidence = p.get("evidence") or []
        if evidence:
            parts.append("<p>Evidence:</p><ul>" + "".join(f"<li>{e(str(x))}</li>" for x in evidence) + "</ul>")
    parts.append(f"<p style=\"color: #777; font-size: small\">railwatch {e(str(p.get('railwatch_version')))}"
                 f" · delivery {e(str(p.get('delivery_id')))}</p></body></html>")
    return "\n".join(parts)


def build_message(sub: EmailSubscriber, delivery: Delivery, *, now: datetime) -> EmailMessage:
    """The complete message for one delivery (pure: ``now`` is the Date header)."""
    p = delivery.payload
    domain = sub.sender_domain
    msg = EmailMessage()
    msg["Subject"] = f"[railwatch] {headline(p)}"
    msg["From"] = sub.from_
    msg["To"] = ", ".join(sub.to)
    msg["Date"] = format_datetime(now.astimezone(UTC))
    own_id = f"<railwatch.{_token(delivery.key)}@{domain}>"
    aoi_id = str((p.get("aoi") or {}).get("id") or "")
    if delivery.alert_id is not None and p.get("type") not in ("digest", "test"):
        root = thread_root_id(delivery.alert_id, aoi_id, domain)
        if p.get("type") == "alert.opened":
            own_id = root
        else:
            msg["In-Reply-To"] = root
            msg["References"] = root
    msg["Message-ID"] = own_id
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Railwatch-Event"] = str(p.get("type"))
    msg["X-Railwatch-Delivery"] = delivery.key
    if p.get("test"):
        msg["X-Railwatch-Test"] = "true"

    chart_cid = f"chart.{_token(delivery.key)}@{domain}" if delivery.chart_png else None
    msg.set_content(_render_text(p, has_chart=chart_cid is not None))
    msg.add_alternative(_render_html(p, chart_cid=chart_cid), subtype="html")
    if delivery.chart_png and chart_cid:
        html_part = cast(EmailMessage, msg.get_payload()[1])  # type: ignore[index]
        html_part.add_related(delivery.chart_png, maintype="image", subtype="png", cid=f"<{chart_cid}>",
                              filename="activity.png", disposition="inline")
    return msg


def _permanent(code: int) -> bool:
    return 500 <= code < 600


def _reply(code: int, text: bytes | str) -> str:
    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    text = re.sub(r"\s+", " ", s).strip()[:200]
    return f"{code} {text}"


class EmailNotifier:
    """Sends deliveries to one email subscriber over SMTP."""

    def __init__(
        self,
        subscriber: EmailSubscriber,
        password: str | None,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.subscriber = subscriber
        self._password = password
        self._timeout = timeout
        self._clock = clock

    def __repr__(self) -> str:
        s = self.subscriber
        return f"EmailNotifier({s.name!r}, {s.smtp_host}:{s.port} {s.smtp_security})"

    def _where(self) -> str:
        s = self.subscriber
        return f"email {s.name} (SMTP {s.smtp_host}:{s.port}, {s.smtp_security})"

    def _context(self) -> ssl.SSLContext:
        ca = self.subscriber.smtp_ca_file
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def send(self, delivery: Delivery) -> None:
        sub = self.subscriber
        msg = build_message(sub, delivery, now=datetime.fromtimestamp(self._clock(), UTC))
        sender = parseaddr(sub.from_)[1]
        try:
            smtp: smtplib.SMTP
            if sub.smtp_security == "tls":
                smtp = smtplib.SMTP_SSL(sub.smtp_host, sub.port, timeout=self._timeout, context=self._context())
            else:
                smtp = smtplib.SMTP(sub.smtp_host, sub.port, timeout=self._timeout)
            with smtp:
                if sub.smtp_security == "starttls":
                    smtp.starttls(context=self._context())
                if sub.username is not None:
                    if not self._password:
                        raise DeliveryError(f"{self._where()}: no password for {sub.username}", retryable=True)
                    smtp.login(sub.username, self._password)
                refused = smtp.send_message(msg, from_addr=sender, to_addrs=list(sub.to))
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{rcpt}: {_reply(c, m)}" for rcpt, (c, m) in exc.recipients.items())
            retryable = not all(_permanent(c) for c in codes)
            raise DeliveryError(f"{self._where()} refused every recipient: {detail}", retryable=retryable) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"{self._where()}: the server does not support {exc}; check smtp_security",
                                retryable=False) from exc
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{self._where()}: login as {sub.username} refused: {_reply(exc.smtp_code, exc.smtp_error)}; "
                "check username and the password variable", retryable=not _permanent(exc.smtp_code),
            ) from exc
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"{self._where()}: {_reply(exc.smtp_code, exc.smtp_error)}", retryable=not _permanent(exc.smtp_code)
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Disconnects, refused connections, timeouts and TLS failures: try again later.
            reason = str(exc) or type(exc).__name__
            raise DeliveryError(f"{self._where()}: {reason}; will retry", retryable=True) from exc
        if refused:
            log.warning("email %s: the server refused %d of %d recipients: %s", sub.name, len(refused), len(sub.to),
                        ", ".join(sorted(refused)), extra={"subscriber": sub.name, "delivery": delivery.key})
