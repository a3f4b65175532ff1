"""Sentinel Hub / Copernicus Data Space Ecosystem provider (sentinelhub-py): Catalog search, Process fetch.

``search`` asks the Catalog API for the acquisitions over an AOI and groups the granules of one
datatake into one :class:`~railwatch.domain.SceneRef`. ``fetch`` asks the Process API for exactly the
AOI grid (:func:`railwatch.geo.aoi_grid`: UTM, 10 m), writes the answer into the local archive
(:mod:`railwatch.imagery.archive`) and returns what it reads back, so every download is made once
and the archive replays with the ``files`` provider.

Only this module talks to sentinelhub-py. Every request goes through :meth:`_send`, which owns the
retries (429 and 5xx with backoff, jitter and ``Retry-After``), the concurrency cap and the
processing-unit accounting; library exceptions become railwatch errors in :func:`_translate` alone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt
import requests

from railwatch.domain import COLLECTIONS, S1, S2, Aoi, Raster, SceneRef, iso, utc
from railwatch.errors import (
    ConfigError,
    CredentialsError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    SceneUnreadable,
)
from railwatch.geo import Grid, aoi_grid
from railwatch.imagery.archive import cached_fetch, orbit_tags, quiet_warnings

if TYPE_CHECKING:
    from sentinelhub import DataCollection, SHConfig
    from sentinelhub.download.models import DownloadRequest, DownloadResponse
    from sentinelhub.download.session import SentinelHubSession

    from railwatch.config import Settings

log = logging.getLogger(__name__)

SECRET_KEY = "imagery.sentinelhub.client_secret_env"

#: Endpoint presets: (base URL, OAuth token URL).
PRESETS: Mapping[str, tuple[str, str]] = {
    "cdse": (
        "https://sh.dataspace.copernicus.eu",
        "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token",
    ),
    "sentinel-hub": (
        "https://services.sentinel-hub.com",
        "https://services.sentinel-hub.com/auth/realms/main/protocol/openid-connect/token",
    ),
}

#: Granules of one collection closer than this belong to one acquisition (one datatake passes an
#: AOI in seconds; the next pass over the same place is at least a day later).
ACQUISITION_WINDOW = timedelta(minutes=10)
#: Margin around an acquisition's granule times for the Process API time range.
TIME_MARGIN = timedelta(minutes=1)

#: Sentinel-2 L2A: reflectance x 10000 as UINT16 (harmonised: no +1000 offset from baseline 04.00 on,
#: ``harmonizeValues: true``); SCL and dataMask as UINT8. Two outputs, so the reply is a tar.
S2_EVALSCRIPT = """//VERSION=3
function setup() {
  return {
    input: [{bands: ["B02", "B03", "B04", "B08", "SCL", "dataMask"]}],
    output: [
      {id: "bands", bands: 4, sampleType: "UINT16"},
      {id: "scl", bands: 2, sampleType: "UINT8"}
    ]
  };
}
function evaluatePixel(s) {
  return {
    bands: [10000 * s.B02, 10000 * s.B03, 10000 * s.B04, 10000 * s.B08],
    scl: [s.SCL, s.dataMask]
  };
}
"""
S2_OUTPUTS: Mapping[str, tuple[str, ...]] = {"bands": ("B02", "B03", "B04", "B08"), "scl": ("SCL", "dataMask")}

#: Sentinel-1 GRD IW: linear sigma0 (ellipsoid), orthorectified, FLOAT32; dataMask as UINT8.
S1_EVALSCRIPT = """//VERSION=3
function setup() {
  return {
    input: [{bands: ["VV", "VH", "dataMask"]}],
    output: [
      {id: "default", bands: 2, sampleType: "FLOAT32"},
      {id: "dataMask", bands: 1, sampleType: "UINT8"}
    ]
  };
}
function evaluatePixel(s) {
  return {default: [s.VV, s.VH], dataMask: [s.dataMask]};
}
"""
S1_OUTPUTS: Mapping[str, tuple[str, ...]] = {"default": ("VV", "VH"), "dataMask": ("dataMask",)}

#: Input bands billed per collection (``dataMask`` is free) and whether any output is FLOAT32.
_BILLING: Mapping[str, tuple[int, bool, bool]] = {S2: (5, False, False), S1: (2, True, True)}

#: Per-satellite offsets of ``relative = (absolute - offset) % 175 + 1`` (see relative_orbit()).
_ORBIT_OFFSETS: Mapping[str, int] = {"S1A": 73, "S1B": 27, "S1D": 42}
#: Sentinel-1C was manoeuvred between 2026-06-09 and 2026-06-23 to its final phasing with S1D.
_S1C_MANOEUVRE = (datetime(2026, 6, 9, tzinfo=UTC), datetime(2026, 6, 24, tzinfo=UTC))

_COLLECTION_NAMES = {S2: "RAILWATCH_SENTINEL2_L2A", S1: "RAILWATCH_SENTINEL1_IW"}
_define_lock = threading.Lock()


# --------------------------------------------------------------------------------------------- pure


def processing_units(
    width: int, height: int, *, input_bands: int, float32: bool, orthorectify: bool = False, samples: int = 1
) -> float:
    """Processing units of one Process API request, by the documented multiplication factors.

    PU = max(0.01, width*height / 512²) x (input bands / 3, dataMask not counted) x (2 for a
    FLOAT32 output, else 1) x samples x (2 when orthorectified), and at least 0.005 per request
    (https://docs.sentinel-hub.com/api/latest/api/overview/processing-unit/).
    """
    area = max(width * height / 512.0**2, 0.01)
    pu = area * (input_bands / 3.0) * (2.0 if float32 else 1.0) * samples * (2.0 if orthorectify else 1.0)
    return max(pu, 0.005)


def request_units(collection: str, grid: Grid) -> float:
    """Processing units of this provider's Process API request for one scene of ``collection``."""
    bands, float32, ortho = _BILLING[collection]
    return processing_units(grid.width, grid.height, input_bands=bands, float32=float32, orthorectify=ortho)


def relative_orbit(platform: str | None, absolute_orbit: int | None, acquired: datetime) -> int | None:
    """Sentinel-1 relative orbit (track, 1..175) from the absolute orbit number, or None if unknown.

    ``(absolute - k) % 175 + 1`` with k = 73 for S1A and 27 for S1B (ESA), 42 for S1D; for S1C k = 172
    before its 2026 June orbital reconfiguration and 99 after it (MintPy ``orbit.py``; the Sentinel-1
    reconfiguration note of 2026-05-28). During the manoeuvre there is no nominal track: None.
    """
    if absolute_orbit is None or not platform:
        return None
    sat = platform.strip().upper().replace("SENTINEL-", "S")
    if sat == "S1C":
        t = utc(acquired)
        if _S1C_MANOEUVRE[0] <= t < _S1C_MANOEUVRE[1]:
            return None
        offset = 172 if t < _S1C_MANOEUVRE[0] else 99
    elif sat in _ORBIT_OFFSETS:
        offset = _ORBIT_OFFSETS[sat]
    else:
        return None
    return (int(absolute_orbit) - offset) % 175 + 1


def catalog_filter(collection: str, max_cloud_percent: float) -> dict[str, Any] | None:
    """The CQL2-JSON Catalog filter: Sentinel-1 IW dual-pol VV+VH high resolution; Sentinel-2 scene
    cloud cover at most ``max_cloud_percent`` (a cheap first cut; the detector judges the AOI).

    ``and`` only joins two or more terms (the API description requires ``minItems: 2``).
    """
    terms: list[dict[str, Any]] = []
    if collection == S1:
        for prop, value in (("sar:instrument_mode", "IW"), ("s1:polarization", "DV"), ("s1:resolution", "HIGH")):
            terms.append({"op": "=", "args": [{"property": prop}, value]})
    elif max_cloud_percent < 100:
        terms.append({"op": "<=", "args": [{"property": "eo:cloud_cover"}, max_cloud_percent]})
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else {"op": "and", "args": terms}


def _parse_time(value: str) -> datetime:
    return utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


def _round_second(t: datetime) -> datetime:
    whole = t.replace(microsecond=0)
    return whole + timedelta(seconds=1) if t.microsecond >= 500_000 else whole


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def group_acquisitions(
    aoi_id: str,
    collection: str,
    features: Iterable[Mapping[str, Any]],
    window: timedelta = ACQUISITION_WINDOW,
) -> list[SceneRef]:
    """One SceneRef per acquisition: granules of one platform within ``window`` of the first.

    ``acquired`` is the earliest granule time rounded to the second (UTC). Sentinel-1 refs carry the
    orbit direction and relative orbit (``sat:relative_orbit``, else derived from
    ``sat:absolute_orbit``). ``extra`` keeps the item ids and the granule time span for ``fetch``.
    """
    items = []
    for f in features:
        props = f.get("properties") or {}
        if "datetime" not in props:
            continue
        items.append((_parse_time(str(props["datetime"])), str(f.get("id", "")), props))
    items.sort(key=lambda x: x[0])
    groups: list[list[tuple[datetime, str, Mapping[str, Any]]]] = []
    for item in items:
        if groups:
            first = groups[-1][0]
            same_platform = (first[2].get("platform") or "") == (item[2].get("platform") or "")
            if item[0] - first[0] <= window and same_platform:
                groups[-1].append(item)
                continue
        groups.append([item])
    refs: list[SceneRef] = []
    for group in groups:
        start, end = group[0][0], group[-1][0]
        props = group[0][2]
        platform = props.get("platform")
        direction: str | None = None
        rel: int | None = None
        if collection == S1:
            for _, _, p in group:
                state = str(p.get("sat:orbit_state") or "").lower()
                direction = direction or (state if state in ("ascending", "descending") else None)
                rel = rel or _int_or_none(p.get("sat:relative_orbit")) or relative_orbit(
                    p.get("platform"), _int_or_none(p.get("sat:absolute_orbit")), start)
        clouds = [float(p["eo:cloud_cover"]) for _, _, p in group if p.get("eo:cloud_cover") is not None]
        ids = [i for _, i, _ in group]
        refs.append(SceneRef(
            aoi_id=aoi_id, collection=collection, acquired=_round_second(start), source=";".join(ids),
            orbit_direction=direction, relative_orbit=rel,
            extra={"item_ids": ids, "time_from": iso(start), "time_to": iso(end), "platform": platform,
                   "cloud_cover": min(clouds) if clouds else None},
        ))
    return refs


class UsageRow(NamedTuple):
    """Requests and processing units spent for one AOI and collection in one calendar month (UTC)."""

    aoi_id: str
    collection: str
    month: str
    requests: int
    processing_units: float


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


# ------------------------------------------------------------------------------- error translation


_QUOTA_WORDS = re.compile(r"quota|exceeded|limit", re.I)


def _server_message(response: requests.Response | None) -> str:
    if response is None:
        return ""
    from sentinelhub.decoding import decode_sentinelhub_err_msg

    try:
        msg = decode_sentinelhub_err_msg(response)
    except Exception:  # a garbled error body must not hide the status code
        msg = ""
    return " ".join(str(msg).split())[:300]


def _translate(exc: BaseException, what: str, *, settings_hint: str, attempts: int) -> ProviderError:
    """The one place where library and HTTP exceptions become railwatch errors."""
    from oauthlib.oauth2 import OAuth2Error
    from sentinelhub.exceptions import DownloadFailedException, MissingDataInRequestException

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, DownloadFailedException) and exc.request_exception is not None:
        return _translate(exc.request_exception, what, settings_hint=settings_hint, attempts=attempts)
    if isinstance(exc, requests.HTTPError):
        response = exc.response
        status = response.status_code if response is not None else 0
        url = _redact(response.url) if response is not None and response.url else "the service"
        server = _server_message(response)
        detail = f": {server}" if server else ""
        if status == 403 and _QUOTA_WORDS.search(server):
            # Sentinel Hub answers 403, not 429, once the account's monthly quota is spent.
            return QuotaExceeded(f"{what}: the account's processing-unit or request quota is spent ({url} answered "
                                 f"403{detail}); railwatch tries again at the next poll. See the Sentinel Hub / "
                                 "CDSE dashboard for the account's quotas.")
        if status in (401, 403):
            return CredentialsError(
                f"{what}: {url} answered {status}{detail}. Check {settings_hint}.")
        if status == 429:
            return ProviderUnavailable(f"{what}: rate limited by {url} (429) after {attempts} attempt(s); "
                                       "retrying at the next poll")
        if status >= 500:
            return ProviderUnavailable(f"{what}: {url} answered {status} after {attempts} attempt(s){detail}")
        return ProviderError(f"{what}: {url} refused the request ({status}){detail}")
    if isinstance(exc, OAuth2Error):
        return CredentialsError(f"{what}: the token endpoint refused the credentials ({exc.error}). "
                                f"Check {settings_hint}.")
    if isinstance(exc, requests.Timeout):
        return ProviderUnavailable(f"{what}: timed out after {attempts} attempt(s)")
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return ProviderUnavailable(f"{what}: connection failed after {attempts} attempt(s): "
                                   f"{type(exc).__name__}")
    if isinstance(exc, DownloadFailedException):
        return ProviderUnavailable(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if isinstance(exc, (MissingDataInRequestException, KeyError, ValueError, TypeError)):
        return ProviderError(f"{what}: unexpected answer from the service ({type(exc).__name__}: {exc})")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------- provider


def _collection(collection: str) -> DataCollection:
    """The sentinelhub-py collection, defined once per process with ``service_url=None``.

    Built-in collections pin ``services.sentinel-hub.com``; ``service_url=None`` lets the
    configured base URL (CDSE, Sentinel Hub or a test double) decide.
    """
    from sentinelhub import DataCollection

    with _define_lock:
        base = DataCollection.SENTINEL2_L2A if collection == S2 else DataCollection.SENTINEL1_IW
        return base.define_from(_COLLECTION_NAMES[collection], service_url=None)


@functools.cache
def _client_class() -> type:
    """``SentinelHubDownloadClient`` with its download step replaced by the provider's ``_send``
    (retries, concurrency cap, accounting); decoding, paging and request building stay the library's."""
    from sentinelhub import SentinelHubDownloadClient

    class _Client(SentinelHubDownloadClient):  # type: ignore[misc]
        def __init__(self, provider: SentinelHubProvider, ctx: _Context) -> None:
            super().__init__(config=provider._config)
            self._provider = provider
            self._ctx = ctx

        def _execute_download(self, request: DownloadRequest) -> DownloadResponse:
            return self._provider._send(request, self._ctx)

    return _Client


@dataclass
class _Context:
    """Who a request is for (usage accounting) and its processing-unit estimate."""

    aoi_id: str
    collection: str
    pu_estimate: float = 0.0


class SentinelHubProvider:
    """Scenes from Sentinel Hub or CDSE, cached in the local archive.

    ``usage`` lists (aoi_id, collection, month, requests, processing_units); ``spent_this_month``
    is the processing units spent in the current UTC month (the caller may seed it from its store)
    and is checked against ``monthly_pu_budget`` before every Process API request.

    Calls may come from several threads at once (the executor's AOI threads, a pass's read-ahead
    thread): the usage, the spent units, the budget reservations and the OAuth session are held
    under one lock, each request under the concurrency cap, and a request reserves its estimate
    before it is sent, so concurrent requests cannot overrun the budget together.
    """

    name = "sentinelhub"

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        archive_root: Path | str,
        base_url: str = PRESETS["cdse"][0],
        token_url: str = PRESETS["cdse"][1],
        secret_env: str = "RAILWATCH_SENTINELHUB_CLIENT_SECRET",
        max_scene_cloud_percent: float = 90.0,
        max_attempts: int = 4,
        backoff_seconds: float = 2.0,
        backoff_max_seconds: float = 120.0,
        timeout_seconds: float = 120.0,
        monthly_pu_budget: float | None = None,
        max_concurrent_requests: int = 4,
        catalog_page_size: int = 100,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        read_threads: int = 1,
    ) -> None:
        from sentinelhub import SHConfig

        self.archive_root = Path(archive_root)
        self.read_threads = read_threads  # GDAL threads decoding an archived scene ([imagery] read_threads)
        self.base_url = base_url.rstrip("/")
        self.token_url = token_url
        self.secret_env = secret_env
        self.max_scene_cloud_percent = max_scene_cloud_percent
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.timeout_seconds = timeout_seconds
        self.monthly_pu_budget = monthly_pu_budget
        self.catalog_page_size = catalog_page_size
        self._client_id = client_id
        self._secret = client_secret
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self.max_concurrent_requests = max_concurrent_requests
        self._slots = threading.BoundedSemaphore(max_concurrent_requests)
        #: An extra lease held around every request, shared beyond this process (the Dask executor
        #: sets a ``distributed.Semaphore`` here: a cluster-wide cap); None = this process's cap only.
        self.shared_slots: contextlib.AbstractContextManager[Any] | None = None
        self._lock = threading.Lock()
        self._session: SentinelHubSession | None = None
        self._usage: dict[tuple[str, str, str], list[float]] = {}
        self._spent = 0.0
        self._reserved = 0.0
        self._spent_month = self._month()
        if token_url.startswith("http://") or self.base_url.startswith("http://"):
            # requests-oauthlib refuses http:// token URLs; config allows http only to loopback.
            os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
        # Explicit config: never read or write ~/.config/sentinelhub. Token fetches retry with these
        # settings; data requests retry in _send.
        self._config: SHConfig = SHConfig(
            use_defaults=True,
            sh_client_id=client_id,
            sh_client_secret=client_secret,
            sh_base_url=self.base_url,
            sh_token_url=token_url,
            max_download_attempts=max_attempts,
            download_sleep_time=backoff_seconds,
            max_retries=max_attempts,
            download_timeout_seconds=timeout_seconds,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SentinelHubProvider:
        """Build from ``[imagery.sentinelhub]``; ConfigError names the missing key or variable."""
        from railwatch.config import require_secret

        sh = settings.imagery.sentinelhub
        if not sh.client_id:
            raise ConfigError(["[imagery.sentinelhub] client_id: not set (the OAuth client id of your "
                               "Sentinel Hub / CDSE account; see docs/providers.md)"], source=settings.source)
        secret = require_secret(settings, SECRET_KEY)
        base, token = endpoints(settings)
        kwargs: dict[str, Any] = dict(
            client_id=sh.client_id, client_secret=secret, archive_root=settings.imagery.files.root,
            read_threads=settings.imagery.read_threads,
            base_url=base, token_url=token, secret_env=sh.client_secret_env,
            max_scene_cloud_percent=sh.max_scene_cloud_percent, max_attempts=sh.max_attempts,
            backoff_seconds=sh.backoff_seconds, backoff_max_seconds=sh.backoff_max_seconds,
            timeout_seconds=sh.timeout_seconds, monthly_pu_budget=sh.monthly_pu_budget,
            max_concurrent_requests=sh.max_concurrent_requests, catalog_page_size=sh.catalog_page_size,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"SentinelHubProvider(base_url={self.base_url!r}, client_id={self._client_id!r})"

    # -------------------------------------------------------------------------------- accounting

    def _month(self) -> str:
        return utc(self._clock()).strftime("%Y-%m")

    @property
    def spent_this_month(self) -> float:
        """Processing units spent in the current UTC month (resets when the month turns)."""
        with self._lock:
            self._roll_month()
            return self._spent

    @spent_this_month.setter
    def spent_this_month(self, value: float) -> None:
        with self._lock:
            self._spent_month = self._month()
            self._spent = float(value)

    def _roll_month(self) -> None:
        month = self._month()
        if month != self._spent_month:
            self._spent_month, self._spent = month, 0.0

    @property
    def usage(self) -> list[UsageRow]:
        """(aoi_id, collection, month, requests, processing_units) for every successful request."""
        with self._lock:
            return [UsageRow(a, c, m, int(v[0]), round(v[1], 6)) for (a, c, m), v in sorted(self._usage.items())]

    def drain_usage(self) -> list[UsageRow]:
        """``usage``, then forget it (for a caller that persists it)."""
        with self._lock:
            rows = [UsageRow(a, c, m, int(v[0]), round(v[1], 6)) for (a, c, m), v in sorted(self._usage.items())]
            self._usage.clear()
            return rows

    def _record(self, ctx: _Context, pu: float) -> None:
        with self._lock:
            self._roll_month()
            row = self._usage.setdefault((ctx.aoi_id, ctx.collection, self._spent_month), [0, 0.0])
            row[0] += 1
            row[1] += pu
            self._spent += pu

    @contextlib.contextmanager
    def _budgeted(self, estimate: float, what: str) -> Iterator[None]:
        """Reserve ``estimate`` PU of the monthly budget for one request (so concurrent requests
        cannot overrun it together), or raise QuotaExceeded before anything is sent."""
        if self.monthly_pu_budget is None:
            yield
            return
        with self._lock:
            self._roll_month()
            spent = self._spent + self._reserved
            if spent + estimate > self.monthly_pu_budget:
                now = utc(self._clock())
                nxt = (now.replace(day=1) + timedelta(days=32)).replace(day=1)
                raise QuotaExceeded(
                    f"{what}: the monthly processing-unit budget would be exceeded ({spent:.2f} of "
                    f"{self.monthly_pu_budget:g} PU spent in {self._spent_month}, this request needs "
                    f"~{estimate:.3f}); no request was sent. Raise [imagery.sentinelhub] monthly_pu_budget or "
                    f"wait until {nxt:%Y-%m-%d}.")
            self._reserved += estimate
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= estimate

    # ------------------------------------------------------------------------------------- HTTP

    @property
    def _settings_hint(self) -> str:
        return f"[imagery.sentinelhub] client_id / client_secret_env (the secret in ${self.secret_env})"

    def _get_session(self) -> SentinelHubSession:
        from sentinelhub.download.session import SentinelHubSession

        with self._lock:
            if self._session is None:
                # Our own session object: never the class-level cache shared by the whole process.
                self._session = SentinelHubSession(config=self._config)
            return self._session

    def _auth_headers(self) -> dict[str, str]:
        session = self._get_session()
        with self._lock:
            return session.session_headers

    def _client(self, ctx: _Context) -> Any:
        """A sentinelhub-py download client whose every HTTP request goes through :meth:`_send`."""
        return _client_class()(self, ctx)

    def _delay(self, attempt: int, retry_after_ms: float | None) -> float:
        """Exponential backoff with jitter; a ``Retry-After`` (milliseconds, as Sentinel Hub sends it)
        is a floor. Never more than ``backoff_max_seconds``."""
        base = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        delay = base * (0.5 + 0.5 * self._rng.random())
        if retry_after_ms is not None:
            delay = max(delay, retry_after_ms / 1000.0 * (1.0 + 0.1 * self._rng.random()))
        return min(delay, self.backoff_max_seconds)

    def _send(self, request: DownloadRequest, ctx: _Context) -> DownloadResponse:
        """One API call with retries: 429, 5xx, timeouts and broken connections are retried up to
        ``max_attempts`` times; anything else is raised at once (and translated by the caller)."""
        from sentinelhub.constants import SHConstants
        from sentinelhub.download.models import DownloadResponse

        if request.url is None:
            raise ProviderError("internal error: a request without URL")
        last: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            response: requests.Response | None = None
            # The token request (first call, or a refresh) is made inside the slot too, so the cap
            # holds for every request this provider sends; its own errors propagate as before.
            with self._slots, self.shared_slots or contextlib.nullcontext():
                headers = {**SHConstants.HEADERS, **(self._auth_headers() if request.use_session else {}),
                           **request.headers}
                try:
                    response = requests.request(
                        request.request_type.value, url=request.url, json=request.post_values,
                        headers=headers, timeout=self.timeout_seconds)
                    _ = response.content  # read the whole body inside the slot: a cut body raises here
                except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                    last, response = exc, None
            if response is not None:
                status = response.status_code
                if status == 429 or status >= 500:
                    last = requests.HTTPError(f"{status} from {_redact(request.url)}", response=response)
                    with contextlib.suppress(TypeError, ValueError):
                        retry_after = float(response.headers.get("Retry-After", ""))
                    if retry_after is None and status == 429:
                        retry_after = 0.0
                else:
                    response.raise_for_status()
                    pu = 0.0
                    if request.url.endswith("/process"):
                        header = response.headers.get("x-processingunits-spent")
                        try:
                            pu = float(header) if header is not None else ctx.pu_estimate
                        except ValueError:
                            pu = ctx.pu_estimate
                    self._record(ctx, pu)
                    return DownloadResponse.from_response(response, request)
            if attempt < self.max_attempts:
                delay = self._delay(attempt, retry_after)
                log.warning("Sentinel Hub request to %s failed (%s), attempt %d of %d; retrying in %.2f s",
                            _redact(request.url), _describe(last), attempt, self.max_attempts, delay,
                            extra={"aoi": ctx.aoi_id, "collection": ctx.collection})
                self._sleep(delay)
        assert last is not None
        raise last

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except ProviderError:
            raise
        except Exception as exc:
            err = _translate(exc, what, settings_hint=self._settings_hint, attempts=self.max_attempts)
            if self._secret and self._secret in str(err):
                err = type(err)(str(err).replace(self._secret, "********"))
            raise err from exc

    # ------------------------------------------------------------------------------------ search

    def search(
        self, aoi: Aoi, since: datetime, until: datetime, collections: Sequence[str] = COLLECTIONS
    ) -> list[SceneRef]:
        """Acquisitions over the AOI with ``since < acquired <= until``, one SceneRef per datatake."""
        from sentinelhub import CRS, BBox, SentinelHubCatalog

        lo, hi = utc(since), utc(until)
        refs: list[SceneRef] = []
        for collection in collections:
            if collection not in _COLLECTION_NAMES:
                raise ValueError(f"unknown collection {collection!r}; expected one of {list(_COLLECTION_NAMES)}")
            ctx = _Context(aoi.id, collection)
            with self._errors(f"Catalog search for {collection} over AOI {aoi.id} at {self.base_url}"):
                catalog = SentinelHubCatalog(config=self._config)
                catalog.client = self._client(ctx)
                # The collection goes by its id (not a DataCollection) so the whole filter is ours, and it
                # is set on the iterator's parameters because SentinelHubCatalog.search wraps even a single
                # term in an "and", which the API description forbids (minItems 2).
                pages = catalog.search(collection, time=(lo, hi), bbox=BBox(aoi.bbox, crs=CRS.WGS84),
                                       filter_lang="cql2-json", limit=self.catalog_page_size)
                flt = catalog_filter(collection, self.max_scene_cloud_percent)
                if flt is not None:
                    pages.params["filter"] = flt
                features = list(pages)
            refs.extend(r for r in group_acquisitions(aoi.id, collection, features) if lo < r.acquired <= hi)
        refs.sort(key=lambda r: (r.acquired, r.collection))
        log.info("Sentinel Hub: %d acquisition(s) over %s", len(refs), aoi.id, extra={"aoi": aoi.id})
        return refs

    # ------------------------------------------------------------------------------------- fetch

    def _time_range(self, ref: SceneRef) -> tuple[datetime, datetime]:
        extra = ref.extra or {}
        start = _parse_time(extra["time_from"]) if extra.get("time_from") else utc(ref.acquired)
        end = _parse_time(extra["time_to"]) if extra.get("time_to") else utc(ref.acquired) + ACQUISITION_WINDOW
        return start - TIME_MARGIN, end + TIME_MARGIN

    def process_request(self, aoi: Aoi, ref: SceneRef, grid: Grid | None = None) -> Any:
        """The ``SentinelHubRequest`` for one scene on the AOI grid (exact UTM bbox and size)."""
        from sentinelhub import CRS, BBox, MimeType, MosaickingOrder, SentinelHubRequest

        grid = grid or aoi_grid(aoi)
        if ref.collection == S2:
            evalscript, outputs = S2_EVALSCRIPT, S2_OUTPUTS
            processing: dict[str, Any] = {"harmonizeValues": True}
        else:
            evalscript, outputs = S1_EVALSCRIPT, S1_OUTPUTS
            processing = {"orthorectify": True, "backCoeff": "SIGMA0_ELLIPSOID"}
        left, bottom, right, top = grid.bounds
        return SentinelHubRequest(
            evalscript=evalscript,
            input_data=[SentinelHubRequest.input_data(
                _collection(ref.collection), time_interval=self._time_range(ref),
                mosaicking_order=MosaickingOrder.LEAST_RECENT, other_args={"processing": processing})],
            responses=[SentinelHubRequest.output_response(k, MimeType.TIFF) for k in outputs],
            bbox=BBox((left, bottom, right, top), crs=CRS(int(grid.crs.split(":")[1]))),
            size=(grid.width, grid.height),
            config=self._config,
        )

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster:
        """The scene on the AOI grid: from the archive if it is there, else one Process API request
        whose answer is archived first and read back."""
        return cached_fetch(self.archive_root, aoi.id, ref, lambda: self._download(aoi, ref),
                            threads=self.read_threads)

    def _download(self, aoi: Aoi, ref: SceneRef) -> Raster:
        grid = aoi_grid(aoi)
        what = f"Process request for {ref.scene_id} of AOI {aoi.id}"
        estimate = request_units(ref.collection, grid)
        ctx = _Context(aoi.id, ref.collection, estimate)
        with self._budgeted(estimate, what), self._errors(what):
            request = self.process_request(aoi, ref, grid)
            responses = self._client(ctx).download(request.download_list, max_threads=1, decode_data=False)
        return self._decode(responses[0].content, ref, grid, what)

    def _decode(self, content: bytes, ref: SceneRef, grid: Grid, what: str) -> Raster:
        outputs = S2_OUTPUTS if ref.collection == S2 else S1_OUTPUTS
        try:
            with tarfile.open(fileobj=io.BytesIO(content)) as tar:
                blobs = {}
                for ident in outputs:
                    member = tar.extractfile(f"{ident}.tif")
                    if member is None:
                        raise KeyError(f"{ident}.tif")
                    blobs[ident] = member.read()
        except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
            raise SceneUnreadable(f"{what}: the answer is not the expected tar of "
                                  f"{', '.join(k + '.tif' for k in outputs)} ({type(exc).__name__}: {exc})") from exc
        arrays: dict[str, npt.NDArray[Any]] = {}
        crs = transform = None
        for ident, names in outputs.items():
            data, crs, transform = _read_tiff(blobs[ident], f"{what}, {ident}.tif", grid, len(names))
            for name, band in zip(names, data, strict=True):
                arrays[name] = band
        valid = arrays.pop("dataMask") > 0
        tags: dict[str, str] = {"PROVIDER": "sentinelhub", "SOURCE_ITEMS": ref.source[:2000]}
        bands: dict[str, npt.NDArray[Any]] = {}
        if ref.collection == S2:
            tags["S2_HARMONIZED"] = "harmonizeValues=true (no +1000 offset from baseline 04.00 on)"
            for name in ("B02", "B03", "B04", "B08", "SCL"):
                bands[name] = np.where(valid, arrays[name], 0).astype(np.uint16)
        else:
            for name in ("VV", "VH"):
                bands[name] = np.where(valid, arrays[name].astype(np.float32), np.float32(np.nan)).astype(np.float32)
            tags |= orbit_tags(ref)
        return Raster(bands=bands, crs=crs, transform=transform, tags=tags)

    # ------------------------------------------------------------------------------------ checks

    def probe_catalog(self) -> None:
        """One tiny Catalog search (one page of at most one item): proves the token and the URL."""
        from sentinelhub import CRS, BBox, SentinelHubCatalog

        now = utc(self._clock())
        ctx = _Context("(check)", S2)
        with self._errors(f"Catalog search at {self.base_url}"):
            catalog = SentinelHubCatalog(config=self._config)
            catalog.client = self._client(ctx)
            it = catalog.search(S2, time=(now - timedelta(days=10), now),
                                bbox=BBox((2.35, 48.85, 2.36, 48.86), crs=CRS.WGS84), limit=1)
            next(iter(it), None)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def _read_tiff(blob: bytes, what: str, grid: Grid, count: int) -> tuple[npt.NDArray[Any], Any, Any]:
    """Bands, CRS and transform of one GeoTIFF answer; SceneUnreadable unless it is exactly ``grid``."""
    from rasterio.crs import CRS as RioCRS
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with contextlib.ExitStack() as stack:
            with quiet_warnings():  # opening and checking only: the lock is process-wide
                ds = stack.enter_context(stack.enter_context(MemoryFile(blob)).open())
                if ds.driver != "GTiff":
                    raise SceneUnreadable(f"{what}: not a GeoTIFF (GDAL read it as {ds.driver})")
                if ds.count < count:
                    raise SceneUnreadable(f"{what}: {ds.count} band(s), expected {count}")
                if ds.crs is None or ds.crs != RioCRS.from_user_input(grid.crs):
                    raise SceneUnreadable(f"{what}: CRS {ds.crs} differs from the requested {grid.crs}")
                if (ds.height, ds.width) != grid.shape:
                    raise SceneUnreadable(f"{what}: size {ds.width}x{ds.height} differs from the requested "
                                          f"{grid.width}x{grid.height}")
                t, g = ds.transform, grid.transform
                half = abs(g.a) / 2.0
                if abs(t.a - g.a) > 1e-6 or abs(t.e - g.e) > 1e-6 or abs(t.c - g.c) > half or abs(t.f - g.f) > half:
                    raise SceneUnreadable(f"{what}: transform {tuple(t)[:6]} differs from the requested grid")
                crs, transform = ds.crs, ds.transform
            # The pixels outside the lock, as in archive.read_scene: the executor's AOI threads and a
            # pass's read-ahead decompress their answers side by side.
            return ds.read(list(range(1, count + 1))), crs, transform
    except SceneUnreadable:
        raise
    except (RasterioError, OSError, ValueError) as exc:
        raise SceneUnreadable(f"{what}: corrupt GeoTIFF ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------ settings


def endpoints(settings: Settings) -> tuple[str, str]:
    """(base URL, token URL): the preset's, each overridden by ``base_url`` / ``token_url``."""
    sh = settings.imagery.sentinelhub
    base, token = PRESETS[sh.preset]
    return (sh.base_url or base).rstrip("/"), sh.token_url or token


def check_sentinelhub(settings: Settings) -> list[str]:
    """Problems with the Sentinel Hub configuration (empty list = OK): credentials present, a token
    from the token endpoint, and one tiny Catalog search. Never contains the secret."""
    sh = settings.imagery.sentinelhub
    problems: list[str] = []
    base, token_url = endpoints(settings)
    var = sh.client_secret_env
    if not sh.client_id:
        problems.append("[imagery.sentinelhub] client_id is not set (the OAuth client id of your account)")
    secret_value = settings.secrets.get(SECRET_KEY)
    if not var:
        problems.append("[imagery.sentinelhub] client_secret_env is empty: name the variable holding the secret")
    elif secret_value is None:
        problems.append(f"secret variable {var} not set ([imagery.sentinelhub] client_secret_env)")
    if problems:
        return problems
    assert secret_value is not None
    secret = secret_value.get_secret_value()
    if token_url.startswith("http://"):
        os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
    try:
        reply = requests.post(
            token_url,
            data={"grant_type": "client_credentials", "client_id": sh.client_id, "client_secret": secret},
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=min(sh.timeout_seconds, 30.0),
        )
    except requests.Timeout:
        return [f"cannot reach token endpoint {token_url}: timed out"]
    except requests.ConnectionError as exc:
        return [f"cannot reach token endpoint {token_url}: {_connection_reason(exc)}"]
    if reply.status_code in (400, 401, 403):
        return [f"token endpoint {token_url} answered {reply.status_code}: client_id or the secret in "
                f"${var} is wrong ([imagery.sentinelhub] client_id / client_secret_env)"]
    if reply.status_code != 200:
        return [f"token endpoint {token_url} answered {reply.status_code}; try again later or check token_url"]
    try:
        body = reply.json()
        ok = isinstance(body, dict) and bool(body.get("access_token"))
    except ValueError:
        ok = False
    if not ok:
        return [f"token endpoint {token_url} answered 200 without an access_token: is token_url right?"]
    provider = SentinelHubProvider.from_settings(settings, max_attempts=1, timeout_seconds=min(sh.timeout_seconds, 30.0))
    try:
        provider.probe_catalog()
    except CredentialsError as exc:
        problems.append(f"catalog search at {base} refused the token: {exc}")
    except ProviderUnavailable as exc:
        problems.append(f"cannot reach catalog at {base}: {exc}")
    except ProviderError as exc:
        problems.append(f"catalog search at {base} failed: {exc}")
    return [p.replace(secret, "********") for p in problems]


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "nodename nor servname",
                   "Temporary failure in name resolution", "certificate verify failed", "timed out"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


__all__ = [
    "PRESETS",
    "SentinelHubProvider",
    "UsageRow",
    "catalog_filter",
    "check_sentinelhub",
    "endpoints",
    "group_acquisitions",
    "processing_units",
    "relative_orbit",
    "request_units",
]
