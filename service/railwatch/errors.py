"""The exception tree of railwatch.

    RailwatchError
     ├── ConfigError            bad configuration (exit code 2); carries every problem found
     ├── AoiError               an AOI file that cannot be used; carries every problem found
     ├── ProviderError          imagery could not be searched or fetched
     │    ├── ProviderUnavailable   transient (429, 5xx, timeout): retry later   [retryable]
     │    ├── CredentialsError      401/403: the credentials in the config are wrong
     │    ├── QuotaExceeded         the monthly processing-unit budget is spent
     │    └── SceneUnreadable       one scene's file is corrupt or breaks the archive contract
     ├── StoreError             the database cannot be reached or migrated
     └── DeliveryError          a notification could not be sent            [retryable flag]

Adapters translate library exceptions into these in one place (``raise X(...) from exc``).
"""

from __future__ import annotations

from collections.abc import Iterable


class RailwatchError(Exception):
    """Base of every error railwatch raises on purpose."""


class _ProblemList(RailwatchError):
    """An error that reports several problems at once (all of them, not the first)."""

    def __init__(self, problems: Iterable[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            msg = head + self.problems[0]
        else:
            msg = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class ConfigError(_ProblemList):
    """The configuration is invalid; every problem is listed."""


class AoiError(_ProblemList):
    """An AOI file is invalid; every problem is listed."""


class ProviderError(RailwatchError):
    """Imagery could not be searched or fetched."""

    retryable = False


class ProviderUnavailable(ProviderError):
    """A transient provider failure (rate limit, server error, timeout)."""

    retryable = True


class CredentialsError(ProviderError):
    """The provider refused our credentials."""


class QuotaExceeded(ProviderError):
    """The configured processing-unit budget is spent for this period."""


class SceneUnreadable(ProviderError):
    """A scene file is corrupt or breaks the archive contract."""


class StoreError(RailwatchError):
    """The database cannot be reached, migrated or written."""


class DeliveryError(RailwatchError):
    """A notification could not be delivered."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
