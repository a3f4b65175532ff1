"""Evidence an analyst can check: before/after quicklooks, the changed track pixels as GeoJSON, and a
one-page HTML report of an AOI (``railwatch report``).

The top half is pure (arrays and rows in, PNG bytes, GeoJSON mappings and HTML text out); the
bottom half loads what it needs — observations and alerts from the store, scenes from the imagery
provider — and writes files. The change shown is recomputed with the detector's own functions on
the same reference the pipeline used (earlier usable scenes of the same sensor and geometry), so
the highlighted pixels are the ones that counted.

Entry points for other modules: :func:`render_alert_evidence` (the delivery code attaches its
files) and :func:`write_report` (the CLI).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from railwatch.domain import S1, S2, Aoi, Observation, SceneRef, iso, utc
from railwatch.errors import ProviderError, RailwatchError

if TYPE_CHECKING:
    from railwatch.analysis import AoiContext, OnGrid, Prepared
    from railwatch.config import DetectorSettings, Settings
    from railwatch.store import Store

__all__ = [
    "HIGHLIGHT_RGB",
    "LAYOUT_KEY",
    "RING_RGB",
    "TRACK_RGB",
    "EvidenceError",
    "ReportResult",
    "SceneEvidence",
    "alert_dict",
    "change_features",
    "crop_window",
    "display_rgb",
    "load_scene_evidence",
    "quicklook_png",
    "render_alert_evidence",
    "report_html",
    "write_report",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]

#: Colour of the changed pixels on the "after" panel (drawn at HIGHLIGHT_ALPHA over the scene).
HIGHLIGHT_RGB = (255, 0, 255)
HIGHLIGHT_ALPHA = 0.7
#: Colour of the track-pixel outline on both panels.
TRACK_RGB = (255, 214, 10)
#: Colour of the rings drawn around each group of changed pixels (so small groups are seen at a glance).
RING_RGB = (0, 229, 255)
#: PNG text chunk of a quicklook holding its layout (crop window and panel boxes in PNG pixels), so a
#: reader (or a test) can map any pixel of the picture back to the AOI grid.
LAYOUT_KEY = "railwatch-layout"
#: Blue reflectance above which a pixel is cloud or snow, left out of the true-colour stretch.
CLOUDY_BLUE = 0.2
SENSOR_LABEL = {S2: "Sentinel-2 (true colour)", S1: "Sentinel-1 (VV, dB)"}
USABLE_STATUSES = ("ok", "partial")


class EvidenceError(RailwatchError):
    """Evidence for an alert cannot be made (unknown alert, no opening scene, no reference)."""


# --- pure: arrays -> pictures and GeoJSON ----------------------------------------------------
@dataclass(frozen=True, eq=False)
class SceneEvidence:
    """What one alert's opening scene looked like against its reference, on the AOI grid.

    ``before`` is the per-pixel median of the reference scenes, ``after`` the scene that opened the
    alert (reflectance 0..1 for Sentinel-2, linear sigma0 for Sentinel-1). ``occupied`` are the
    changed track pixels and ``magnitude`` the detector's change statistic (noise units for optical,
    backscatter ratio for radar; 0 off the track).
    """

    alert_id: int
    aoi_id: str
    aoi_name: str
    sensor: str
    acquired: datetime
    before: Mapping[str, F32]
    after: Mapping[str, F32]
    track: B
    occupied: B
    magnitude: F32
    crs: str
    transform: Any  # affine.Affine of the AOI grid
    threshold: float | None = None
    reference_times: tuple[datetime, ...] = ()
    north_deg: float = 0.0  # true north, degrees clockwise from the grid's up
    estimated_cars: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def scene_id(self) -> str:
        return SceneRef(self.aoi_id, self.sensor, self.acquired).scene_id

    @property
    def pixel_m(self) -> float:
        return float(abs(self.transform.a))


def _robust_range(values: Sequence[F32], lo_q: float = 2.0, hi_q: float = 98.0) -> tuple[float, float]:
    data = np.concatenate([v[np.isfinite(v)].ravel() for v in values]) if values else np.array([], np.float32)
    if data.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(data, [lo_q, hi_q]))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def _db(linear: F32) -> F32:
    out = np.full(linear.shape, np.nan, np.float32)
    ok = np.isfinite(linear) & (linear > 0)
    out[ok] = 10.0 * np.log10(linear[ok])
    return out


def display_rgb(ev: SceneEvidence) -> tuple[F32, F32]:
    """(before, after) as RGB 0..1 with one robust 2–98 % stretch shared by both (comparable).

    Sentinel-2: true colour B04, B03, B02, per-band stretch of the land of both (clouds left out).
    Sentinel-1: VV in dB, grey. Missing pixels are black.
    """
    if ev.sensor == S1:
        pair = [_db(np.asarray(ev.before["VV"], np.float32)), _db(np.asarray(ev.after["VV"], np.float32))]
        lo, hi = _robust_range(pair)
        out = []
        for img in pair:
            g = np.clip((img - lo) / (hi - lo), 0, 1)
            out.append(np.nan_to_num(np.repeat(g[..., None], 3, axis=2), nan=0.0).astype(np.float32))
        return out[0], out[1]
    chans: list[list[F32]] = [[], []]
    # Clouds and snow (bright in blue) stay out of the stretch, so they do not darken the land.
    land = [np.asarray(img.get("B02", np.zeros(ev.track.shape)), np.float32) < CLOUDY_BLUE
            for img in (ev.before, ev.after)]
    for band in ("B04", "B03", "B02"):
        pair = [np.asarray(ev.before[band], np.float32), np.asarray(ev.after[band], np.float32)]
        pair = [np.where(p > 0, p, np.nan) for p in pair]
        lo, hi = _robust_range([np.where(ok, p, np.nan) for p, ok in zip(pair, land, strict=True)])
        for i, img in enumerate(pair):
            chans[i].append(np.clip((img - lo) / (hi - lo), 0, 1))
    before, after = (np.nan_to_num(np.stack(c, axis=2), nan=0.0).astype(np.float32) for c in chans)
    return before, after


def crop_window(occupied: B, track: B, *, margin: int = 40, min_size: int = 120) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the changed pixels (else the track) with a margin, at least
    ``min_size`` pixels a side where the grid allows, so the cars are large enough to see."""
    h, w = occupied.shape
    focus = occupied if occupied.any() else track
    if not focus.any():
        return 0, h, 0, w
    rows, cols = np.nonzero(focus)

    def span(lo: int, hi: int, size: int) -> tuple[int, int]:
        lo, hi = lo - margin, hi + 1 + margin
        if hi - lo < min_size:
            grow = min_size - (hi - lo)
            lo, hi = lo - grow // 2, hi + grow - grow // 2
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = max(0, lo - (hi - size)), size
        return lo, hi

    r0, r1 = span(int(rows.min()), int(rows.max()), h)
    c0, c1 = span(int(cols.min()), int(cols.max()), w)
    return r0, r1, c0, c1


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _nice_length(max_m: float) -> float:
    for v in (5000, 2000, 1000, 500, 250, 200, 100, 50, 20, 10):
        if v <= max_m:
            return float(v)
    return 10.0


def _fmt_m(m: float) -> str:
    return f"{m / 1000:g} km" if m >= 1000 else f"{m:g} m"


def quicklook_png(ev: SceneEvidence, *, title: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """Before and after side by side, track pixels outlined, changed pixels highlighted, with a
    scale bar and a north arrow. Returns the PNG and its layout (also stored in the PNG under
    :data:`LAYOUT_KEY`): the crop ``window`` (row0, row1, col0, col1) of the AOI grid and, per
    panel, the ``box`` (left, top, right, bottom) in PNG pixels that the window fills."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Patch, Rectangle

    before, after = display_rgb(ev)
    r0, r1, c0, c1 = crop_window(ev.occupied, ev.track)
    h, w = r1 - r0, c1 - c0
    track = ev.track[r0:r1, c0:c1]
    occ = ev.occupied[r0:r1, c0:c1]
    overlay = np.zeros((h, w, 4), np.float32)
    overlay[occ] = (*(c / 255.0 for c in HIGHLIGHT_RGB), HIGHLIGHT_ALPHA)
    outline = [pe.withStroke(linewidth=2.5, foreground="black")]

    panel_in = 5.8
    # At least ~1.7 picture pixels per grid pixel, so single changed pixels stay visible.
    dpi = int(np.clip(2.0 * max(w, h) / panel_in, 100, 160))
    height_px = round(min(12.0, max(4.5, panel_in * h / w + 1.9)) * dpi)  # whole pixels: the layout is exact
    fig, axes = plt.subplots(1, 2, figsize=(12, height_px / dpi), dpi=dpi)
    n_ref = len(ev.reference_times)
    ref_span = (f"{ev.reference_times[0]:%Y-%m-%d} … {ev.reference_times[-1]:%Y-%m-%d}"
                if ev.reference_times else "")
    titles = [
        f"before: median of {n_ref} reference scene{'s' if n_ref != 1 else ''}\n{ref_span}",
        f"after: {ev.scene_id}\n{int(ev.occupied.sum())} changed track pixels",
    ]
    scale_m = _nice_length(w * ev.pixel_m / 4.0)
    for ax, img, ttl in zip(axes, (before, after), titles, strict=True):
        ax.imshow(img[r0:r1, c0:c1], interpolation="nearest")
        if track.any():
            ax.contour(track.astype(np.float32), levels=[0.5], colors=[_hex(TRACK_RGB)],
                       linewidths=0.9)
        ax.set_title(ttl, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        # Scale bar, bottom left, in grid pixels.
        bar = scale_m / ev.pixel_m
        x0, y0 = 0.05 * w, 0.92 * h
        ax.add_patch(Rectangle((x0, y0), bar, max(1.0, 0.012 * h), facecolor="white", edgecolor="black", lw=1))
        ax.text(x0 + bar / 2, y0 - 0.025 * h, _fmt_m(scale_m), color="white", ha="center", va="bottom",
                fontsize=9, path_effects=outline)
        # North arrow, top right, turned to true north.
        theta = math.radians(ev.north_deg)
        dx, dy = math.sin(theta), math.cos(theta)
        tip = (0.92, 0.86)
        ax.annotate("", xy=tip, xycoords="axes fraction", xytext=(-28 * dx, -28 * dy), textcoords="offset points",
                    arrowprops={"arrowstyle": "-|>", "color": "white", "lw": 2, "mutation_scale": 14,
                                "path_effects": outline})
        ax.annotate("N", xy=tip, xycoords="axes fraction", xytext=(9 * dx, 9 * dy), textcoords="offset points",
                    color="white", fontsize=11, fontweight="bold", ha="center", va="center", path_effects=outline)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    axes[1].imshow(overlay, interpolation="nearest", zorder=3)  # above the track outline
    if occ.any():
        from scipy import ndimage

        labels, n = ndimage.label(occ, structure=np.ones((3, 3), bool))
        centres = ndimage.center_of_mass(occ, labels, range(1, n + 1))
        extents = ndimage.find_objects(labels)
        radius = [max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) / 2 + 3 for sl in extents]
        for (cy, cx), rad in zip(centres, radius, strict=True):
            axes[1].add_patch(Circle((cx, cy), rad, facecolor="none", edgecolor=_hex(RING_RGB), lw=1.2))
    axes[1].set_xlim(-0.5, w - 0.5)
    axes[1].set_ylim(h - 0.5, -0.5)
    cars = f", estimated {ev.estimated_cars:.0f} cars" if ev.estimated_cars is not None else ""
    fig.suptitle(title or f"{ev.aoi_name} — alert #{ev.alert_id}, {SENSOR_LABEL.get(ev.sensor, ev.sensor)}{cars}",
                 fontsize=12)
    fig.legend(handles=[Patch(facecolor="none", edgecolor=_hex(TRACK_RGB), label="track pixels"),
                        Patch(facecolor=_hex(HIGHLIGHT_RGB), label="changed track pixels"),
                        Circle((0, 0), 1, facecolor="none", edgecolor=_hex(RING_RGB), label="group of changed pixels")],
               loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.94))
    fig.canvas.draw()
    height = fig.bbox.height
    panels = []
    for name, ax in zip(("before", "after"), axes, strict=True):
        bb = ax.get_window_extent()
        panels.append({"name": name, "box": [round(float(v), 2) for v in (bb.x0, height - bb.y1, bb.x1,
                                                                           height - bb.y0)]})
    layout = {"window": [r0, r1, c0, c1], "panels": panels, "grid_shape": list(ev.track.shape),
              "crs": ev.crs, "transform": [float(v) for v in tuple(ev.transform)[:6]]}
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={LAYOUT_KEY: json.dumps(layout)})
    plt.close(fig)
    return buf.getvalue(), layout


def change_features(ev: SceneEvidence, *, precision: int = 7) -> dict[str, Any]:
    """The changed track pixels as an RFC 7946 FeatureCollection in lon/lat: one square Polygon per
    pixel (counter-clockwise), with its change ``magnitude`` and the ``group`` (8-connected cluster)
    it belongs to, so a GIS can dissolve by group."""
    from pyproj import Transformer
    from scipy import ndimage

    labels, n_groups = ndimage.label(ev.occupied, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    rows, cols = np.nonzero(ev.occupied)
    tr = Transformer.from_crs(ev.crs, "EPSG:4326", always_xy=True)
    t = ev.transform
    # Corners in counter-clockwise order on the ground (x east, y north): SW, SE, NE, NW.
    offsets = ((0, 1), (1, 1), (1, 0), (0, 0))
    xs = np.array([[t.c + (c + dc) * t.a + (r + dr) * t.b for dc, dr in offsets] for r, c in zip(rows, cols, strict=True)])
    ys = np.array([[t.f + (c + dc) * t.d + (r + dr) * t.e for dc, dr in offsets] for r, c in zip(rows, cols, strict=True)])
    lon, lat = tr.transform(xs, ys) if rows.size else (xs, ys)
    group_max: dict[int, float] = {}
    for r, c in zip(rows, cols, strict=True):
        g = int(labels[r, c])
        group_max[g] = max(group_max.get(g, 0.0), float(ev.magnitude[r, c]))
    area = abs(t.a * t.e - t.b * t.d)
    features = []
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        ring = [[round(float(lon[i][k]), precision), round(float(lat[i][k]), precision)] for k in range(4)]
        ring.append(ring[0])
        g = int(labels[r, c])
        features.append({
            "type": "Feature",
            "id": i + 1,
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "alert_id": ev.alert_id, "aoi": ev.aoi_id, "sensor": ev.sensor, "acquired": iso(ev.acquired),
                "group": g, "group_pixels": int(sizes[g]), "group_magnitude_max": round(group_max[g], 3),
                "row": int(r), "col": int(c), "magnitude": round(float(ev.magnitude[r, c]), 3),
                "threshold": None if ev.threshold is None else round(float(ev.threshold), 3),
                "area_m2": round(area, 1),
            },
        })
    fc: dict[str, Any] = {
        "type": "FeatureCollection",
        "name": f"changes-{ev.alert_id}",
        "railwatch": {
            "aoi": ev.aoi_id, "alert_id": ev.alert_id, "sensor": ev.sensor, "scene_id": ev.scene_id,
            "acquired": iso(ev.acquired), "pixels": int(rows.size), "groups": int(n_groups),
            "reference_scenes": [iso(x) for x in ev.reference_times],
            "magnitude": ("ratio of backscatter (VV+VH) to the reference" if ev.sensor == S1
                          else "spectral distance to the reference, in units of the scene's noise"),
        },
        "features": features,
    }
    if rows.size:
        fc["bbox"] = [round(float(np.min(lon)), precision), round(float(np.min(lat)), precision),
                      round(float(np.max(lon)), precision), round(float(np.max(lat)), precision)]
    return fc


# --- pure: the HTML page ------------------------------------------------------------------------
def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, datetime):
        return iso(v) or "—"
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(label)}</th>" for _key, label in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell(r.get(key)))}</td>" for key, _label in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px;color:#1d2125;background:#fff;
max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccd;padding-bottom:4px}
.sub{color:#555;margin:0 0 12px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d4da;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f5}
img{max-width:100%;height:auto;border:1px solid #d0d4da}.kv td:first-child{font-weight:600;background:#f7f8fa}
.state-provisional{color:#b5651d}.state-confirmed{color:#c1121f;font-weight:600}.state-dismissed{color:#888}
.note{color:#555;font-size:13px}.silenced{background:#fff3cd;border:1px solid #e0c36a;padding:8px;margin:8px 0}
"""


def report_html(
    *,
    aoi_id: str,
    aoi_name: str,
    generated_at: datetime,
    period: tuple[datetime | None, datetime | None],
    summary: Sequence[tuple[str, Any]],
    chart_png: bytes | None,
    alerts: Sequence[Mapping[str, Any]],
    evidence: Mapping[int, Mapping[str, Any]],
    silences: Sequence[Mapping[str, Any]] = (),
    problems: Sequence[str] = (),
) -> str:
    """One self-contained page: every picture and GeoJSON embedded as a data URI, no external resource.

    ``alerts``: one mapping per alert (keys as ``railwatch alerts --format json``, plus the analyst
    feedback). ``evidence``: alert id -> {"quicklook": PNG bytes, "geojson": mapping, "pixels": n}.
    """
    e = html.escape
    first, last = period
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: the page must read the same offline, forwarded or archived.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>railwatch report — {e(aoi_name)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(aoi_name)} <span class=\"sub\">({e(aoi_id)})</span></h1>",
        f"<p class=\"sub\">railwatch activity report, generated {e(iso(generated_at) or '')}; scenes from "
        f"{e(iso(first) or '—')} to {e(iso(last) or '—')}.</p>",
    ]
    for s in silences:
        parts.append(f"<div class=\"silenced\">Notifications for this AOI are <b>silenced</b> until "
                     f"{e(str(s.get('until')))} (silence {e(str(s.get('id')))}: {e(str(s.get('reason')))}). "
                     "Scenes and alerts are still recorded.</div>")
    parts.append("<h2>Summary</h2>")
    parts.append("<table class=\"kv\"><tbody>" + "".join(
        f"<tr><td>{e(k)}</td><td>{e(_cell(v))}</td></tr>" for k, v in summary) + "</tbody></table>")
    parts.append("<h2>Activity</h2>")
    if chart_png:
        parts.append(f'<img alt="estimated rail cars per scene" src="{_data_uri(chart_png, "image/png")}">')
    parts.append("<p class=\"note\">Estimated rail cars per usable scene with the 80 % interval; the dashed line "
                 "and hatched band are the baseline ± its spread, the dotted line the alert threshold; shaded "
                 "periods are alerts (✓ confirmed by an analyst, ✗ dismissed); markers at the top are scenes "
                 "without an estimate, by reason.</p>")
    parts.append("<h2>Alerts</h2>")
    if alerts:
        cols = [("id", "#"), ("state", "state"), ("acquired", "opened by scene"), ("sensor", "sensor"),
                ("estimated_cars", "cars (latest)"), ("interval", "80 % interval"), ("peak_cars", "peak"),
                ("baseline_cars", "baseline"), ("score", "score"), ("last_acquired", "last elevated scene"),
                ("resolved_at", "resolved"), ("feedback", "analyst feedback")]
        rows = []
        for a in alerts:
            lo, hi = a.get("estimated_cars_low"), a.get("estimated_cars_high")
            feedback = ""
            if a.get("dismissed_at"):
                feedback = f"dismissed {a.get('dismissed_at')}: {a.get('dismissed_reason') or ''}"
            elif a.get("acknowledged_at"):
                feedback = f"confirmed {a.get('acknowledged_at')}" + (f": {a['ack_note']}" if a.get("ack_note") else "")
            rows.append(dict(a) | {"interval": f"{lo:.0f}–{hi:.0f}" if lo is not None and hi is not None else None,
                                   "feedback": feedback or None})
        parts.append(_table(rows, cols))
    else:
        parts.append("<p>No alert in this period.</p>")
    for a in alerts:
        ev = evidence.get(int(a["id"]))
        if not ev:
            continue
        parts.append(f"<h2>Alert #{e(str(a['id']))} — {e(str(a.get('sensor')))} scene of {e(str(a.get('acquired')))} "
                     f"<span class=\"state-{e(str(a.get('state')))}\">({e(str(a.get('state')))})</span></h2>")
        if ev.get("quicklook"):
            parts.append(f'<img alt="before and after, alert {e(str(a["id"]))}" '
                         f'src="{_data_uri(ev["quicklook"], "image/png")}">')
        if ev.get("geojson") is not None:
            data = json.dumps(ev["geojson"]).encode("utf-8")
            parts.append(f'<p class="note">{e(str(ev.get("pixels", 0)))} changed track pixels. '
                         f'<a download="changes-{e(str(a["id"]))}.geojson" '
                         f'href="{_data_uri(data, "application/geo+json")}">Download them as GeoJSON</a> '
                         f'(also written next to this page as changes-{e(str(a["id"]))}.geojson).</p>')
    if problems:
        parts.append("<h2>Not shown</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- loading: store and provider -> evidence ------------------------------------------------
def _north_deg(crs: str, transform: Any, shape: tuple[int, int]) -> float:
    """Direction of true north at the grid's centre, degrees clockwise from grid up (UTM convergence)."""
    from pyproj import Transformer

    col, row = shape[1] / 2.0, shape[0] / 2.0
    cx = transform.c + transform.a * col + transform.b * row
    cy = transform.f + transform.d * col + transform.e * row
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    from_ll = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    lon, lat = to_ll.transform(cx, cy)
    nx, ny = from_ll.transform(lon, lat + 0.01)
    return math.degrees(math.atan2(nx - cx, ny - cy))


def _provider(settings: Settings, provider: Any | None) -> Any:
    if provider is not None:
        return provider
    from railwatch.cli import make_provider  # the one mapping from config names to providers

    return make_provider(settings)


class _Scenes:
    """Prepared scenes of one AOI, loaded once per report (alerts share reference scenes), each with its
    whole-grid bands (the pictures show the whole AOI)."""

    def __init__(self, ctx: AoiContext, provider: Any, cfg: DetectorSettings, sources: Mapping[Any, str],
                 size: int = 32) -> None:
        self.ctx, self.provider, self.cfg, self.sources, self.size = ctx, provider, cfg, sources, size
        self._cache: OrderedDict[tuple[str, datetime], Prepared] = OrderedDict()

    def get(self, collection: str, acquired: datetime) -> Prepared:
        from railwatch.analysis import prepare

        key = (collection, utc(acquired))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        ref = SceneRef(self.ctx.aoi.id, collection, key[1], self.sources.get(key, ""))
        prepared = prepare(self.ctx, ref, self.provider.fetch(self.ctx.aoi, ref), self.cfg, keep_grid=True)
        self._cache[key] = prepared
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return prepared


def _references(scene: Prepared, history: Sequence[Observation], cfg: DetectorSettings) -> list[Observation]:
    """The earlier scenes the pipeline compared this one with (as monitor.py chooses them)."""
    start = scene.ref.acquired - timedelta(days=cfg.reference_days)
    return [
        o for o in history
        if o.collection == scene.ref.collection and o.geometry_key == scene.geometry_key
        and start <= utc(o.acquired) < scene.ref.acquired and o.status in USABLE_STATUSES
        and not o.metrics.get("elevated")
    ][-cfg.reference_scenes:]


def _change(ctx: AoiContext, scene: Prepared, refs: Sequence[Prepared]) -> tuple[Any, Mapping[str, F32]]:
    """The detector's change of ``scene`` against ``refs`` (:func:`railwatch.analysis.scene_change`, the
    very computation the estimate came from), and the reference to show as "before" over the whole
    AOI (the detector builds its own only near the track).
    """
    from railwatch.analysis import scene_change
    from railwatch.detect import change as det

    change, _near_track = scene_change(ctx, scene, refs)
    now, grids = _grid(scene), [_grid(r) for r in refs]
    if scene.ref.collection == S2:  # the median of the references in the scene's own radiometry
        before = det.optical_reference(now.bands, [g.bands for g in grids], [g.clear for g in grids],
                                       ctx.stable & now.clear)
        return change, before
    valid = [np.isfinite(g.bands["VV"]) & (g.bands["VV"] > 0) for g in grids]
    return change, det.median_reference([g.bands for g in grids], ["VV"], valid)  # sigma0, for dB


def _grid(scene: Prepared) -> OnGrid:
    """The whole-grid bands of a scene :class:`_Scenes` prepared."""
    if scene.grid is None:
        raise ValueError(f"scene {scene.ref.acquired} was prepared without its whole-grid bands")
    return scene.grid


def load_scene_evidence(
    store: Store,
    settings: Settings,
    aoi: Aoi,
    alert: Any,
    *,
    provider: Any | None = None,
    history: Sequence[Observation] | None = None,
    _scenes: _Scenes | None = None,
) -> SceneEvidence:
    """The opening scene of ``alert`` (an AlertRow) against the reference the pipeline used.

    Raises EvidenceError when the alert has no opening scene (a stale alert) or too few earlier
    usable scenes remain, and ProviderError when a scene cannot be read.
    """
    from railwatch.analysis import AoiContext, min_reference
    from railwatch.config import effective_detector

    if alert.opened_acquired is None or not alert.sensor:
        raise EvidenceError(f"alert {alert.id} ({alert.kind}) was not opened by a scene: no before/after to show")
    cfg = effective_detector(settings, aoi.settings.get("detector"))
    scenes = _scenes or _Scenes(AoiContext.build(aoi, settings.aoi.track_half_width_m), _provider(settings, provider),
                                cfg, store.scene_sources(aoi.id))
    ctx = scenes.ctx
    scene = scenes.get(alert.sensor, alert.opened_acquired)
    history = history if history is not None else store.observations(aoi.id)
    chosen = _references(scene, history, cfg)
    refs: list[Prepared] = []
    for o in chosen:
        try:
            refs.append(scenes.get(o.collection, o.acquired))
        except ProviderError as exc:  # a reference that vanished from the archive is skipped, as the pipeline does
            log.warning("reference scene %s %s unavailable: %s", aoi.id, iso(o.acquired), exc, extra={"aoi": aoi.id})
    if len(refs) < min_reference(alert.sensor, cfg.reference_scenes):
        raise EvidenceError(f"alert {alert.id}: only {len(refs)} of the reference scenes of {iso(alert.opened_acquired)} "
                            "could be read; no before/after to show")
    change, before = _change(ctx, scene, refs)
    return SceneEvidence(
        alert_id=int(alert.id), aoi_id=aoi.id, aoi_name=aoi.name, sensor=alert.sensor,
        acquired=utc(alert.opened_acquired), before=before, after=_grid(scene).bands, track=ctx.track,
        occupied=np.asarray(change.occupied, bool), magnitude=np.asarray(change.magnitude, np.float32),
        crs=str(ctx.grid.crs), transform=ctx.grid.transform,
        threshold=(change.metrics or {}).get("threshold"),
        reference_times=tuple(r.ref.acquired for r in refs),
        north_deg=_north_deg(str(ctx.grid.crs), ctx.grid.transform, ctx.grid.shape),
        estimated_cars=alert.opening_cars if getattr(alert, "opening_cars", None) is not None else alert.estimated_cars,
        metrics=dict(change.metrics or {}),
    )


def _alert_row(store: Store, aoi: Aoi, alert_id: int) -> Any:
    from railwatch.store import AlertRow

    with store.session() as s:
        row = s.get(AlertRow, alert_id)
    if row is None or row.aoi_id != aoi.id:
        raise EvidenceError(f"no alert {alert_id} for AOI {aoi.id}; see `railwatch alerts --aoi {aoi.id}`")
    return row


def _write_evidence(ev: SceneEvidence, out_dir: Path) -> tuple[Path, Path, bytes, dict[str, Any]]:
    png, _layout = quicklook_png(ev)
    quick = out_dir / f"quicklook-{ev.alert_id}.png"
    quick.write_bytes(png)
    fc = change_features(ev)
    geo = out_dir / f"changes-{ev.alert_id}.geojson"
    geo.write_text(json.dumps(fc, indent=1), encoding="utf-8")
    return quick, geo, png, fc


def render_alert_evidence(
    store: Store,
    settings: Settings,
    aoi: Aoi,
    alert_id: int,
    out_dir: Path | str,
    *,
    provider: Any | None = None,
    since: datetime | None = None,
) -> dict[str, Path]:
    """Write the evidence of one alert into ``out_dir`` and return what was written:
    ``chart`` (activity-<id>.png: the activity chart, from 180 days before the alert unless ``since``),
    ``quicklook`` (quicklook-<id>.png) and ``geojson`` (changes-<id>.geojson).

    The last two are left out, with a warning in the log, when the alert has no opening scene (a
    stale alert) or its scenes can no longer be read; an unknown alert raises EvidenceError.
    ``provider`` defaults to the configured one.
    """
    from railwatch.report import write_chart

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alert = _alert_row(store, aoi, alert_id)
    start = since or ((utc(alert.opened_acquired) if alert.opened_acquired else utc(alert.opened_at))
                      - timedelta(days=180))
    files: dict[str, Path] = {
        "chart": write_chart(out / f"activity-{alert_id}.png", f"{aoi.name} — estimated rail cars (alert #{alert_id})",
                             store.observations(aoi.id, since=start), [alert],
                             since=start),
    }
    try:
        ev = load_scene_evidence(store, settings, aoi, alert, provider=provider)
    except (EvidenceError, ProviderError) as exc:
        log.warning("no quicklook for alert %s: %s", alert_id, exc, extra={"aoi": aoi.id, "alert": alert_id})
        return files
    files["quicklook"], files["geojson"], _png, _fc = _write_evidence(ev, out)
    return files


@dataclass
class ReportResult:
    """What :func:`write_report` wrote; ``problems`` says what could not be shown and why."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    alerts: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def alert_dict(a: Any) -> dict[str, Any]:
    """One alert row as plain data (the ``alerts --format json`` keys plus analyst feedback)."""
    return {
        "id": a.id, "kind": a.kind, "aoi": a.aoi_id, "acquired": iso(a.opened_acquired), "sensor": a.sensor,
        "state": a.state, "estimated_cars": a.estimated_cars, "estimated_cars_low": a.estimated_cars_low,
        "estimated_cars_high": a.estimated_cars_high, "peak_cars": a.peak_cars, "baseline_cars": a.baseline_cars,
        "score": a.score, "last_acquired": iso(a.last_acquired), "resolved_at": iso(a.resolved_at),
        "acknowledged_at": iso(getattr(a, "acknowledged_at", None)), "ack_note": getattr(a, "ack_note", None),
        "dismissed_at": iso(getattr(a, "dismissed_at", None)),
        "dismissed_reason": getattr(a, "dismissed_reason", None),
    }


def _summary(observations: Sequence[Observation], alerts: Sequence[Any], calibrations: Mapping[str, Any],
             ) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    statuses = Counter(o.status for o in observations)
    rows.append(("scenes", len(observations)))
    rows.append(("scenes with an estimate", sum(1 for o in observations if o.usable)))
    rows.append(("scenes by status", ", ".join(f"{k} {v}" for k, v in statuses.most_common()) or None))
    for sensor, label in ((S2, "Sentinel-2"), (S1, "Sentinel-1")):
        usable = [o for o in observations if o.usable and o.collection == sensor]
        if not usable:
            continue
        last = usable[-1]
        rows.append((f"{label}: latest estimate",
                     f"{last.estimated_cars:.0f} cars (80 %: {last.estimated_cars_low or 0:.0f}–"
                     f"{last.estimated_cars_high or 0:.0f}) on {iso(last.acquired)}"))
        if last.metrics.get("baseline_cars") is not None:
            rows.append((f"{label}: baseline", f"{float(last.metrics['baseline_cars']):.1f} cars"
                         + (f", alert above {float(last.metrics['threshold_cars']):.1f}"
                            if last.metrics.get("threshold_cars") is not None else "")))
        cal = calibrations.get(sensor)
        if cal is not None:
            rows.append((f"{label}: calibration", f"scale {cal.scale:.2f} from {cal.n_counts} analyst counts"))
    states = Counter(a.state for a in alerts)
    rows.append(("alerts", ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"))
    rows.append(("confirmed by analysts", sum(1 for a in alerts if getattr(a, "acknowledged_at", None)
                                               and a.state != "dismissed")))
    rows.append(("dismissed as false alarms", states.get("dismissed", 0)))
    return rows


def _runs_until(alert: Any) -> datetime:
    """When the alert stopped running: resolution or dismissal, else (still open) never."""
    if alert.state in ("provisional", "confirmed"):
        return datetime.max.replace(tzinfo=UTC)
    end = alert.resolved_at or getattr(alert, "dismissed_at", None) or alert.last_acquired or alert.opened_acquired
    return utc(end or alert.opened_at)


def write_report(
    store: Store,
    settings: Settings,
    aoi: Aoi,
    out_dir: Path | str,
    *,
    now: datetime,
    since: datetime | None = None,
    latest: bool = False,
    provider: Any | None = None,
) -> ReportResult:
    """``railwatch report``: activity.png, quicklook-<id>.png and changes-<id>.geojson per activity
    alert (only the latest with ``latest``), and report.html embedding them all.

    An alert whose scenes cannot be read is listed in ``problems`` and the rest is still written.
    """
    from railwatch.analysis import AoiContext
    from railwatch.config import effective_detector
    from railwatch.report import write_chart
    from railwatch.triage import list_silences

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ReportResult(out)
    observations = store.observations(aoi.id, since=since)
    history = store.observations(aoi.id)
    alerts = [a for a in store.alerts(aoi_id=aoi.id) if since is None or _runs_until(a) >= utc(since)]
    chart_title = f"{aoi.name} ({aoi.id}) — estimated rail cars per scene"
    result.files["chart"] = write_chart(out / "activity.png", chart_title, observations, alerts,
                                        since=since)
    activity = [a for a in alerts if a.kind == "activity" and a.opened_acquired is not None]
    if latest:
        activity = activity[-1:]
    evidence: dict[int, dict[str, Any]] = {}
    if activity:
        cfg = effective_detector(settings, aoi.settings.get("detector"))
        scenes = _Scenes(AoiContext.build(aoi, settings.aoi.track_half_width_m), _provider(settings, provider), cfg,
                         store.scene_sources(aoi.id))
        for a in activity:
            try:
                ev = load_scene_evidence(store, settings, aoi, a, history=history, _scenes=scenes)
            except (EvidenceError, ProviderError) as exc:
                result.problems.append(f"alert {a.id}: {exc}")
                log.warning("no quicklook for alert %s: %s", a.id, exc, extra={"aoi": aoi.id, "alert": a.id})
                continue
            quick, geo, png, fc = _write_evidence(ev, out)
            result.files[f"quicklook-{a.id}"] = quick
            result.files[f"changes-{a.id}"] = geo
            result.alerts.append(int(a.id))
            evidence[int(a.id)] = {"quicklook": png, "geojson": fc, "pixels": int(ev.occupied.sum())}
    silences = [s.as_dict(now) for s in list_silences(store, now=now, aoi_id=aoi.id) if s.state(now) == "active"]
    page = report_html(
        aoi_id=aoi.id, aoi_name=aoi.name, generated_at=now,
        period=(observations[0].acquired if observations else since,
                observations[-1].acquired if observations else None),
        summary=_summary(observations, alerts, store.calibrations(aoi.id)),
        chart_png=result.files["chart"].read_bytes(),
        alerts=[alert_dict(a) for a in alerts],
        evidence=evidence, silences=silences, problems=result.problems,
    )
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    result.files["html"] = html_path
    return result
