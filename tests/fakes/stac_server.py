"""A loopback STAC API with Cloud-Optimised GeoTIFF assets, shaped like Earth Search.

It serves the scenes of a simulated archive (``<root>/<aoi>/<collection>_<time>.tif``):

* ``GET /`` landing page (conformance: core, item-search, query), ``/conformance``,
  ``/collections`` and ``/collections/{id}``.
* ``GET`` and ``POST /search``: ``collections``, ``bbox``, ``datetime``, ``query`` (``lte``/``gte``/
  ``lt``/``gt``/``eq``/``neq``), ``limit``; paging through a ``links`` entry with ``rel: next``
  (a ``POST`` link with ``body: {"next": n}`` and ``merge: true``, or a ``GET`` href with ``next=n``).
* ``GET``/``HEAD /assets/<file>.tif``: single-band COGs with HTTP Range support (206 and
  ``Content-Range``), as GDAL's ``/vsicurl/`` reads them.

Each Sentinel-2 acquisition becomes two MGRS-like tile items (west and east halves of the scene,
two seconds apart; the other half is nodata) on a larger tile canvas filled with other land, so a
reader must mosaic the tiles and read windows. Items rotate through three processing states: baseline 05.10 with
``earthsearch:boa_offset_applied: true`` (values as the source), baseline 05.10 with the offset not
applied (source + 1000 in the COGs) and baseline 03.01 (no offset). Sentinel-1 items
(``sentinel-1-rtc``, assets ``vv``/``vh`` float32 with nodata -32768) carry ``sat:orbit_state``
and ``sat:relative_orbit``.

Faults on demand (:meth:`FakeStac.add_fault`): an error status (with ``Retry-After`` in seconds,
the HTTP convention) or a slow answer for the next requests to a path. Every request is recorded
with its ``Range`` header, status and the bytes sent.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .sentinelhub_server import S2, SourceScene, index_archive

S1_RTC = "sentinel-1-rtc"
CONFORMS_TO = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
#: Padding (pixels) around the scene on the served tile canvas.
PAD = 300
S2_ASSETS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "scl": "SCL"}
S1_ASSETS = {"vv": "VV", "vh": "VH"}
S1_NODATA = -32768.0
#: (processing baseline, earthsearch:boa_offset_applied, +offset in the COG), by item index % 3.
S2_STATES = (("05.10", True, 0), ("05.10", False, 1000), ("03.01", None, 0))


@dataclass
class Fault:
    path: str
    status: int = 500
    times: int = 1
    retry_after_s: int | None = None
    seconds: float = 0.0
    kind: str = "status"


@dataclass
class Hit:
    method: str
    path: str
    range: str | None
    status: int
    sent: int
    body: Any = None


class FakeStac:
    """The fake STAC API. ``start()`` returns the API root URL."""

    def __init__(self, archive: Path, *, page_size: int = 2) -> None:
        self.archive = Path(archive)
        self.page_size = page_size
        self.scenes = index_archive(self.archive)
        self.assets_dir = Path(tempfile.mkdtemp(prefix="fake-stac-"))
        self.items: list[dict[str, Any]] = []
        self.expected: dict[str, dict[str, Any]] = {}
        self.hits: list[Hit] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-stac", daemon=True).start()
        self._build()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self.assets_dir, ignore_errors=True)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_fault(self, path: str, *, status: int = 500, times: int = 1, retry_after_s: int | None = None,
                  kind: str = "status", seconds: float = 0.0) -> None:
        with self._lock:
            self.faults.append(Fault(path=path, status=status, times=times, retry_after_s=retry_after_s,
                                     kind=kind, seconds=seconds))

    def reset(self) -> None:
        """Forget recorded requests and queued faults (the items and assets stay)."""
        with self._lock:
            self.hits.clear()
            self.faults.clear()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if path.startswith(f.path) and f.times > 0:
                    f.times -= 1
                    if not f.times:
                        self.faults.remove(f)
                    return f
        return None

    def hits_to(self, prefix: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path.startswith(prefix)]

    # --------------------------------------------------------------------------------- content

    def _build(self) -> None:
        """Write the COG assets and the items."""
        for i, s in enumerate(self.scenes):
            if s.collection == S2:
                baseline, applied, offset = S2_STATES[i % len(S2_STATES)]
                for half in (0, 1):
                    item_id = f"S2{s.platform[-1].upper()}_52TFN_{s.acquired:%Y%m%d}_{i}_L2A_{'WE'[half]}"
                    t = s.acquired + timedelta(seconds=2 * half)
                    assets = {key: self._cog(s, band, f"{item_id}_{key}", half=half, offset=offset if key != "scl" else 0)
                              for key, band in S2_ASSETS.items()}
                    props: dict[str, Any] = {
                        "datetime": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "platform": s.platform,
                        "constellation": "sentinel-2", "instruments": ["msi"],
                        "eo:cloud_cover": s.cloud_cover if s.cloud_cover is not None else 0.0,
                        "s2:processing_baseline": baseline, "proj:epsg": int(s.crs.split(":")[1]),
                        "grid:code": f"MGRS-52TFN{'WE'[half]}",
                    }
                    if applied is not None:
                        props["earthsearch:boa_offset_applied"] = applied
                    self.items.append(self._item(item_id, S2, s, props, assets))
                    self.expected[item_id] = {"offset": offset, "scene": s}
            else:
                item_id = f"S1{s.platform[-1].upper()}_IW_GRDH_1SDV_{s.acquired:%Y%m%dT%H%M%S}_{i}_rtc"
                assets = {key: self._cog(s, band, f"{item_id}_{key}", half=None, offset=0)
                          for key, band in S1_ASSETS.items()}
                props = {"datetime": s.acquired.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                         "platform": s.platform.upper(), "constellation": "Sentinel-1",
                         "sar:instrument_mode": "IW", "sar:polarizations": ["VV", "VH"]}
                if s.orbit_direction:
                    props["sat:orbit_state"] = s.orbit_direction
                if s.relative_orbit is not None:
                    props["sat:relative_orbit"] = s.relative_orbit
                self.items.append(self._item(item_id, S1_RTC, s, props, assets))
                self.expected[item_id] = {"offset": 0, "scene": s}

    def _cog(self, s: SourceScene, band: str, name: str, *, half: int | None, offset: int) -> dict[str, Any]:
        import rasterio
        from affine import Affine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(s.path) as ds:
                data = ds.read(list(ds.descriptions).index(band) + 1)
                t, crs = ds.transform, ds.crs
        h, w = data.shape
        # Around the scene the tile holds other land (noise), so reading the whole file would cost
        # far more than the blocks under the AOI.
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if s.collection == S2:
            dtype = np.uint16 if band != "SCL" else np.uint8
            canvas = rng.integers(1, 6 if band == "SCL" else 64, (h + 2 * PAD, w + 2 * PAD)).astype(dtype)
            part = data.astype(np.int64)
            if offset:
                part = np.where(part > 0, part + offset, 0)
            if half is not None:
                cut = w // 2
                keep = np.zeros_like(part, dtype=bool)
                if half == 0:
                    keep[:, :cut] = True
                else:
                    keep[:, cut:] = True
                part = np.where(keep, part, 0)
            canvas[PAD:PAD + h, PAD:PAD + w] = part.astype(canvas.dtype)
            nodata: float = 0
        else:
            canvas = (rng.integers(1, 64, (h + 2 * PAD, w + 2 * PAD)) / 256.0).astype(np.float32)
            vals = np.where(np.isfinite(data) & (data != 0), data, S1_NODATA).astype(np.float32)
            canvas[PAD:PAD + h, PAD:PAD + w] = vals
            nodata = S1_NODATA
        transform = Affine(t.a, 0.0, t.c - PAD * t.a, 0.0, t.e, t.f - PAD * t.e)
        path = self.assets_dir / f"{name}.tif"
        with rasterio.open(path, "w", driver="COG", width=canvas.shape[1], height=canvas.shape[0], count=1,
                           dtype=canvas.dtype.name, crs=crs, transform=transform, nodata=nodata,
                           compress="deflate", blocksize=256, overviews="none") as dst:
            dst.write(canvas, 1)
        dtype = canvas.dtype.name
        return {"href": f"{self.url}/assets/{path.name}", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"], "raster:bands": [{"nodata": nodata, "data_type": dtype}]}

    def _item(self, item_id: str, collection: str, s: SourceScene, props: dict[str, Any],
              assets: dict[str, Any]) -> dict[str, Any]:
        w, so, e, n = s.bbox_ll
        return {
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection,
            "stac_extensions": [], "bbox": [w, so, e, n],
            "geometry": {"type": "Polygon", "coordinates": [[[w, so], [e, so], [e, n], [w, n], [w, so]]]},
            "properties": props, "assets": assets,
            "links": [{"rel": "self", "href": f"{self.url}/collections/{collection}/items/{item_id}"},
                      {"rel": "collection", "href": f"{self.url}/collections/{collection}"},
                      {"rel": "root", "href": f"{self.url}/"}],
        }

    # ---------------------------------------------------------------------------------- search

    def search(self, params: Mapping[str, Any], method: str) -> dict[str, Any]:
        items = list(self.items)
        collections = params.get("collections")
        if isinstance(collections, str):
            collections = collections.split(",")
        if collections:
            items = [i for i in items if i["collection"] in collections]
        bbox = params.get("bbox")
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        if bbox:
            bw, bs, be, bn = bbox
            items = [i for i in items if not (i["bbox"][2] < bw or i["bbox"][0] > be or i["bbox"][3] < bs or i["bbox"][1] > bn)]
        if params.get("datetime"):
            value = str(params["datetime"])
            if "/" in value:
                lo_s, hi_s = value.split("/", 1)
                lo = _parse_time(lo_s) if lo_s not in ("", "..") else None
                hi = _parse_time(hi_s) if hi_s not in ("", "..") else None
            else:
                lo = hi = _parse_time(value)
            items = [i for i in items if (lo is None or _parse_time(i["properties"]["datetime"]) >= lo)
                     and (hi is None or _parse_time(i["properties"]["datetime"]) <= hi)]
        query = params.get("query")
        if isinstance(query, str):
            query = json.loads(query)
        for prop, cond in (query or {}).items():
            items = [i for i in items if _query(i["properties"].get(prop), cond)]
        items.sort(key=lambda i: i["properties"]["datetime"], reverse=True)
        limit = min(int(params.get("limit", 10)), self.page_size)
        start = int(params.get("next") or 0)
        page = items[start:start + limit]
        links: list[dict[str, Any]] = [{"rel": "root", "href": f"{self.url}/", "type": "application/json"}]
        if start + limit < len(items):
            if method == "POST":
                links.append({"rel": "next", "href": f"{self.url}/search", "type": "application/geo+json",
                              "method": "POST", "body": {"next": start + limit}, "merge": True})
            else:
                q = {k: (",".join(map(str, v)) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v)
                     for k, v in params.items() if k != "next"}
                from urllib.parse import urlencode

                links.append({"rel": "next", "href": f"{self.url}/search?{urlencode({**q, 'next': start + limit})}",
                              "type": "application/geo+json", "method": "GET"})
        return {"type": "FeatureCollection", "features": page, "links": links,
                "numberMatched": len(items), "numberReturned": len(page)}

    def landing(self) -> dict[str, Any]:
        return {
            "type": "Catalog", "id": "fake-earth-search", "stac_version": "1.0.0",
            "description": "railwatch test STAC API", "conformsTo": CONFORMS_TO,
            "links": [
                {"rel": "self", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "conformance", "href": f"{self.url}/conformance", "type": "application/json"},
                {"rel": "data", "href": f"{self.url}/collections", "type": "application/json"},
                {"rel": "search", "href": f"{self.url}/search", "type": "application/geo+json", "method": "GET"},
                {"rel": "search", "href": f"{self.url}/search", "type": "application/geo+json", "method": "POST"},
            ],
        }

    def collection(self, cid: str) -> dict[str, Any]:
        return {"type": "Collection", "id": cid, "stac_version": "1.0.0", "description": cid, "license": "proprietary",
                "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
                "links": [{"rel": "self", "href": f"{self.url}/collections/{cid}"}]}


def _query(value: Any, cond: Mapping[str, Any]) -> bool:
    if value is None:
        return False
    ops = {"eq": lambda a, b: a == b, "neq": lambda a, b: a != b, "lt": lambda a, b: a < b,
           "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b, "gte": lambda a, b: a >= b}
    return all(ops[op](value, arg) for op, arg in cond.items())


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeStac
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        fake = self.server_fake
        split = urlsplit(self.path)
        path = split.path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        rng = self.headers.get("Range")
        status, headers, payload = 404, {"Content-Type": "application/json"}, b'{"code":"NotFound"}'
        fault = fake._take_fault(path)
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
            fault = None
        if fault is not None:
            status = fault.status
            payload = json.dumps({"code": "Injected", "description": f"injected {fault.status}"}).encode()
            headers = {"Content-Type": "application/json"}
            if fault.retry_after_s is not None:
                headers["Retry-After"] = str(int(fault.retry_after_s))  # delay-seconds: an integer
        elif path in ("/", ""):
            status, payload = 200, json.dumps(fake.landing()).encode()
        elif path == "/conformance":
            status, payload = 200, json.dumps({"conformsTo": CONFORMS_TO}).encode()
        elif path == "/collections":
            cols = [fake.collection(c) for c in (S2, S1_RTC)]
            status, payload = 200, json.dumps({"collections": cols, "links": []}).encode()
        elif path.startswith("/collections/") and path.count("/") == 2:
            cid = path.rsplit("/", 1)[1]
            if cid in (S2, S1_RTC):
                status, payload = 200, json.dumps(fake.collection(cid)).encode()
            else:
                status, payload = 404, json.dumps({"code": "NotFoundError", "description": f"no collection {cid}"}).encode()
        elif path == "/search":
            params = body if method == "POST" else {k: v[0] for k, v in parse_qs(split.query).items()}
            status, payload = 200, json.dumps(fake.search(params or {}, method)).encode()
            headers = {"Content-Type": "application/geo+json"}
        elif path.startswith("/assets/"):
            status, headers, payload = self._asset(path[len("/assets/"):], rng)
        sent = 0 if method == "HEAD" else len(payload)
        with fake._lock:
            fake.hits.append(Hit(method=method, path=path, range=rng, status=status, sent=sent, body=body))
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _asset(self, name: str, rng: str | None) -> tuple[int, dict[str, str], bytes]:
        fake = self.server_fake
        if "/" in name or not name.endswith(".tif"):
            return 404, {"Content-Type": "text/plain"}, b"not found"
        path = fake.assets_dir / name
        if not path.exists():
            return 404, {"Content-Type": "text/plain"}, b"not found"
        data = path.read_bytes()
        size = len(data)
        base = {"Content-Type": "image/tiff", "Accept-Ranges": "bytes"}
        if rng is None:
            return 200, {**base, "Content-Length": str(size)}, data
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        if not m:
            return 416, {**base, "Content-Range": f"bytes */{size}"}, b""
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size:
            return 416, {**base, "Content-Range": f"bytes */{size}"}, b""
        chunk = data[start:end + 1]
        return 206, {**base, "Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(len(chunk))}, chunk
