"""Standard Webhooks signatures (https://www.standardwebhooks.com/), version ``v1``.

``webhook-signature: v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">``, keyed
with the base64-decoded part of the ``whsec_…`` secret after the prefix. While a secret rotates,
one signature per secret, separated by spaces; a receiver accepts any one that matches. Pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from railwatch.alerts.subscribers import decode_webhook_secret

__all__ = ["sign", "signature_header", "signed_headers"]


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature with the raw HMAC ``key``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per ``whsec_…`` secret, space-separated."""
    if not secrets:
        raise ValueError("at least one secret is needed to sign")
    return " ".join(sign(decode_webhook_secret(s), msg_id, timestamp, body) for s in secrets)


def signed_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> Mapping[str, str]:
    """The three Standard Webhooks headers for one request."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature_header(secrets, msg_id, int(timestamp), body),
    }
