"""STAC provider: an open STAC API (Earth Search and the like) searched with pystac-client, its
Cloud-Optimised GeoTIFF assets read by window onto the AOI grid with rasterio.

``search`` groups the tile items of one acquisition into one SceneRef, as the Sentinel Hub provider
does. ``fetch`` opens each asset over HTTP (GDAL ``/vsicurl/``: HTTP range requests, only the
blocks under the AOI), warps it onto :func:`railwatch.geo.aoi_grid` with a ``WarpedVRT`` (nearest
neighbour), mosaics the tiles least recent first, removes the Sentinel-2 L2A +1000 offset where the
item says it is still in the data, writes the scene into the archive and returns what it reads back.
An archived scene is never fetched again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from railwatch.domain import COLLECTIONS, S1, S2, Aoi, Raster, SceneRef, utc
from railwatch.errors import ProviderError, ProviderUnavailable, SceneUnreadable
from railwatch.geo import Grid, aoi_grid
from railwatch.imagery.archive import cached_fetch, orbit_tags
from railwatch.imagery.sentinelhub import ACQUISITION_WINDOW, group_acquisitions

if TYPE_CHECKING:
    from railwatch.config import Settings

log = logging.getLogger(__name__)

#: Sentinel band -> Earth Search asset key.
DEFAULT_ASSETS: Mapping[str, str] = {
    "B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl", "VV": "vv", "VH": "vh",
}
BANDS: Mapping[str, tuple[str, ...]] = {S2: ("B02", "B03", "B04", "B08", "SCL"), S1: ("VV", "VH")}
#: Sentinel-2 L2A digital numbers carry BOA_ADD_OFFSET = -1000 from processing baseline 04.00 on.
BOA_OFFSET = 1000
_HTTP_CODE = re.compile(r"HTTP (?:response )?code:?\s*(\d{3})", re.I)


def needs_offset_removal(properties: Mapping[str, Any]) -> bool:
    """True when an L2A item's pixels still carry the +1000 offset of processing baseline >= 04.00.

    ``earthsearch:boa_offset_applied: true`` means the catalogue already removed it; without a
    processing baseline nothing is subtracted.
    """
    if properties.get("earthsearch:boa_offset_applied") is True:
        return False
    raw = properties.get("s2:processing_baseline") or properties.get("processing:version")
    try:
        return float(str(raw)) >= 4.0
    except (TypeError, ValueError):
        return False


class StacProvider:
    """Scenes from a STAC API with COG assets, cached in the local archive.

    ``fetch`` may run in several threads at once (a pass's read-ahead thread, the executor's AOI
    threads): the client is opened once under a lock, and rasterio keeps GDAL's settings per thread.
    """

    name = "stac"

    def __init__(
        self,
        *,
        url: str,
        archive_root: Path | str,
        collections: Mapping[str, str],
        assets: Mapping[str, str] | None = None,
        max_scene_cloud_percent: float = 90.0,
        page_size: int = 100,
        max_attempts: int = 4,
        backoff_seconds: float = 2.0,
        timeout_seconds: float = 120.0,
        method: str = "POST",
        read_threads: int = 1,
    ) -> None:
        self.url = url.rstrip("/")
        self.archive_root = Path(archive_root)
        self.read_threads = read_threads  # GDAL threads decoding an archived scene ([imagery] read_threads)
        self.collections = dict(collections)
        self.assets = {**DEFAULT_ASSETS, **(assets or {})}
        self.max_scene_cloud_percent = max_scene_cloud_percent
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self.method = method
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> StacProvider:
        st = settings.imagery.stac
        kwargs: dict[str, Any] = dict(
            url=st.url, archive_root=settings.imagery.files.root, read_threads=settings.imagery.read_threads,
            collections=st.collections, assets=st.assets,
            max_scene_cloud_percent=st.max_scene_cloud_percent, page_size=st.page_size,
            max_attempts=st.max_attempts, backoff_seconds=st.backoff_seconds, timeout_seconds=st.timeout_seconds,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"StacProvider(url={self.url!r})"

    # -------------------------------------------------------------------------------- errors

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """The one place where pystac-client, requests and GDAL errors become railwatch errors."""
        import requests
        from pystac_client.exceptions import APIError
        from rasterio.errors import RasterioError

        try:
            yield
        except ProviderError:
            raise
        except APIError as exc:
            status = getattr(exc, "status_code", None)
            text = " ".join(str(exc).split())[:300]
            if status is None or status == 429 or status >= 500:
                raise ProviderUnavailable(f"{what}: {text or 'no answer'} (after {self.max_attempts} attempt(s))") from exc
            raise ProviderError(f"{what}: the STAC API answered {status}: {text}") from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise ProviderUnavailable(f"{what}: {type(exc).__name__}") from exc
        except RasterioError as exc:
            text = " ".join(str(exc).split())[:300]
            m = _HTTP_CODE.search(text)
            code = int(m.group(1)) if m else None
            if code is not None and 400 <= code < 500 and code != 429:
                raise ProviderError(f"{what}: asset refused ({code}): {text}") from exc
            if code is not None or any(k in text.lower() for k in ("timeout", "timed out", "connect", "curl")):
                raise ProviderUnavailable(f"{what}: {text}") from exc
            raise SceneUnreadable(f"{what}: unreadable asset: {text}") from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise ProviderError(f"{what}: unexpected answer ({type(exc).__name__}: {exc})") from exc

    # ------------------------------------------------------------------------------------ check

    def check(self) -> list[str]:
        """What `railwatch provider test` reports: the API answers, supports item search, has each
        configured collection, and its newest item carries every asset railwatch reads. No scene is
        downloaded. Returns the problems found, each naming the setting to fix (empty: all good)."""
        problems: list[str] = []
        try:
            client = self._open()
        except ProviderError as exc:
            return [f"[imagery.stac] url: {exc}"]
        if not client.conforms_to("ITEM_SEARCH"):
            problems.append(f"[imagery.stac] url: {self.url} does not declare STAC API item search "
                            "(conformance class item-search); railwatch needs /search")
        if not self.collections:
            problems.append("[imagery.stac] collections: no sensor is mapped to a collection; nothing would be searched")
        for collection, cid in self.collections.items():
            try:
                with self._errors(f"STAC collection {cid!r} at {self.url}"):
                    found = client.get_collection(cid)
            except ProviderError as exc:
                problems.append(f"[imagery.stac] collections.{collection} = {cid!r}: {exc}")
                continue
            if found is None:
                problems.append(f"[imagery.stac] collections.{collection} = {cid!r}: no such collection at {self.url}")
                continue
            try:
                with self._errors(f"STAC search of {cid!r} at {self.url}"):
                    items = list(client.search(collections=[cid], max_items=1, limit=1, method=self.method).items())
            except ProviderError as exc:
                problems.append(f"[imagery.stac] collections.{collection} = {cid!r}: {exc}")
                continue
            if not items:
                problems.append(f"[imagery.stac] collections.{collection} = {cid!r}: the collection has no items")
                continue
            have = set(items[0].assets)
            missing = [f"{b} (asset {self.assets[b]!r})" for b in BANDS[collection] if self.assets[b] not in have]
            if missing:
                problems.append(f"[imagery.stac] assets: item {items[0].id} of {cid!r} lacks {', '.join(missing)}; "
                                f"it has {sorted(have)}")
        return problems

    # ------------------------------------------------------------------------------------ search

    def _open(self) -> Any:
        with self._client_lock:  # one client, even when fetches run in two threads (read-ahead)
            if self._client is None:
                from pystac_client import Client
                from pystac_client.stac_api_io import StacApiIO
                from urllib3.util.retry import Retry

                retry = Retry(
                    total=self.max_attempts - 1, backoff_factor=self.backoff_seconds, backoff_max=max(self.backoff_seconds * 8, 1),
                    backoff_jitter=self.backoff_seconds / 2, status_forcelist=(429, 500, 502, 503, 504),
                    allowed_methods=None, respect_retry_after_header=True, raise_on_status=False,
                )
                io = StacApiIO(timeout=self.timeout_seconds, max_retries=retry)
                with self._errors(f"STAC API {self.url}"):
                    self._client = Client.open(self.url, stac_io=io)
            return self._client

    def search(
        self, aoi: Aoi, since: datetime, until: datetime, collections: Sequence[str] = COLLECTIONS
    ) -> list[SceneRef]:
        """Acquisitions with ``since < acquired <= until``; sensors without a configured collection
        are skipped (with one warning)."""
        lo, hi = utc(since), utc(until)
        refs: list[SceneRef] = []
        for collection in collections:
            cid = self.collections.get(collection)
            if cid is None:
                if collection not in self._warned:
                    log.warning("STAC: no collection configured for %s ([imagery.stac] collections); skipped",
                                collection)
                    self._warned.add(collection)
                continue
            refs.extend(r for r in self._search(aoi, collection, cid, lo, hi) if lo < r.acquired <= hi)
        refs.sort(key=lambda r: (r.acquired, r.collection))
        return refs

    def _search(self, aoi: Aoi, collection: str, cid: str, lo: datetime, hi: datetime) -> list[SceneRef]:
        client = self._open()
        query = None
        if collection == S2 and self.max_scene_cloud_percent < 100:
            query = {"eo:cloud_cover": {"lte": self.max_scene_cloud_percent}}
        with self._errors(f"STAC search of {cid} over AOI {aoi.id} at {self.url}"):
            search = client.search(collections=[cid], bbox=list(aoi.bbox), datetime=[lo, hi], query=query,
                                   limit=self.page_size, method=self.method)
            items = [item.to_dict(transform_hrefs=False) for item in search.items()]
        by_id = {it["id"]: it for it in items}
        refs = []
        for ref in group_acquisitions(aoi.id, collection, items):
            members = [by_id[i] for i in ref.extra["item_ids"]]
            extra = {**ref.extra, "items": [
                {"id": m["id"], "assets": {b: m["assets"][self.assets[b]]["href"] for b in BANDS[collection]
                                           if self.assets[b] in m.get("assets", {})},
                 "remove_offset": collection == S2 and needs_offset_removal(m.get("properties", {}))}
                for m in members]}
            refs.append(replace(ref, source=";".join(m["id"] for m in members), extra=extra))
        return refs

    # ------------------------------------------------------------------------------------- fetch

    def _locate(self, aoi: Aoi, ref: SceneRef) -> SceneRef:
        """A ref without asset links (e.g. rebuilt from the store): search around its time."""
        cid = self.collections.get(ref.collection)
        if cid is None:
            raise ProviderError(f"no STAC collection configured for {ref.collection} ([imagery.stac] collections)")
        t = utc(ref.acquired)
        for cand in self._search(aoi, ref.collection, cid, t - timedelta(minutes=1), t + ACQUISITION_WINDOW):
            if cand.acquired == t:
                return cand
        raise ProviderError(f"{ref.scene_id} of AOI {aoi.id} is no longer in {self.url} ({cid})")

    def gdal_options(self) -> dict[str, Any]:
        """GDAL settings for remote COGs: no directory listing, bounded timeouts and retries."""
        return {
            "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
            "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff,.TIFF",
            "GDAL_HTTP_TIMEOUT": str(max(1, round(self.timeout_seconds))),
            "GDAL_HTTP_CONNECTTIMEOUT": str(max(1, round(min(self.timeout_seconds, 30)))),
            "GDAL_HTTP_MAX_RETRY": str(self.max_attempts - 1),
            "GDAL_HTTP_RETRY_DELAY": str(self.backoff_seconds),
            "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
            "VSI_CACHE": "TRUE",
        }

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster:
        """The scene on the AOI grid: from the archive if it is there, else read from the COGs,
        archived first and read back."""
        return cached_fetch(self.archive_root, aoi.id, ref, lambda: self._download(aoi, ref),
                            threads=self.read_threads)

    def _download(self, aoi: Aoi, ref: SceneRef) -> Raster:
        if not (ref.extra or {}).get("items"):
            ref = self._locate(aoi, ref)
        return self._read(ref, aoi_grid(aoi), f"STAC read of {ref.scene_id} of AOI {aoi.id}")

    def _read(self, ref: SceneRef, grid: Grid, what: str) -> Raster:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        names = BANDS[ref.collection]
        shape = grid.shape
        out: dict[str, npt.NDArray[Any]] = {
            b: np.zeros(shape, dtype=np.uint16 if ref.collection == S2 else np.float32) for b in names}
        filled = np.zeros(shape, dtype=bool)
        items = list(ref.extra["items"])
        with rasterio.Env(**self.gdal_options()), self._errors(what):
            for item in items:  # group order: least recent first
                missing = [b for b in names if b not in item["assets"]]
                if missing:
                    raise ProviderError(f"{what}: item {item['id']} has no asset for {', '.join(missing)} "
                                        f"(asset keys from [imagery.stac] assets: "
                                        f"{', '.join(self.assets[b] for b in missing)})")
                take: npt.NDArray[np.bool_] | None = None
                for band in names:
                    with rasterio.open(item["assets"][band]) as src, WarpedVRT(
                        src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                        resampling=Resampling.nearest, nodata=src.nodata,
                    ) as vrt:
                        data = vrt.read(1)
                        valid = vrt.read_masks(1) > 0
                    if ref.collection == S1:
                        valid &= np.isfinite(data) & (data != 0)
                    else:
                        valid &= data != 0
                    if take is None:  # the first band decides which pixels this item supplies
                        take = valid & ~filled
                    if ref.collection == S2 and band != "SCL" and item["remove_offset"]:
                        data = np.where(data > 0, np.maximum(data.astype(np.int32) - BOA_OFFSET, 1), 0)
                    out[band][take] = data[take].astype(out[band].dtype)
                assert take is not None
                filled |= take
        if ref.collection == S1:
            for b in names:
                out[b][~filled] = np.nan
        tags = {"PROVIDER": "stac", "STAC_API": self.url, "SOURCE_ITEMS": ref.source[:2000]}
        if ref.collection == S2:
            tags["S2_OFFSET_REMOVED"] = ",".join(i["id"] for i in items if i["remove_offset"]) or "none needed"
        tags |= orbit_tags(ref)
        return Raster(bands=out, crs=grid.crs, transform=grid.transform, tags=tags)


__all__ = ["DEFAULT_ASSETS", "StacProvider", "needs_offset_removal"]
