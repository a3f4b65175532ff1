"""One validated settings model: TOML file + ``RAILWATCH_<SECTION>__<KEY>`` environment overrides.

Loaded once at start-up by :func:`load_settings`. Every problem (unknown key, wrong type, bad value,
missing secret) is collected and raised together as one :class:`~railwatch.errors.ConfigError`
naming the file, the key and what was expected.

Secrets are never values in the file: a key ending in ``_env`` names the environment variable that
holds the secret; the value is read at start-up into :class:`pydantic.SecretStr` and masked in every
repr, log line and ``config check`` output.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from railwatch.alerts.subscribers import DeliverySettings, SubscriberList
from railwatch.domain import COLLECTIONS
from railwatch.errors import ConfigError

DEFAULT_CONFIG = Path("config/railwatch.toml")
ENV_PREFIX = "RAILWATCH_"
CONFIG_ENV = "RAILWATCH_CONFIG"


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is a loopback name or address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AoiSettings(_Section):
    dir: Path = Path("aoi")
    max_area_km2: float = Field(100.0, gt=0)
    track_half_width_m: float = Field(6.0, gt=0, le=50)


class FilesSettings(_Section):
    root: Path = Path("var/archive")


class SentinelHubSettings(_Section):
    """``[imagery.sentinelhub]``: Sentinel Hub / Copernicus Data Space (docs/providers.md)."""

    preset: Literal["cdse", "sentinel-hub"] = "cdse"
    base_url: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret_env: str = "RAILWATCH_SENTINELHUB_CLIENT_SECRET"
    max_scene_cloud_percent: float = Field(90.0, ge=0, le=100)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(120.0, ge=0)
    timeout_seconds: float = Field(120.0, gt=0)
    monthly_pu_budget: float | None = Field(None, gt=0)
    max_concurrent_requests: int = Field(4, ge=1, le=64)
    catalog_page_size: int = Field(100, ge=1, le=100, description="Catalog API items per page (service maximum 100)")

    @field_validator("base_url", "token_url")
    @classmethod
    def _https_or_loopback(cls, v: str) -> str:
        if v and not v.startswith("https://") and not (v.startswith("http://") and is_loopback_url(v)):
            raise ValueError(f"expected an https:// URL (http:// only to a loopback host), got {v!r}")
        return v


#: Sentinel band name -> Earth Search asset key.
_STAC_DEFAULT_ASSETS = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl", "VV": "vv", "VH": "vh"}
_STAC_BANDS = frozenset(_STAC_DEFAULT_ASSETS)


class StacSettings(_Section):
    """``[imagery.stac]``: an open STAC API with Cloud-Optimised GeoTIFF assets (docs/providers.md).

    ``collections`` maps a sensor to the catalogue's collection id; a sensor left out is not searched
    (Earth Search's ``sentinel-1-grd`` is uncalibrated radar geometry, so Sentinel-1 is opt-in).
    """

    url: str = "https://earth-search.aws.element84.com/v1"
    collections: dict[str, str] = Field(default_factory=lambda: {"sentinel-2-l2a": "sentinel-2-l2a"})
    assets: dict[str, str] = Field(default_factory=lambda: dict(_STAC_DEFAULT_ASSETS))
    max_scene_cloud_percent: float = Field(90.0, ge=0, le=100)
    page_size: int = Field(100, ge=1, le=1000)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_seconds: float = Field(2.0, ge=0)
    timeout_seconds: float = Field(120.0, gt=0)

    @field_validator("url")
    @classmethod
    def _https_or_loopback(cls, v: str) -> str:
        if not v.startswith("https://") and not (v.startswith("http://") and is_loopback_url(v)):
            raise ValueError(f"expected an https:// URL (http:// only to a loopback host), got {v!r}")
        return v

    @field_validator("collections")
    @classmethod
    def _known_collections(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k not in COLLECTIONS]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}; expected keys from {list(COLLECTIONS)}")
        return v

    @field_validator("assets")
    @classmethod
    def _known_bands(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k not in _STAC_BANDS]
        if bad:
            raise ValueError(f"unknown band(s) {bad}; expected keys from {sorted(_STAC_BANDS)}")
        return {**_STAC_DEFAULT_ASSETS, **v}


class ImagerySettings(_Section):
    provider: Literal["files", "sentinelhub", "stac"] = "files"
    sensors: list[str] = Field(default_factory=lambda: list(COLLECTIONS))
    lookback_days: int = Field(30, ge=1, le=3650)
    read_ahead: int = Field(
        2, ge=0, le=4,
        description="new scenes read (fetched and prepared) in a background thread while the current one is "
                    "analysed, in a backfill or a poll with several new scenes; 0: off")
    read_threads: int = Field(
        2, ge=1, le=16,
        description="GDAL threads that decode one archived scene's compressed blocks (tiled GeoTIFFs of 256 x "
                    "256 px and more); 1: the reading thread alone")
    files: FilesSettings = Field(default_factory=FilesSettings)
    sentinelhub: SentinelHubSettings = Field(default_factory=SentinelHubSettings)
    stac: StacSettings = Field(default_factory=StacSettings)

    @field_validator("sensors")
    @classmethod
    def _known_sensors(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in COLLECTIONS]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}; expected a subset of {list(COLLECTIONS)}")
        if not v:
            raise ValueError("at least one sensor is needed")
        return v


class StoreSettings(_Section):
    url: str = "sqlite:///var/railwatch.db"

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected an SQLAlchemy URL starting with sqlite:/// or postgresql://")
        return v


class DetectorSettings(_Section):
    """Detector thresholds; each can be overridden per AOI (``detector`` in the AOI properties)."""

    cloudy_fraction: float = Field(0.5, ge=0, le=1, description="bad track pixels above this: cloudy")
    partial_fraction: float = Field(0.05, ge=0, le=1, description="bad pixels above this: partial")
    snow_fraction: float = Field(0.3, ge=0, le=1)
    nodata_fraction: float = Field(0.5, ge=0, le=1)
    reference_scenes: int = Field(6, ge=1, le=50, description="clear scenes in the reference")
    reference_days: int = Field(90, ge=5, le=730)
    min_history: int = Field(6, ge=2, le=100, description="usable observations before any alert")
    baseline_days: int = Field(120, ge=10, le=1000)
    alert_sigma: float = Field(2.5, gt=0, description="robust z-score that opens an alert")
    alert_ratio: float = Field(1.8, ge=1, description="activity must also exceed baseline x this")
    alert_min_cars: float = Field(5.0, ge=0, description="absolute floor above the baseline")
    resolve_ratio: float = Field(1.3, ge=1)
    escalation_ratio: float = Field(1.5, gt=1)
    open_min_clear: float = Field(0.8, ge=0, le=1, description="share of the track a scene must see to open an alert")
    open_min_clear_optical: float = Field(
        0.99, ge=0, le=1, description="share of the track an optical scene must see to open an alert (cloud edges)")
    optical_opens_alone: bool = Field(
        False, description="an optical scene far above the threshold opens an alert alone (else only radar does)")
    confirm_days: float = Field(
        10.0, gt=0, description="an elevated scene opens an alert when the last usable scene within this many days "
                                "was elevated too")
    geometry_baseline_fallback: bool = Field(
        True, description="a radar orbit geometry with fewer than min_history observations of its own is judged "
                          "against the sensor's baseline (every geometry) once three of its scenes read within 2x "
                          "of the other geometries' level")
    single_scene_factor: float = Field(
        2.0, ge=1, description="a single scene opens an alert alone when its excess over the baseline is this many "
                               "times the threshold's")
    wet_snow_drop_db: float = Field(
        3.0, gt=0, description="radar: surroundings this many dB darker than the same-orbit reference = wet snow")
    car_length_m: float = Field(15.0, gt=0)


class DaemonSettings(_Section):
    """``[daemon]``: the ``railwatch run`` scheduler, its health endpoint and the freshness watch (docs/daemon.md)."""

    poll_interval_minutes: float = Field(60.0, gt=0, description="default poll interval of an AOI")
    jitter_seconds: float = Field(0.0, ge=0, description="default random delay added to each poll")
    #: ``host:port`` of GET /healthz and /metrics; "" turns the endpoint off.
    listen: str = "127.0.0.1:9466"
    #: APScheduler job store; "" = its own SQLite file next to a SQLite store (``<store>.jobs.db``),
    #: or the store's own database when that is PostgreSQL.
    jobstore_url: str = ""
    #: Lock file that keeps a second daemon off the store; "" = ``<store>.daemon.lock`` next to a
    #: SQLite store (PostgreSQL stores are locked with an advisory lock, and this file too when set).
    lock_path: str = ""
    workers: int = Field(2, ge=1, le=32, description="AOIs polled at the same time")
    rescan_seconds: float = Field(300.0, gt=0, description="re-read the AOI folder this often (and on SIGHUP)")
    shutdown_grace_seconds: float = Field(25.0, ge=0, description="how long running jobs may finish on SIGTERM")
    dispatch_seconds: float = Field(30.0, gt=0, description="run the delivery outbox this often")
    #: Expected days between usable scenes per sensor (railwatch.freshness.DEFAULT_REVISIT_DAYS).
    revisit_days: dict[str, float] = Field(
        default_factory=lambda: {"sentinel-2-l2a": 5.0, "sentinel-1-grd": 6.0})
    stale_after_revisits: float = Field(3.0, gt=0, description="revisits without a usable scene before stale")
    #: ``all``: stale when every sensor of the AOI is overdue; ``any``: when one is.
    stale_when: Literal["all", "any"] = "all"
    #: Delete archive scenes older than this many days (never those still needed); unset keeps all.
    archive_max_age_days: float | None = Field(None, gt=0)
    retention_hours: float = Field(24.0, gt=0, description="run the archive retention this often")
    #: Seconds of railwatch time per real second: > 1 only for soaks and demos (a fast clock).
    time_scale: float = Field(1.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v == "":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f'expected "host:port" such as "127.0.0.1:9466" (or "" for none), got {v!r}')
        return v

    @field_validator("jobstore_url")
    @classmethod
    def _jobstore_dialect(cls, v: str) -> str:
        if v and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected an SQLAlchemy URL starting with sqlite:/// or postgresql:// (or \"\")")
        return v

    @field_validator("revisit_days")
    @classmethod
    def _known_revisits(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in COLLECTIONS]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}; expected keys from {list(COLLECTIONS)}")
        small = [k for k, d in v.items() if not d > 0]
        if small:
            raise ValueError(f"revisit days must be > 0 (got {', '.join(f'{k}={v[k]}' for k in small)})")
        return v


class ExecutorSettings(_Section):
    """``[executor]``: where per-AOI jobs of ``run --once``, ``backfill`` and the daemon run (docs/scale-out.md).

    ``local``: a thread pool in this process, one Monitor per job, one shared provider (its
    ``max_concurrent_requests`` caps requests in flight). ``dask``: each AOI job is submitted to a Dask
    cluster (``address``; none = an in-process ``LocalCluster``) under a deterministic key, with
    ``max_concurrent_requests`` as a cluster-wide cap on provider requests.
    """

    kind: Literal["local", "dask"] = "local"
    #: ``tcp://host:8786`` of a running ``dask scheduler``; "" = start an in-process LocalCluster (dask only).
    address: str = ""
    max_workers: int = Field(4, ge=1, le=256, description="AOI jobs run at the same time")
    #: Provider requests in flight across the whole Dask cluster (a distributed.Semaphore); unset =
    #: ``[imagery.sentinelhub] max_concurrent_requests``. Each process also keeps its own cap.
    max_concurrent_requests: int | None = Field(None, ge=1, le=1024)
    retries: int = Field(2, ge=0, le=10, description="dask: re-runs of a job that crashed or lost its worker")

    @field_validator("address")
    @classmethod
    def _dask_address(cls, v: str) -> str:
        if v and not re.match(r"^(tcp|tls|ucx|inproc)://", v):
            raise ValueError(f'expected a Dask scheduler address such as "tcp://127.0.0.1:8786" (or ""), got {v!r}')
        return v


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    aoi: AoiSettings = Field(default_factory=AoiSettings)
    imagery: ImagerySettings = Field(default_factory=ImagerySettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    subscribers: SubscriberList = Field(default_factory=list)

    #: Secrets read from the environment at start-up, keyed by the dotted ``*_env`` key.
    secrets: dict[str, SecretStr] = Field(default_factory=dict, exclude=True)
    #: Where the settings came from (file path or "defaults").
    source: str = Field("defaults", exclude=True)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _describe(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if kind == "missing" or "got " in msg:
        return msg
    return f"{msg} (got {err.get('input')!r})"


def _parse_env_value(raw: str) -> Any:
    """Interpret an override as a TOML value where it parses as one, else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _models(annotation: Any) -> list[type[BaseModel]] | None:
    """The model classes an annotation admits (a union such as a subscriber's kinds gives several),
    or None when it is not a model."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, UnionType):
        found = [m for a in get_args(annotation) for m in (_models(a) or [])]
        return found or None
    return None


def _list_item(annotation: Any) -> Any | None:
    """The item annotation of a list-of-models field (``[[subscribers]]``), else None."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is list and _models(get_args(annotation)[0]):
        return get_args(annotation)[0]
    return None


def _known_path(model: type[BaseModel], path: list[str]) -> bool:
    """Whether a lower-cased override path names a key: sections and keys by name, the entries of a
    list of tables (``[[subscribers]]``) by their index."""
    current: Any = model
    expect_index = False
    for part in path:
        if expect_index:
            if not part.isdigit():
                return False
            expect_index = False
            continue
        models = _models(current)
        if not models or part in ("secrets", "source"):
            return False
        fields = [f for m in models for n, f in m.model_fields.items() if part in (n, f.alias)]
        if not fields:
            return False
        current = fields[0].annotation
        item = _list_item(current)
        if item is not None:
            current, expect_index = item, True
    return not path[-1].isdigit()


def _env_order(item: tuple[str, str]) -> list[tuple[int, str]]:
    """Overrides sorted with list indices as numbers, so that entry 2 comes before entry 10."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in item[0].split("__")]


def _apply_env(data: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """Write ``RAILWATCH_<SECTION>__<KEY>`` overrides into the file's data. An entry of a list of
    tables is named by its index (``RAILWATCH_SUBSCRIBERS__0__URL``); the index one past the file's
    last entry adds an entry."""
    for name, raw in sorted(environ.items(), key=_env_order):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(path) or not _known_path(Settings, path):
            problems.append(f"environment {name}: names no known configuration key")
            continue
        node: Any = data
        for part, following in itertools.pairwise(path):
            if isinstance(node, list):
                index = int(part)
                if index > len(node):
                    problems.append(f"environment {name}: there is no entry {index} to override "
                                    f"({len(node)} in the file and the environment; the next new one is {len(node)})")
                    break
                if index == len(node):
                    node.append({})
                node = node[index]
                continue
            child = node.get(part)
            if not isinstance(child, list if following.isdigit() else dict):
                child = [] if following.isdigit() else {}
                node[part] = child
            node = child
        else:
            node[path[-1]] = _parse_env_value(raw)


def _secret_keys(obj: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, env var name) for every ``*_env`` field in the model tree.

    Lists of models are walked by index (``subscribers.0.password_env``); an ``*_env`` field holding
    a list of variables (a secret during rotation) gives one key per variable (``….secret_env.1``).
    """
    out: list[tuple[str, str]] = []
    for name in type(obj).model_fields:
        if name in ("secrets", "source"):
            continue
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.extend(_secret_keys(value, key + "."))
        elif name.endswith("_env") and isinstance(value, str) and value:
            out.append((key, value))
        elif name.endswith("_env") and isinstance(value, list):
            out.extend((f"{key}.{i}", var) for i, var in enumerate(value) if isinstance(var, str) and var)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out.extend(_secret_keys(item, f"{key}.{i}."))
    return out


def _child(node: Any, part: str) -> Any:
    """One step down a dotted key: an attribute, a mapping key or a list index."""
    if isinstance(node, list):
        return node[int(part)]
    if isinstance(node, dict):
        return node[part]
    return getattr(node, part)


def _resolve_path(p: Path, cwd: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (cwd / p)


def _resolve_sqlite(url: str, cwd: Path) -> str:
    m = re.match(r"^(sqlite(?:\+\w+)?):///(.*)$", url)
    if not m or not m.group(2) or m.group(2) == ":memory:" or m.group(2).startswith("/"):
        return url
    return f"{m.group(1)}:///{(cwd / m.group(2)).as_posix()}"


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read, override, validate and resolve the configuration, or raise ConfigError with every problem.

    ``path`` None means ``$RAILWATCH_CONFIG`` or ``config/railwatch.toml`` when that exists, else
    the built-in defaults.
    """
    env = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    explicit = path is not None or bool(env.get(CONFIG_ENV))
    if path is None:
        path = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else DEFAULT_CONFIG
    path = _resolve_path(path, cwd)
    source = str(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source=source) from exc
        except OSError as exc:
            raise ConfigError([f"cannot read: {exc.strerror}"], source=source) from exc
    elif explicit:
        raise ConfigError(["file not found"], source=source)
    else:
        source = "defaults"

    problems: list[str] = []
    _apply_env(data, env, problems)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data, context={"environ": env})
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"[{_loc(err['loc'][:-1]) or '(top level)'}] {err['loc'][-1]}: {_describe(err)}")
    if problems:
        raise ConfigError(problems, source=source)
    assert settings is not None
    settings.source = source
    settings.aoi.dir = _resolve_path(settings.aoi.dir, cwd)
    settings.imagery.files.root = _resolve_path(settings.imagery.files.root, cwd)
    settings.store.url = _resolve_sqlite(settings.store.url, cwd)
    settings.secrets = {key: SecretStr(env[var]) for key, var in _secret_keys(settings) if env.get(var)}
    return settings


def secret(settings: Settings, key: str) -> SecretStr | None:
    """The secret read from the variable named by the ``key`` (dotted ``*_env`` key), if set."""
    return settings.secrets.get(key)


def require_secret(settings: Settings, key: str) -> str:
    """The secret's value, or ConfigError naming the key and the variable to set."""
    value = settings.secrets.get(key)
    if value is None:
        section, _, name = key.rpartition(".")
        node: Any = settings
        for part in section.split(".") if section else []:
            node = _child(node, part)
        var = _child(node, name)
        raise ConfigError([f"[{section}] {name}: the environment variable {var} is not set"], source=settings.source)
    return value.get_secret_value()


def effective_detector(settings: Settings, overrides: Mapping[str, Any] | None) -> DetectorSettings:
    """Detector thresholds for one AOI: config defaults updated by the AOI's own ``detector`` object."""
    if not overrides:
        return settings.detector
    merged = settings.detector.model_dump() | dict(overrides)
    try:
        return DetectorSettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            [f"detector.{_loc(e['loc'])}: {_describe(e)}" for e in exc.errors()], source="AOI detector settings"
        ) from exc


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The resolved configuration as plain data, each secret shown only as set or not set."""
    data = settings.model_dump(mode="json")
    for key, _var in _secret_keys(settings):
        *parents, name = key.split(".")
        index: int | None = None
        if name.isdigit():  # one variable of a list of them (a secret during rotation)
            index = int(name)
            *parents, name = parents
        node = data
        for part in parents:
            node = _child(node, part)
        mask = "********" if key in settings.secrets else "(not set)"
        if index is None:
            node[name.removesuffix("_env")] = mask
        else:
            node.setdefault(name.removesuffix("_env"), []).append(mask)
    return data
