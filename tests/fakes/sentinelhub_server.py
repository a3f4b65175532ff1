"""A fake Sentinel Hub on 127.0.0.1: OAuth token, Catalog search with paging, Process API.

It serves the scenes of a simulated archive (``<root>/<aoi>/<collection>_<YYYYMMDDTHHMMSSZ>.tif``):

* ``POST <token path>`` (any path ending in ``/token``): OAuth2 client credentials; the reply is
  ``{"access_token", "expires_in": 3599, "token_type": "Bearer"}``, 401 with a Keycloak-style
  ``{"error": "unauthorized_client"}`` for a wrong id or secret.
* ``POST /api/v1/catalog/1.0.0/search``: STAC item search with ``bbox``, ``datetime``, CQL2-JSON
  ``filter`` and paging through ``context.next`` (a page holds at most ``page_size`` items).
  Sentinel-2 acquisitions are split into ``s2_granules`` tile granules a few seconds apart;
  Sentinel-1 items carry ``sat:orbit_state`` and ``sat:absolute_orbit`` (not the relative orbit).
* ``POST /api/v1/process``: parses the evalscript's ``setup()`` input bands and outputs and the
  ``evaluatePixel`` return expressions, reprojects the source scene(s) in the time range onto
  exactly the requested bbox, CRS and size (nearest neighbour, least recent first), and answers
  pixel-interleaved deflate GeoTIFFs (a tar for several outputs) with ``x-processingunits-spent``.

Every request body is validated against the real API description
(``shared/data/sentinelhub/sentinel-hub-openapi.yaml``, read at start; validation is off when the
file is absent) and errors are shaped like the real ``RestErrorWrapper``. Three places where the
description contradicts itself or the service are adjusted in memory, each documented in
``_patch_description``.

Faults on demand: :meth:`FakeSentinelHub.add_fault` (or ``POST /_fake/faults``) queues an error
status (with ``Retry-After`` in milliseconds, as Sentinel Hub sends it), a slow answer, a
truncated body or a corrupt TIFF for the next requests to a path. ``latency`` (seconds per
endpoint: ``token``, ``catalog``, ``process``) slows every answer as a real service is slow. Every
request is recorded (:attr:`requests`, ``GET /_fake/requests``) with its body and time;
:attr:`in_flight_max` is the most requests served at once (recorded under a lock: the server is
threaded).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import secrets
import tarfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

S2 = "sentinel-2-l2a"
S1 = "sentinel-1-grd"
OPENAPI_PATH = Path(__file__).resolve().parents[3] / "shared" / "data" / "sentinelhub" / "sentinel-hub-openapi.yaml"
CATALOG_PATH = "/api/v1/catalog/1.0.0/search"
PROCESS_PATH = "/api/v1/process"
#: Sentinel-2 processing baseline 04.00 (2022-01-25) added BOA_ADD_OFFSET = -1000 to L2A digital numbers.
BASELINE_04_START = datetime(2022, 1, 25, tzinfo=UTC)
#: Offsets of relative = (absolute - k) % 175 + 1, used here in reverse to invent absolute orbits.
ORBIT_OFFSETS = {"sentinel-1a": 73, "sentinel-1b": 27, "sentinel-1c": 172}
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_NAME_RE = re.compile(r"^(sentinel-2-l2a|sentinel-1-grd)_(\d{8}T\d{6}Z)\.tif$")


# ------------------------------------------------------------------------------------ source scenes


@dataclass(frozen=True)
class SourceScene:
    """One scene file of the simulated archive and what a catalogue says about it."""

    path: Path
    aoi_id: str
    collection: str
    acquired: datetime
    crs: str
    bounds: tuple[float, float, float, float]
    bbox_ll: tuple[float, float, float, float]
    platform: str
    cloud_cover: float | None = None
    orbit_direction: str | None = None
    relative_orbit: int | None = None

    @property
    def absolute_orbit(self) -> int | None:
        if self.relative_orbit is None:
            return None
        k = ORBIT_OFFSETS[self.platform]
        # The smallest absolute orbit above 30000 with this relative orbit.
        base = (self.relative_orbit - 1 + k) % 175
        return base + 175 * (30000 // 175 + 1)


def index_archive(root: Path) -> list[SourceScene]:
    """Every scene file under ``root`` with its footprint, platform, cloud cover and orbit."""
    import rasterio
    from rasterio.warp import transform_bounds

    scenes: list[SourceScene] = []
    for path in sorted(Path(root).glob("*/*.tif")):
        m = _NAME_RE.match(path.name)
        if not m:
            continue
        collection = m.group(1)
        acquired = datetime.strptime(m.group(2), _TIME_FORMAT).replace(tzinfo=UTC)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as ds:
                bbox_ll = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
                tags = ds.tags()
                descriptions = list(ds.descriptions)
                cloud = None
                if collection == S2 and "SCL" in descriptions:
                    scl = ds.read(descriptions.index("SCL") + 1)
                    valid = scl > 0
                    cloud = round(100.0 * float(np.isin(scl, (8, 9, 10)).sum()) / max(int(valid.sum()), 1), 2)
                crs, bounds = ds.crs.to_string(), tuple(ds.bounds)
        day = acquired.toordinal()
        if collection == S2:
            platform = "sentinel-2a" if day % 2 == 0 else "sentinel-2b"
            direction, rel = None, None
        else:
            direction = (tags.get("ORBIT_DIRECTION") or "").lower() or None
            try:
                rel = int(tags["RELATIVE_ORBIT"])
            except (KeyError, ValueError):
                rel = None
            # S1B until its failure at the end of 2021, S1C from 2025 until its June 2026 reconfiguration.
            other = ("sentinel-1b" if acquired < datetime(2022, 1, 1, tzinfo=UTC)
                     else "sentinel-1c" if datetime(2025, 1, 1, tzinfo=UTC) <= acquired < datetime(2026, 6, 9, tzinfo=UTC)
                     else "sentinel-1a")
            platform = "sentinel-1a" if day % 2 == 0 else other
        scenes.append(SourceScene(path=path, aoi_id=path.parent.name, collection=collection, acquired=acquired,
                                  crs=crs, bounds=bounds, bbox_ll=tuple(bbox_ll), platform=platform,
                                  cloud_cover=cloud, orbit_direction=direction, relative_orbit=rel))
    return scenes


# ------------------------------------------------------------------------------ API description


def _patch_description(doc: dict[str, Any]) -> dict[str, Any]:
    """Adjust three spots where the published description contradicts the running service.

    1. ``ProcessRequestOutputResponse.identifier`` is an enum of the placeholder ``"<identifier>"``
       and ``"userdata"``; its own text says it must match an evalscript ``output.id`` (the fake
       checks that instead).
    2. ``BYOCDataset.type`` is any string, so every ``sentinel-2-l2a`` input also matches it and the
       ``oneOf`` of ``ProcessRequestInputData`` can never pass; its description says it is
       ``byoc-``/``batch-``/``zarr-`` + id, which becomes a pattern.
    3. ``Cql2ScalarExpression`` is a ``oneOf`` of a character and a numeric expression, and both
       admit a ``{"property": ...}`` reference, so no comparison with a property can pass; it
       becomes an ``anyOf`` (the CQL2 standard's own schema).

    Everything else is as published; for example a Catalog ``filter`` in a POST body is CQL2-JSON
    only and ``and`` needs two or more terms, and the provider follows both.
    """
    schemas = doc["components"]["schemas"]
    ident = schemas["ProcessRequestOutputResponse"]["properties"]["identifier"]
    ident.pop("enum", None)
    byoc = schemas["BYOCDataset"]["allOf"][0]["properties"]["type"]
    byoc["pattern"] = "^(byoc|batch|zarr)-"
    scalar = schemas["Cql2ScalarExpression"]
    scalar["anyOf"] = scalar.pop("oneOf")
    return doc


class RequestValidator:
    """JSON-schema validation of request bodies against the real OpenAPI description."""

    def __init__(self, path: Path = OPENAPI_PATH) -> None:
        import yaml
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        doc = _patch_description(yaml.safe_load(path.read_text(encoding="utf-8")))
        uri = "urn:sentinel-hub-openapi"
        registry: Registry[Any] = Registry().with_resource(uri, Resource.from_contents(doc, default_specification=DRAFT202012))

        def body_schema(api_path: str) -> Any:
            schema = doc["paths"][api_path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            return _absolute_refs(schema, uri)

        self.process = Draft202012Validator(body_schema("/process/v1"), registry=registry)
        self.catalog = Draft202012Validator(body_schema("/catalog/v1/search"), registry=registry)

    @staticmethod
    def errors(validator: Any, body: Any) -> list[str]:
        return [f"{'/'.join(str(p) for p in e.absolute_path) or '(body)'}: {e.message[:200]}"
                for e in validator.iter_errors(body)]


@functools.lru_cache(maxsize=4)
def _validator(path: Path) -> RequestValidator:
    """Parsing the 360 kB description takes most of a second: once per process."""
    return RequestValidator(path)


def _absolute_refs(node: Any, uri: str) -> Any:
    if isinstance(node, dict):
        return {k: (uri + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute_refs(v, uri))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_refs(v, uri) for v in node]
    return node


# ------------------------------------------------------------------------------------- evalscripts


@dataclass
class Evalscript:
    """What the fake understands of an evalscript: inputs, outputs and per-output band expressions."""

    inputs: list[str]
    outputs: list[tuple[str, int, str]]  # (id, bands, sampleType)
    returns: dict[str, list[tuple[float, str]]]  # id -> [(factor, input band)]


class EvalscriptError(ValueError):
    pass


def parse_evalscript(text: str) -> Evalscript:
    """Parse ``setup()`` (input bands, outputs) and ``evaluatePixel``'s return of a VERSION=3 script."""
    if "//VERSION=3" not in text.replace(" ", ""):
        raise EvalscriptError("only //VERSION=3 evalscripts are supported")
    setup = re.search(r"function\s+setup\s*\(\s*\)\s*\{(.*?)\n\}", text, re.S)
    if not setup:
        raise EvalscriptError("no setup() function")
    body = setup.group(1)
    inp = re.search(r"input\s*:\s*\[\s*\{\s*bands\s*:\s*\[([^\]]*)\]", body) or re.search(r"input\s*:\s*\[([^\]]*)\]", body)
    if not inp:
        raise EvalscriptError("setup() has no input bands")
    inputs = re.findall(r"[\"'](\w+)[\"']", inp.group(1))
    outputs = [(m.group(1), int(m.group(2)), (m.group(3) or "AUTO").upper()) for m in re.finditer(
        r"\{\s*id\s*:\s*[\"'](\w+)[\"']\s*,\s*bands\s*:\s*(\d+)\s*(?:,\s*sampleType\s*:\s*(?:SampleType\.)?[\"']?(\w+)[\"']?)?\s*\}",
        body)]
    if not outputs:
        single = re.search(r"output\s*:\s*\{\s*bands\s*:\s*(\d+)\s*(?:,\s*sampleType\s*:\s*(?:SampleType\.)?[\"']?(\w+)[\"']?)?",
                           body)
        if not single:
            raise EvalscriptError("setup() has no output")
        outputs = [("default", int(single.group(1)), (single.group(2) or "AUTO").upper())]
    evaluate = re.search(r"function\s+evaluatePixel\s*\(\s*(\w+)[^)]*\)\s*\{(.*)\}", text, re.S)
    if not evaluate:
        raise EvalscriptError("no evaluatePixel() function")
    var, ev = evaluate.group(1), evaluate.group(2)
    returns: dict[str, list[tuple[float, str]]] = {}
    obj = re.search(r"return\s*\{(.*)\}", ev, re.S)
    if obj:
        for m in re.finditer(r"(\w+)\s*:\s*\[([^\]]*)\]", obj.group(1)):
            returns[m.group(1)] = [_expression(e, var) for e in m.group(2).split(",") if e.strip()]
    else:
        arr = re.search(r"return\s*\[([^\]]*)\]", ev)
        if not arr:
            raise EvalscriptError("evaluatePixel() returns neither an object nor an array")
        returns["default"] = [_expression(e, var) for e in arr.group(1).split(",") if e.strip()]
    for ident, n, _ in outputs:
        if ident not in returns:
            raise EvalscriptError(f"evaluatePixel() returns nothing for output {ident!r}")
        if len(returns[ident]) != n:
            raise EvalscriptError(f"output {ident!r} declares {n} band(s) but evaluatePixel() returns {len(returns[ident])}")
        for _, band in returns[ident]:
            if band not in inputs:
                raise EvalscriptError(f"evaluatePixel() uses {band}, which setup() does not request")
    return Evalscript(inputs=inputs, outputs=outputs, returns=returns)


def _expression(expr: str, var: str) -> tuple[float, str]:
    m = re.fullmatch(rf"\s*(?:([0-9.eE+-]+)\s*\*\s*)?{re.escape(var)}\.(\w+)\s*(?:\*\s*([0-9.eE+-]+)\s*)?", expr)
    if not m:
        raise EvalscriptError(f"the fake cannot evaluate {expr.strip()!r} (use [factor *] {var}.BAND)")
    factor = float(m.group(1) or 1.0) * float(m.group(3) or 1.0)
    return factor, m.group(2)


def processing_units(width: int, height: int, input_bands: int, float32: bool, orthorectify: bool) -> float:
    """The documented PU formula (minimum 0.01 area factor, 0.005 per request)."""
    area = max(width * height / 512.0**2, 0.01)
    return max(area * input_bands / 3.0 * (2.0 if float32 else 1.0) * (2.0 if orthorectify else 1.0), 0.005)


# ------------------------------------------------------------------------------------------ faults


@dataclass
class Fault:
    """One queued misbehaviour for requests whose path starts with ``path``."""

    path: str
    kind: str  # "status" | "slow" | "truncate" | "corrupt"
    times: int = 1
    status: int = 500
    retry_after_ms: int | None = None
    seconds: float = 0.0
    message: str = "injected by the fake"


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    started: float
    status: int = 0
    finished: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ server


class FakeSentinelHub:
    """The fake service. ``start()`` returns the base URL; ``token_url`` is where tokens are issued."""

    def __init__(
        self,
        archive: Path,
        *,
        client_id: str = "railwatch-test-client",
        client_secret: str = "fake-secret-do-not-log",
        page_size: int = 3,
        s2_granules: int = 2,
        token_expires_in: int = 3599,
        openapi: Path | None = OPENAPI_PATH,
        latency: Mapping[str, float] | None = None,
    ) -> None:
        self.archive = Path(archive)
        self.client_id = client_id
        self.client_secret = client_secret
        self.page_size = page_size
        self.s2_granules = s2_granules
        self.token_expires_in = token_expires_in
        self.scenes = index_archive(self.archive)
        self.validator = _validator(openapi) if openapi is not None and openapi.exists() else None
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.tokens: dict[str, float] = {}
        #: Seconds added to every answer of an endpoint: ``token``, ``catalog``, ``process`` (a
        #: realistic service: ~0.3 s for a token, ~1.5 s for a Process request); settable while running.
        self.latency: dict[str, float] = dict(latency or {})
        self.in_flight = 0
        self.in_flight_max = 0
        self.pu_spent = 0.0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-sentinelhub", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/auth/realms/main/protocol/openid-connect/token"

    def __enter__(self) -> FakeSentinelHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- control

    def add_fault(self, path: str, kind: str = "status", *, times: int = 1, status: int = 500,
                  retry_after_ms: int | None = None, seconds: float = 0.0,
                  message: str = "injected by the fake") -> None:
        """Queue a misbehaviour for the next ``times`` requests whose path starts with ``path``."""
        if kind not in ("status", "slow", "truncate", "corrupt"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self.faults.append(Fault(path=path, kind=kind, times=times, status=status,
                                     retry_after_ms=retry_after_ms, seconds=seconds, message=message))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.in_flight_max = 0
            self.pu_spent = 0.0

    def latency_for(self, path: str) -> float:
        """The configured latency of the endpoint ``path`` belongs to (0 for none)."""
        if path.endswith("/token"):
            return float(self.latency.get("token", 0.0))
        if path == CATALOG_PATH:
            return float(self.latency.get("catalog", 0.0))
        if path == PROCESS_PATH:
            return float(self.latency.get("process", 0.0))
        return 0.0

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if path.startswith(fault.path) and fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path)]

    # ------------------------------------------------------------------------------------ token

    def issue_token(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": "Unsupported grant_type"}
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return 401, {"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"}
        now = int(time.time())
        payload = {"azp": self.client_id, "sub": "fake-user", "iat": now, "exp": now + self.token_expires_in}
        token = ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
                         for p in ({"alg": "RS256", "typ": "JWT"}, payload)) + "." + secrets.token_urlsafe(16)
        with self._lock:
            self.tokens[token] = now + self.token_expires_in
        return 200, {"access_token": token, "expires_in": self.token_expires_in, "refresh_expires_in": 0,
                     "token_type": "Bearer", "not-before-policy": 0, "scope": "email profile"}

    def authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            expiry = self.tokens.get(header[len("Bearer "):])
        return expiry is not None and expiry > time.time()

    # ---------------------------------------------------------------------------------- catalog

    def catalog_items(self, collection: str) -> list[dict[str, Any]]:
        """STAC items of a collection, shaped like the Sentinel Hub Catalog's."""
        items: list[dict[str, Any]] = []
        for s in self.scenes:
            if s.collection != collection:
                continue
            if collection == S2:
                for g in range(self.s2_granules):
                    t = s.acquired + timedelta(seconds=4 * g)
                    tile = f"T52T{'FGH'[g % 3]}N"
                    pid = (f"{'S2A' if s.platform.endswith('a') else 'S2B'}_MSIL2A_{t:%Y%m%dT%H%M%S}_N0510_R089_"
                           f"{tile}_{t:%Y%m%dT%H%M%S}")
                    items.append(self._item(s, pid, t, {
                        "platform": s.platform, "instruments": ["msi"], "constellation": "sentinel-2", "gsd": 10,
                        "eo:cloud_cover": s.cloud_cover if s.cloud_cover is not None else 0.0,
                        "proj:epsg": int(s.crs.split(":")[1]), "proj:bbox": list(s.bounds),
                    }))
            else:
                sat = "S1" + s.platform[-1].upper()
                pid = (f"{sat}_IW_GRDH_1SDV_{s.acquired:%Y%m%dT%H%M%S}_"
                       f"{s.acquired + timedelta(seconds=25):%Y%m%dT%H%M%S}_{s.absolute_orbit or 0:06d}_06E1F3_9B1C_COG.SAFE")
                props: dict[str, Any] = {
                    "platform": s.platform, "instruments": ["c-sar"], "constellation": "sentinel-1",
                    "sar:instrument_mode": "IW", "sar:polarizations": ["VV", "VH"], "sar:frequency_band": "C",
                    "s1:polarization": "DV", "s1:resolution": "HIGH", "s1:timeliness": "Fast24h",
                    "sar:product_type": "GRD",
                }
                if s.orbit_direction:
                    props["sat:orbit_state"] = s.orbit_direction
                if s.absolute_orbit is not None:
                    props["sat:absolute_orbit"] = s.absolute_orbit
                items.append(self._item(s, pid, s.acquired, props))
        return items

    @staticmethod
    def _item(s: SourceScene, pid: str, t: datetime, props: dict[str, Any]) -> dict[str, Any]:
        w, so, e, n = s.bbox_ll
        return {
            "stac_version": "1.0.0",
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                                "https://stac-extensions.github.io/projection/v1.0.0/schema.json"],
            "id": pid, "type": "Feature",
            "geometry": {"type": "MultiPolygon", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC::CRS84"}},
                         "coordinates": [[[[w, so], [e, so], [e, n], [w, n], [w, so]]]]},
            "bbox": [w, so, e, n],
            "properties": {"datetime": t.strftime("%Y-%m-%dT%H:%M:%SZ"), **props},
            "assets": {}, "links": [],
        }

    def search(self, body: Mapping[str, Any], base: str) -> tuple[int, dict[str, Any]]:
        collections = body.get("collections") or []
        if len(collections) != 1 or collections[0] not in (S2, S1):
            return 400, _error(400, "Bad Request", f"unknown collection(s) {collections}", "COMMON_BAD_PAYLOAD")
        items = self.catalog_items(collections[0])
        if "datetime" in body:
            lo_s, _, hi_s = str(body["datetime"]).partition("/")
            lo = _parse_time(lo_s) if lo_s not in ("", "..") else None
            hi = _parse_time(hi_s) if hi_s not in ("", "..") else None
            items = [i for i in items if (lo is None or _parse_time(i["properties"]["datetime"]) >= lo)
                     and (hi is None or _parse_time(i["properties"]["datetime"]) <= hi)]
        if "bbox" in body:
            bw, bs, be, bn = body["bbox"]
            items = [i for i in items if not (i["bbox"][2] < bw or i["bbox"][0] > be or i["bbox"][3] < bs or i["bbox"][1] > bn)]
        if body.get("filter") is not None:
            try:
                items = [i for i in items if _cql2(body["filter"], i["properties"])]
            except ValueError as exc:
                return 400, _error(400, "Bad Request", f"filter: {exc}", "COMMON_BAD_PAYLOAD")
        items.sort(key=lambda i: i["properties"]["datetime"], reverse=True)
        limit = min(int(body.get("limit", 10)), self.page_size)
        start = int(body.get("next") or 0)
        page = items[start:start + limit]
        nxt = start + limit if start + limit < len(items) else None
        links = [{"href": f"{base}{CATALOG_PATH}", "rel": "self", "type": "application/geo+json"}]
        context: dict[str, Any] = {"limit": limit, "returned": len(page)}
        if nxt is not None:
            links.append({"href": f"{base}{CATALOG_PATH}", "rel": "next", "type": "application/geo+json",
                          "title": "Next set of results", "method": "POST", "body": {"next": nxt}, "merge": True})
            context = {"next": nxt, **context}
        return 200, {"type": "FeatureCollection", "features": page, "links": links, "context": context}

    # ---------------------------------------------------------------------------------- process

    def process(self, body: Mapping[str, Any], accept: str) -> tuple[int, dict[str, str], bytes]:
        """Render the request; returns (status, headers, payload)."""
        try:
            script = parse_evalscript(str(body["evalscript"]))
        except EvalscriptError as exc:
            return _json_reply(400, _error(400, "Bad Request", f"Failed to evaluate script! {exc}", "RENDERER_EXCEPTION"))
        data = body["input"]["data"]
        if len(data) != 1 or data[0].get("type") not in (S2, S1):
            return _json_reply(400, _error(400, "Bad Request", "the fake serves one sentinel-2-l2a or sentinel-1-grd input",
                                           "COMMON_BAD_PAYLOAD"))
        collection = data[0]["type"]
        known = {S2: {"B02", "B03", "B04", "B08", "SCL", "dataMask"}, S1: {"VV", "VH", "dataMask"}}[collection]
        unknown = [b for b in script.inputs if b not in known]
        if unknown:
            return _json_reply(400, _error(400, "Bad Request", f"the fake has no band(s) {unknown} of {collection}",
                                           "RENDERER_EXCEPTION"))
        responses = body.get("output", {}).get("responses") or [{"identifier": "default", "format": {"type": "image/png"}}]
        ids = {o[0] for o in script.outputs}
        for r in responses:
            if r["identifier"] not in ids:
                return _json_reply(400, _error(400, "Bad Request",
                                               f"Output {r['identifier']} requested but missing from function setup()",
                                               "COMMON_BAD_PAYLOAD"))
            if r.get("format", {}).get("type", "image/png") != "image/tiff":
                return _json_reply(400, _error(400, "Bad Request", "the fake answers image/tiff only", "COMMON_BAD_PAYLOAD"))
        multi = len(responses) > 1
        if multi and accept not in ("application/x-tar", "application/tar"):
            return _json_reply(400, _error(400, "Bad Request", "several responses need Accept: application/x-tar",
                                           "COMMON_BAD_PAYLOAD"))
        bounds = body["input"]["bounds"]
        crs_uri = bounds.get("properties", {}).get("crs", "http://www.opengis.net/def/crs/OGC/1.3/CRS84")
        m = re.search(r"/EPSG/0/(\d+)$", crs_uri)
        if not m or "bbox" not in bounds:
            return _json_reply(400, _error(400, "Bad Request", "the fake needs a bbox in an EPSG CRS", "COMMON_BAD_PAYLOAD"))
        crs = f"EPSG:{m.group(1)}"
        left, bottom, right, top = (float(v) for v in bounds["bbox"])
        out = body.get("output", {})
        if "width" in out:
            width, height = int(out["width"]), int(out["height"])
        else:
            width = round((right - left) / float(out.get("resx", 10)))
            height = round((top - bottom) / float(out.get("resy", 10)))
        from affine import Affine

        transform = Affine((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top)
        time_range = data[0].get("dataFilter", {}).get("timeRange", {})
        lo = _parse_time(time_range["from"]) if "from" in time_range else datetime.min.replace(tzinfo=UTC)
        hi = _parse_time(time_range["to"]) if "to" in time_range else datetime.max.replace(tzinfo=UTC)
        order = data[0].get("dataFilter", {}).get("mosaickingOrder", "mostRecent")
        processing = data[0].get("processing", {})
        harmonize = bool(processing.get("harmonizeValues", True))
        sources = sorted((s for s in self.scenes if s.collection == collection and lo <= s.acquired <= hi),
                         key=lambda s: s.acquired, reverse=(order == "mostRecent"))
        samples = _render(sources, script.inputs, crs, transform, width, height, harmonize=harmonize)
        files: dict[str, bytes] = {}
        for ident, _nbands, sample_type in script.outputs:
            if ident not in {r["identifier"] for r in responses}:
                continue
            stack = np.stack([factor * samples[band] for factor, band in script.returns[ident]])
            files[f"{ident}.tif"] = _geotiff(stack, sample_type, crs, transform)
        float32 = any(st == "FLOAT32" for _, _, st in script.outputs)
        pu = processing_units(width, height, len([b for b in script.inputs if b != "dataMask"]), float32,
                              bool(processing.get("orthorectify", False)))
        with self._lock:
            self.pu_spent += pu
        headers = {"x-processingunits-spent": repr(pu)}
        if multi:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name, blob in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    info.mtime = int(time.time())
                    tar.addfile(info, io.BytesIO(blob))
            headers["Content-Type"] = "application/x-tar"
            return 200, headers, buf.getvalue()
        headers["Content-Type"] = "image/tiff"
        return 200, headers, next(iter(files.values()))


def _render(sources: Sequence[SourceScene], inputs: Iterable[str], crs: str, transform: Any, width: int, height: int,
            *, harmonize: bool) -> dict[str, np.ndarray]:
    """Input band samples on the requested grid (values in Sentinel Hub's default units)."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    wanted = [b for b in inputs if b != "dataMask"]
    out = {b: np.zeros((height, width), dtype=np.float64) for b in wanted}
    mask = np.zeros((height, width), dtype=bool)
    for s in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(s.path) as ds:
                desc = list(ds.descriptions)
                bands = {b: ds.read(desc.index(b) + 1) for b in wanted}
                first = ds.read(desc.index("B02" if s.collection == S2 else "VV") + 1)
                valid_src = (first != 0) if s.collection == S2 else (np.isfinite(first) & (first != 0))
                src_crs, src_transform = ds.crs, ds.transform
        valid = np.zeros((height, width), dtype=np.uint8)
        reproject(valid_src.astype(np.uint8), valid, src_transform=src_transform, src_crs=src_crs,
                  dst_transform=transform, dst_crs=crs, resampling=Resampling.nearest, src_nodata=None, dst_nodata=0)
        take = (valid > 0) & ~mask
        for b, arr in bands.items():
            dst = np.zeros((height, width), dtype=np.float64)
            reproject(np.nan_to_num(arr.astype(np.float64)), dst, src_transform=src_transform, src_crs=src_crs,
                      dst_transform=transform, dst_crs=crs, resampling=Resampling.nearest, src_nodata=None, dst_nodata=0)
            if s.collection == S2 and b != "SCL":
                # L2A digital numbers -> REFLECTANCE; from baseline 04.00 on the product carries a +1000
                # offset, which harmonizeValues removes.
                offset = 0.0 if harmonize or s.acquired < BASELINE_04_START else 1000.0
                dst = (dst + offset) / 10000.0
            out[b][take] = dst[take]
        mask |= valid > 0
    out["dataMask"] = mask.astype(np.float64)
    return out


def _geotiff(stack: np.ndarray, sample_type: str, crs: str, transform: Any) -> bytes:
    from rasterio.io import MemoryFile

    if sample_type in ("UINT8", "UINT16"):
        top = 255 if sample_type == "UINT8" else 65535
        data = np.clip(np.rint(stack), 0, top).astype(np.uint8 if sample_type == "UINT8" else np.uint16)
    elif sample_type in ("FLOAT32", "AUTO"):
        data = stack.astype(np.float32)
    else:
        data = stack.astype(np.float32)
    count, height, width = data.shape
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name, crs=crs,
                      transform=transform, interleave="pixel", compress="deflate") as dst:
            dst.write(data)
        return bytes(mem.read())


def _cql2(expr: Any, props: Mapping[str, Any]) -> bool:
    """Evaluate the CQL2-JSON subset Sentinel Hub clients send: and/or/not and comparisons."""
    op = expr.get("op")
    args = expr.get("args", [])
    if op in ("and", "or"):
        results = [_cql2(a, props) for a in args]
        return all(results) if op == "and" else any(results)
    if op == "not":
        return not _cql2(args[0], props)
    if op in ("=", "<>", "<", "<=", ">", ">="):
        left, right = (props.get(a["property"]) if isinstance(a, dict) and "property" in a else a for a in args)
        if left is None or right is None:
            return False
        if isinstance(left, str) and isinstance(right, str):
            left, right = left.lower(), right.lower()
        return {"=": left == right, "<>": left != right, "<": left < right, "<=": left <= right,
                ">": left > right, ">=": left >= right}[op]
    raise ValueError(f"unsupported CQL2 operator {op!r}")


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _error(status: int, reason: str, message: str, code: str) -> dict[str, Any]:
    return {"error": {"status": status, "reason": reason, "message": message, "code": code}}


def _json_reply(status: int, payload: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


# ------------------------------------------------------------------------------------------ handler


class _Server(ThreadingHTTPServer):
    """One thread per connection; a deep accept queue so many concurrent clients are not refused."""

    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeSentinelHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        fake = self.server_fake
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            body = {k: ("***" if k == "client_secret" else v) for k, v in form.items()}
        else:
            form = {}
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
        record = Recorded(method=method, path=path, body=body, started=time.monotonic(),
                          headers={k.lower(): v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")})
        counted = not path.startswith("/_fake/")
        if counted:
            with fake._lock:
                fake.requests.append(record)
                fake.in_flight += 1
                fake.in_flight_max = max(fake.in_flight_max, fake.in_flight)
        try:
            fault = fake._take_fault(path) if not path.startswith("/_fake/") else None
            if fault is not None and fault.kind == "status":
                # Answered with an error before any processing: nothing rendered, no units spent.
                status, headers, payload = 0, {}, b""
            else:
                try:
                    status, headers, payload = self._route(method, path, body, form)
                except Exception as exc:  # a bug in the fake shows up as a 500 with its reason
                    status, headers, payload = _json_reply(500, _error(
                        500, "Internal Server Error", f"fake: {type(exc).__name__}: {exc}", "COMMON_EXCEPTION"))
            truncate = corrupt = False
            delay = fake.latency_for(path) if not path.startswith("/_fake/") else 0.0
            if delay > 0:
                time.sleep(delay)  # counted in flight, like a slow service
            if fault is not None:
                if fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "status":
                    status, headers, payload = _json_reply(fault.status, _error(
                        fault.status, HTTPStatus(fault.status).phrase, fault.message,
                        "RATE_LIMIT_EXCEEDED" if fault.status == 429 else "COMMON_EXCEPTION"))
                    if fault.retry_after_ms is not None:
                        headers["Retry-After"] = str(fault.retry_after_ms)
                elif fault.kind == "truncate":
                    truncate = True
                elif fault.kind == "corrupt" and status == 200:
                    corrupt = True
            if corrupt:
                payload = _corrupt(payload, headers.get("Content-Type", ""))
            record.status = status
            # Answered: no longer in flight. Counted before the first byte goes out, so a client that
            # has read the whole answer and sends its next request can never be counted twice.
            counted = self._done(counted)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                if truncate:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2] if truncate else payload)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (e.g. timed out on a slow answer)
            if truncate:
                self.close_connection = True
        finally:
            record.finished = time.monotonic()
            self._done(counted)

    def _done(self, counted: bool) -> bool:
        """Take a counted request off ``in_flight`` (once); returns False, the new ``counted``."""
        if counted:
            fake = self.server_fake
            with fake._lock:
                fake.in_flight -= 1
        return False

    def _route(self, method: str, path: str, body: Any, form: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        fake = self.server_fake
        if path.startswith("/_fake/"):
            return self._control(method, path, body)
        if method == "POST" and path.endswith("/token"):
            status, payload = fake.issue_token(form)
            return _json_reply(status, payload)
        if path in (CATALOG_PATH, PROCESS_PATH):
            if not fake.authorised(self.headers.get("Authorization")):
                return _json_reply(401, _error(401, "Unauthorized", "You are not authorized! Please provide a valid access token.",
                                               "COMMON_UNAUTHORIZED"))
            if method != "POST":
                return _json_reply(405, _error(405, "Method Not Allowed", "use POST", "COMMON_METHOD_NOT_ALLOWED"))
            if not isinstance(body, dict):
                return _json_reply(400, _error(400, "Bad Request", "the body is not a JSON object", "COMMON_BAD_PAYLOAD"))
            if fake.validator is not None:
                validator = fake.validator.catalog if path == CATALOG_PATH else fake.validator.process
                problems = RequestValidator.errors(validator, body)
                if problems:
                    return _json_reply(400, {"error": {"status": 400, "reason": "Bad Request",
                                                       "message": "; ".join(problems), "code": "COMMON_BAD_PAYLOAD"}})
            if path == CATALOG_PATH:
                status, payload = fake.search(body, fake.base_url)
                return status, {"Content-Type": "application/geo+json"}, json.dumps(payload).encode()
            return fake.process(body, self.headers.get("Accept", "image/tiff"))
        return _json_reply(404, _error(404, "Not Found", f"no such endpoint {path}", "COMMON_NOT_FOUND"))

    def _control(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
        fake = self.server_fake
        if path == "/_fake/faults" and method == "POST" and isinstance(body, dict):
            fake.add_fault(**body)
            return _json_reply(200, {"queued": len(fake.faults)})
        if path == "/_fake/reset" and method == "POST":
            fake.reset()
            return _json_reply(200, {"reset": True})
        if path == "/_fake/requests":
            with fake._lock:
                rows = [{"method": r.method, "path": r.path, "status": r.status, "body": r.body} for r in fake.requests]
            return _json_reply(200, {"requests": rows, "in_flight_max": fake.in_flight_max, "pu_spent": fake.pu_spent})
        return _json_reply(404, _error(404, "Not Found", path, "COMMON_NOT_FOUND"))


def _corrupt(payload: bytes, content_type: str) -> bytes:
    """The same container with each TIFF's pixel data replaced by garbage after a valid-looking header."""
    garbage = b"II*\x00" + bytes(range(256)) * 8
    if content_type == "application/x-tar":
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(payload)) as src, tarfile.open(fileobj=buf, mode="w") as tar:
            for member in src.getmembers():
                info = tarfile.TarInfo(member.name)
                info.size = len(garbage)
                tar.addfile(info, io.BytesIO(garbage))
        return buf.getvalue()
    return garbage
