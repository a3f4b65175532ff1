"""Subscriber and delivery configuration: the ``[[subscribers]]`` and ``[delivery]`` TOML sections.

A subscriber is an email recipient list or a webhook endpoint, with filters saying which alert
events reach it. Secrets are never values here: ``password_env`` and ``secret_env`` name the
environment variables that hold them. When the configuration is loaded with an environment (the
pydantic validation context ``{"environ": ...}`` that :func:`railwatch.config.load_settings`
passes), a variable that is named but not set, or a webhook secret that is not a ``whsec_`` key,
is a configuration error; the message names the variable, never its value.

Pure: no I/O beyond reading the environment mapping handed in.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
import re
from collections.abc import Mapping
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "STATE_RANK",
    "DeliverySettings",
    "EmailSubscriber",
    "Subscriber",
    "SubscriberList",
    "WebhookSubscriber",
    "decode_webhook_secret",
    "is_loopback_host",
    "redact_url",
]

#: Alert states a ``min_state`` filter can name, in increasing order of certainty.
STATE_RANK: dict[str, int] = {"provisional": 0, "confirmed": 1}

_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"^{_LOCAL}@{_LABEL}(?:\.{_LABEL})*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: webhook paths and queries often carry tokens, so they never show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else "/"
    return f"{parts.scheme}://{host}{port}{tail}"


def decode_webhook_secret(value: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64-decoded text after ``whsec_``.

    Raises ValueError (without the value in the message) when it is not one.
    """
    if not value.startswith("whsec_"):
        raise ValueError("expected a secret starting with whsec_")
    raw = value[len("whsec_"):].strip()
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the part after whsec_ is not base64") from exc
    if len(key) < 16:
        raise ValueError("the key is shorter than 16 bytes (expected 24-64 random bytes)")
    return key


def _check_address(value: str, *, display_name: bool) -> str:
    value = value.strip()
    if any(c in value for c in "\r\n\0"):
        raise ValueError("an email address cannot contain line breaks")
    name, addr = parseaddr(value)
    if not display_name and name:
        raise ValueError(f"expected a bare address like ops@example.org, got {value!r}")
    if not addr or not _ADDRESS.match(addr) or (not name and addr != value):
        raise ValueError(f"not a valid email address: {value!r} (expected user@domain)")
    return value


def _environ(info: ValidationInfo) -> Mapping[str, str] | None:
    ctx = info.context
    if isinstance(ctx, Mapping):
        env = ctx.get("environ")
        if isinstance(env, Mapping):
            return env
    return None


def _check_var_name(var: str) -> str:
    if not _ENV_VAR.match(var):
        raise ValueError(f"expected the name of an environment variable (letters, digits, _), got {var!r}")
    return var


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _SubscriberBase(_Model):
    """Fields every subscriber has: a unique name and the filters that route events to it."""

    name: str
    #: AOI ids or shell-style globs (``tumangang-*``); the default matches every AOI.
    aois: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    #: The least certain alert state that notifies: ``confirmed`` skips provisional alerts.
    min_state: Literal["provisional", "confirmed"] = "provisional"
    #: Also send ``alert.resolved`` notices (only for alerts this subscriber was told about).
    resolved: bool = True
    #: Also send ``alert.stale`` notices (no usable imagery for an AOI for too long).
    stale: bool = True
    #: Most notifications per rolling hour; beyond it, due events go out as one digest.
    max_per_hour: int | None = Field(None, ge=1, le=10_000)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"expected 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, got {v!r}")
        return v

    @field_validator("aois")
    @classmethod
    def _valid_globs(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not p.strip()]
        if bad:
            raise ValueError("an AOI pattern cannot be empty")
        return v

    def matches_aoi(self, aoi_id: str) -> bool:
        return any(fnmatch.fnmatchcase(aoi_id, pattern) for pattern in self.aois)

    def wants(self, *, aoi_id: str, event_type: str, alert_kind: str, state: str, told_before: bool) -> bool:
        """Whether an event routes to this subscriber.

        ``state`` is the alert's state when the event happened; ``told_before`` whether this
        subscriber already has a delivery for the alert (a resolution notice goes only to those).
        """
        if not self.matches_aoi(aoi_id):
            return False
        if event_type == "alert.resolved":
            return self.resolved and told_before
        if alert_kind == "stale" or event_type == "alert.stale":
            return self.stale
        if event_type == "alert.confirmed":
            state = "confirmed"
        return STATE_RANK.get(state, -1) >= STATE_RANK[self.min_state]


class EmailSubscriber(_SubscriberBase):
    """``kind = "email"``: one multipart message per event to every address in ``to``."""

    kind: Literal["email"]
    to: list[str] = Field(min_length=1)
    from_: str = Field(alias="from")
    smtp_host: str
    #: Defaults by security mode: 25 (none), 587 (starttls), 465 (tls).
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_security: Literal["none", "starttls", "tls"] = Field("starttls", validate_default=True)
    #: A PEM file of extra CA certificates (a private relay's CA); the system store otherwise.
    smtp_ca_file: Path | None = None
    username: str | None = None
    password_env: str | None = Field(None, validate_default=True)

    @field_validator("to")
    @classmethod
    def _valid_to(cls, v: list[str]) -> list[str]:
        return [_check_address(a, display_name=False) for a in v]

    @field_validator("from_")
    @classmethod
    def _valid_from(cls, v: str) -> str:
        return _check_address(v, display_name=True)

    @field_validator("smtp_host")
    @classmethod
    def _valid_host(cls, v: str) -> str:
        if not v or any(c.isspace() or c in "/@" for c in v):
            raise ValueError(f"expected a host name or address, got {v!r}")
        return v

    @field_validator("smtp_security")
    @classmethod
    def _encrypted_unless_loopback(cls, v: str, info: ValidationInfo) -> str:
        host = info.data.get("smtp_host")
        if v == "none" and host is not None and not is_loopback_host(host):
            raise ValueError(
                f'"none" sends mail and password in clear text and is allowed only to a loopback host; use '
                f'"starttls" or "tls" (got "none" with smtp_host {host!r})'
            )
        return v

    @field_validator("password_env")
    @classmethod
    def _password_set(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "username" in info.data and (info.data["username"] is None) != (v is None):
            have = "username without password_env" if v is None else "password_env without username"
            raise ValueError(f"username and password_env go together: set both to log in, or neither (got {have})")
        if v is None:
            return v
        _check_var_name(v)
        env = _environ(info)
        if env is not None and not env.get(v):
            raise ValueError(f"the environment variable {v} is not set; export it or remove password_env")
        return v

    @property
    def port(self) -> int:
        if self.smtp_port is not None:
            return self.smtp_port
        return {"none": 25, "starttls": 587, "tls": 465}[self.smtp_security]

    @property
    def sender_domain(self) -> str:
        """The domain of ``from``, used for Message-IDs."""
        return parseaddr(self.from_)[1].rpartition("@")[2].lower() or "railwatch.invalid"


class WebhookSubscriber(_SubscriberBase):
    """``kind = "webhook"``: a JSON POST signed per the Standard Webhooks specification."""

    kind: Literal["webhook"]
    #: Permit a plain http:// URL to a non-loopback host (the payload then travels unencrypted).
    allow_http: bool = False
    url: str
    #: The variable holding the ``whsec_…`` secret; a list of variables while a secret rotates
    #: (every request then carries one signature per secret).
    secret_env: str | list[str]
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str, info: ValidationInfo) -> str:
        # Messages show the URL redacted (its path may hold a token) and say "got" themselves.
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an https:// URL, got {redact_url(v) if parts.hostname else 'something else'}")
        if parts.username or parts.password:
            raise ValueError("credentials in the webhook URL are not supported, the request is signed instead "
                             f"(got user info in {redact_url(v)})")
        if parts.scheme == "http" and not info.data.get("allow_http") and not is_loopback_host(parts.hostname):
            raise ValueError(
                "expected an https:// URL (plain http:// only to a loopback host, or with allow_http = true "
                f"to accept sending alerts unencrypted), got {redact_url(v)}"
            )
        return v

    @field_validator("secret_env")
    @classmethod
    def _secrets_set(cls, v: str | list[str], info: ValidationInfo) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("at least one variable is needed")
        if len(names) > 5:
            raise ValueError("at most 5 secrets at once (one per signature)")
        env = _environ(info)
        for var in names:
            _check_var_name(var)
            if env is None:
                continue
            value = env.get(var)
            if not value:
                raise ValueError(f"the environment variable {var} is not set; export the whsec_… secret in it")
            try:
                decode_webhook_secret(value)
            except ValueError as exc:
                raise ValueError(f"the environment variable {var} does not hold a Standard Webhooks secret: {exc}") from None
        return v

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = {"content-type", "content-length", "host", "user-agent", "webhook-id", "webhook-timestamp",
                    "webhook-signature"}
        for name, value in v.items():
            if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", name):
                raise ValueError(f"not a valid header name: {name!r}")
            if name.lower() in reserved:
                raise ValueError(f"header {name!r} is set by railwatch and cannot be overridden")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: a value cannot contain line breaks")
        return v

    def __repr_args__(self) -> Any:
        # The URL path and header values may carry tokens: reprs (and so logs) show neither.
        for name, value in super().__repr_args__():
            if name == "url":
                yield name, redact_url(str(value))
            elif name == "headers":
                yield name, {k: "…" for k in value}
            else:
                yield name, value

    @property
    def secret_vars(self) -> list[str]:
        return [self.secret_env] if isinstance(self.secret_env, str) else list(self.secret_env)


def _kind(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else None


#: One ``[[subscribers]]`` entry, by its ``kind``.
Subscriber = Annotated[
    Annotated[EmailSubscriber, Tag("email")] | Annotated[WebhookSubscriber, Tag("webhook")],
    Discriminator(
        _kind,
        custom_error_type="subscriber_kind",
        custom_error_message='expected kind = "email" or kind = "webhook" (got another kind or none)',
    ),
]


def _unique_names(subs: list[EmailSubscriber | WebhookSubscriber]) -> list[EmailSubscriber | WebhookSubscriber]:
    seen: set[str] = set()
    dupes = sorted({s.name for s in subs if s.name in seen or seen.add(s.name)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"subscriber names must be unique (got {', '.join(dupes)} more than once)")
    return subs


#: The type of ``Settings.subscribers``: a list of subscribers with unique names.
SubscriberList = Annotated[list[Subscriber], AfterValidator(_unique_names)]


class DeliverySettings(_Model):
    """``[delivery]``: how the outbox retries, bounds and paces notifications."""

    #: Give up (state ``dead``) when a delivery has failed for this long.
    horizon_hours: float = Field(24.0, gt=0, le=24 * 30)
    #: First retry after about this long; doubled each attempt, with jitter, up to the maximum.
    backoff_initial_seconds: float = Field(30.0, gt=0)
    backoff_max_seconds: float = Field(3600.0, gt=0)
    #: Longest honoured Retry-After; a receiver asking for longer is retried after this.
    retry_after_max_seconds: float = Field(6 * 3600.0, gt=0)
    #: Bound on every network step of one send (connect, TLS, each read and write).
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: Deliveries one dispatcher run claims at most.
    batch_size: int = Field(100, ge=1, le=10_000)
    #: A claimed delivery whose dispatcher vanished is claimable again after this long.
    claim_lease_seconds: float = Field(300.0, ge=30)
    #: Send ``alert.reminder`` when an open alert has had no event for this long (unset: never).
    reminder_hours: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _lease_covers_send(self) -> DeliverySettings:
        # A send can spend a few timeouts (connect, TLS, data); the lease must outlast it.
        if self.claim_lease_seconds < 4 * self.timeout_seconds:
            raise ValueError(f"claim_lease_seconds must be at least 4 x timeout_seconds (got "
                             f"{self.claim_lease_seconds:g} and {self.timeout_seconds:g})")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError(f"backoff_max_seconds must be at least backoff_initial_seconds (got "
                             f"{self.backoff_max_seconds:g} and {self.backoff_initial_seconds:g})")
        return self

