"""The change detector: pure numpy functions from arrays to measurements (no I/O, no clock).

``quality`` decides whether a scene can be used on the AOI's track pixels; ``change`` (optical and radar)
measures the change of the track pixels against a reference of the same place; ``estimate`` turns
occupied track pixels into rail cars with an interval; ``calibrate`` fits the per-AOI, per-sensor
scale to analysts' counts. See docs/detector.md.
"""

from __future__ import annotations

#: Recorded on every observation; `railwatch reprocess` recomputes observations after it changes.
#: 2.0.0: core track pixels, PIF normalisation, sub-pixel registration, robust Mahalanobis test,
#: cloud-edge buffer, wet-snow test, median radar reference with along-track CFAR, calibration.
#: 2.1.0: radar gain re-measured on car-free track pixels, two-scene opening rule.
#: 2.2.0: per-geometry radar calibration, optical scenes never open an alert alone (nor near cloud),
#: the persistence test skips scenes that could not be judged.
#: 2.2.1: references built only near the track (and on a sample of stable pixels for the radiometric
#: fit), so cost and memory follow the track rather than the AOI's area; estimates barely move.
#: 2.3.0: scenes kept and tested as vectors over the change zone (the same test); the optical
#: references' radiometric gains are fitted on the zone's pseudo-invariant pixels (was: the whole
#: grid's), so estimates move by the gains' noise; the radar reference is computed on the track only.
#: 2.4.0: radiometric fits on at most 5 000 pseudo-invariant pixels (was 20 000), the optical
#: registration search and noise covariance on at most 2 000 track pixels, window means summed over
#: their usable pixels only when fewer than 40 % are usable (the optical surroundings and the radar
#: window), the wet-snow level on at most 5 000 stable pixels, for speed (bench/kernel.py); estimates
#: move by the fits' noise and float rounding.
#: 2.5.0: an optical radiometric fit measures a gain only when its pseudo-invariant pixels span a range
#: (their scatter elongated 25:1), else it is an offset (one material's round cloud gave arbitrary
#: gains that scrambled a band); the fits that bring each reference scene to the scene's radiometry
#: take 1 000 pixels and three passes (was 5 000 and four), for speed; an optical scene needs three earlier
#: clear scenes (was two: the median of two is their mean, and a car gone since either counted).
#: 2.6.0: the alert rule judges a radar geometry short of history of its own (fewer than min_history
#: scenes) against its sensor's baseline once three of its scenes read within 2x of the other geometries'
#: level (``geometry_baseline_fallback``); decisions change, and with them the few counts whose
#: references changed (a scene judged elevated is not a reference).
#: 2.7.0: occupied pixels become length at the metres of centreline per pixel a consist lights (its own track's
#: pixels and, through the radar window, a neighbouring track's: ``aoi.lit_pixels``), not per tested pixel,
#: which counted a yard's shared pixel once for every track through it; an AOI's estimates change by a
#: constant factor (the shipped AOIs' radar 2.5-6.5x lower, optical about 2x), which calibration absorbs.
#: 2.7.1: the calibration scale is held near the physical model by a prior on log(scale) (σ 0.7, the model's
#: own uncertainty): counts that agree still fix it, but one count on a raw estimate of half a car no
#: longer drags the model by a factor of 20. Raw estimates are unchanged; calibrated ones change where a
#: calibration is fitted again (``calibrate``, ``reprocess``).
DETECTOR_VERSION = "2.7.1"
