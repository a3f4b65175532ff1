"""The webhook adapter: one signed JSON POST per delivery (httpx).

2xx is delivered; 408, 429, 5xx, timeouts and connection failures are retryable (Retry-After
honoured); a redirect is never followed, and it and every other 4xx are permanent, with the
reason. Every network step is bounded by the configured timeout. Error messages show the URL as
``scheme://host/…`` only: webhook paths often carry tokens.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime

import httpx

from railwatch import __version__
from railwatch.alerts.payload import Delivery, encode
from railwatch.alerts.signing import signed_headers
from railwatch.alerts.subscribers import WebhookSubscriber, redact_url
from railwatch.errors import DeliveryError

__all__ = ["WebhookNotifier", "parse_retry_after"]

log = logging.getLogger(__name__)

#: How much of a receiver's error answer is kept for the delivery's last_error.
_SNIPPET = 300


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _snippet(raw: bytes) -> str:
    text = raw[:_SNIPPET].decode("utf-8", "replace")
    return re.sub(r"\s+", " ", re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)).strip()


class WebhookNotifier:
    """Posts deliveries to one webhook subscriber."""

    def __init__(
        self,
        subscriber: WebhookSubscriber,
        secrets: Sequence[str],
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("a webhook needs at least one secret")
        self.subscriber = subscriber
        self._secrets = tuple(secrets)
        self._timeout = timeout
        self._clock = clock
        self._transport = transport

    def __repr__(self) -> str:
        return f"WebhookNotifier({self.subscriber.name!r}, {redact_url(self.subscriber.url)!r})"

    def _where(self) -> str:
        return f"webhook {self.subscriber.name} ({redact_url(self.subscriber.url)})"

    def _scrub(self, text: str) -> str:
        return text.replace(self.subscriber.url, redact_url(self.subscriber.url))

    def send(self, delivery: Delivery) -> None:
        sub = self.subscriber
        body = encode(delivery.payload)
        timestamp = int(self._clock())
        headers = {
            **sub.headers,
            "content-type": "application/json",
            "user-agent": f"railwatch/{__version__}",
            **signed_headers(self._secrets, delivery.key, timestamp, body),
        }
        try:
            with httpx.Client(
                timeout=httpx.Timeout(self._timeout),
                follow_redirects=False,
                trust_env=False,
                transport=self._transport,
            ) as client, client.stream("POST", sub.url, content=body, headers=headers) as resp:
                head = b""
                for chunk in resp.iter_bytes():
                    head += chunk
                    if len(head) >= _SNIPPET:
                        break
                status = resp.status_code
                retry_after = parse_retry_after(resp.headers.get("retry-after"), self._clock())
                location = resp.headers.get("location")
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                f"{self._where()} timed out after {self._timeout:g} s ({type(exc).__name__}); will retry",
                retryable=True,
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise DeliveryError(f"{self._where()}: unusable URL: {self._scrub(str(exc))}", retryable=False) from exc
        except httpx.TransportError as exc:
            raise DeliveryError(
                f"{self._where()} unreachable: {self._scrub(str(exc)) or type(exc).__name__}; will retry",
                retryable=True,
            ) from exc

        if 200 <= status < 300:
            log.debug("webhook %s accepted delivery %s (HTTP %d)", sub.name, delivery.key, status,
                      extra={"subscriber": sub.name, "delivery": delivery.key, "status": status})
            return
        answer = _snippet(head)
        detail = f"HTTP {status}" + (f": {answer}" if answer else "")
        if status in (408, 429) or status >= 500:
            wait = f"; Retry-After {retry_after:g} s" if retry_after is not None else ""
            raise DeliveryError(f"{self._where()} answered {detail}{wait}", retryable=True, retry_after=retry_after)
        if 300 <= status < 400:
            to = f" to {redact_url(location) if '://' in location else 'a relative location'}" if location else ""
            raise DeliveryError(
                f"{self._where()} answered HTTP {status}, a redirect{to}; redirects are not followed: "
                "configure the final URL", retryable=False,
            )
        raise DeliveryError(f"{self._where()} refused the delivery: {detail}", retryable=False)
