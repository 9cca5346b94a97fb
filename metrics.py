"""Metrics and label-free thresholds: the one module every script and test uses.

Score convention: a higher score means more anomalous; a point is predicted
anomalous when ``score > threshold``.

Honesty rules kept here: labels are only ever used to *compute* metrics.
Threshold selectors (:func:`spot_threshold`, :func:`percentile_threshold`,
:func:`select_threshold`) take no labels.  Metrics that pick the threshold with
the labels are oracles and carry the ``_oracle`` suffix; point-adjusted
numbers (``*_pa``) are always reported next to the point-wise ones.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Mapping

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

log = logging.getLogger(__name__)

NAN = float("nan")
# VUS-PR buffer range l = 0..VUS_MAX_WINDOW (TSB-UAD: 2 x sliding window; 2 x the default
# seq_len 20).  Fixed so every method is compared on the same surface.
VUS_MAX_WINDOW = 40

__all__ = [
    "segments", "point_adjust", "prf", "auc_roc", "auc_pr",
    "best_f1_oracle", "best_f1_pa_oracle", "soft_range_labels", "range_pr_auc",
    "vus_pr", "spot_threshold", "exponential_scale_bound", "percentile_threshold", "select_threshold",
    "evaluate", "summarize", "hitrate", "hitrate_random", "interpretation_metrics",
    "AlertState", "alert_metrics", "held_alarms", "alert_totals", "sample_weights", "segment_sample",
]

DAY_S = 86400.0


# --------------------------------------------------------------------------- helpers
def _scores(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN/inf")
    return s


def _labels(labels: Any, n: int | None = None) -> np.ndarray:
    y = np.asarray(labels).ravel().astype(np.int64)
    if n is not None and y.size != n:
        raise ValueError(f"labels have {y.size} points, scores have {n}")
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError("labels must be 0/1")
    return y


def segments(labels: Any) -> np.ndarray:
    """Runs of non-zero labels as an (k, 2) int array of [start, end) pairs."""
    y = np.asarray(labels).ravel() != 0
    d = np.diff(np.concatenate([[False], y, [False]]).astype(np.int8))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return np.stack([starts, ends], axis=1) if starts.size else np.zeros((0, 2), dtype=np.int64)


def point_adjust(labels: Any, pred: Any) -> np.ndarray:
    """Point adjustment: every point of a true segment with >=1 flagged point becomes flagged."""
    y = _labels(labels)
    p = np.asarray(pred).ravel().astype(bool).copy()
    if p.size != y.size:
        raise ValueError("labels and pred differ in length")
    for s, e in segments(y):
        if p[s:e].any():
            p[s:e] = True
    return p


def prf(labels: Any, pred: Any) -> tuple[float, float, float]:
    """Point-wise (precision, recall, F1) of binary predictions.

    Precision is 0 when nothing is predicted (sklearn's zero_division=0); recall
    and F1 are NaN when there are no true anomalies (undefined).
    """
    y = _labels(labels).astype(bool)
    p = np.asarray(pred).ravel().astype(bool)
    tp = float(np.sum(y & p))
    n_pred, n_pos = float(p.sum()), float(y.sum())
    precision = tp / n_pred if n_pred > 0 else 0.0
    if n_pos == 0:
        return precision, NAN, NAN
    recall = tp / n_pos
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def auc_roc(scores: Any, labels: Any) -> float:
    """AUC-ROC; NaN when only one class is present."""
    s = _scores(scores)
    y = _labels(labels, s.size)
    if y.size == 0 or y.min() == y.max():
        return NAN
    return float(roc_auc_score(y, s))


def auc_pr(scores: Any, labels: Any) -> float:
    """AUC-PR as average precision (sklearn); NaN without anomalies."""
    s = _scores(scores)
    y = _labels(labels, s.size)
    if y.sum() == 0:
        return NAN
    return float(average_precision_score(y, s))


# --------------------------------------------------------------------------- oracle F1
def _best_f1_sweep(keys: np.ndarray, tp_w: np.ndarray, fp_w: np.ndarray,
                   n_pos: float) -> tuple[float, float]:
    """Max F1 over thresholds 'key >= k' from per-item TP/FP weights, O(n log n).

    Items with equal keys flip together (one candidate per unique key).
    Returns (best F1, threshold usable as ``score > threshold``).
    """
    if n_pos <= 0:
        return NAN, NAN
    order = np.argsort(-keys, kind="mergesort")
    k = keys[order]
    tp = np.cumsum(tp_w[order])
    fp = np.cumsum(fp_w[order])
    last = np.flatnonzero(np.r_[k[1:] != k[:-1], True])  # last index of each tie group
    tp, fp = tp[last], fp[last]
    f1 = 2 * tp / (tp + fp + n_pos)  # = 2TP / (2TP + FP + FN)
    i = int(np.argmax(f1))
    if f1[i] <= 0:
        return 0.0, float(k[0])  # predict nothing
    thr = float(np.nextafter(k[last[i]], -np.inf))  # score > thr  <=>  score >= key
    return float(f1[i]), thr


def best_f1_oracle(scores: Any, labels: Any, return_threshold: bool = False):
    """ORACLE best point-wise F1 over all thresholds (uses labels to choose it)."""
    s = _scores(scores)
    y = _labels(labels, s.size).astype(np.float64)
    f1, thr = _best_f1_sweep(s, y, 1.0 - y, float(y.sum()))
    return (f1, thr) if return_threshold else f1


def best_f1_pa_oracle(scores: Any, labels: Any, return_threshold: bool = False):
    """ORACLE best point-adjusted F1 over all thresholds, O(n log n).

    A true segment becomes fully detected at the threshold equal to its max
    score, so the sweep runs over segment maxima (weight = segment length as TP)
    together with normal points' scores (weight 1 as FP).
    """
    s = _scores(scores)
    y = _labels(labels, s.size)
    seg = segments(y)
    normal = y == 0
    seg_max = np.array([s[a:b].max() for a, b in seg], dtype=np.float64)
    seg_len = (seg[:, 1] - seg[:, 0]).astype(np.float64)
    keys = np.concatenate([seg_max, s[normal]])
    tp_w = np.concatenate([seg_len, np.zeros(int(normal.sum()))])
    fp_w = np.concatenate([np.zeros(len(seg)), np.ones(int(normal.sum()))])
    f1, thr = _best_f1_sweep(keys, tp_w, fp_w, float(y.sum()))
    return (f1, thr) if return_threshold else f1


# --------------------------------------------------------------------------- VUS-PR
def soft_range_labels(labels: Any, window: int) -> np.ndarray:
    """Labels with ramp buffers (TSB-UAD ``extend_postive_range``, symmetric version).

    For every anomaly segment [s, e], the ``window // 2`` points before s and
    after e get ``sqrt(1 - d / window)`` (d = distance to the segment); values
    of overlapping buffers add up and are clipped at 1.
    """
    y = _labels(labels).astype(np.float64)
    n = y.size
    half = int(window) // 2
    if half <= 0:
        return y
    out = y.copy()
    d = np.arange(1, half + 1)
    ramp = np.sqrt(1.0 - d / float(window))
    for s, e in segments(y):  # e exclusive; reference's e is e - 1
        after = (e - 1) + d
        ok = after < n
        out[after[ok]] += ramp[ok]
        before = s - d
        ok = before >= 0
        out[before[ok]] += ramp[ok]
    return np.minimum(out, 1.0)


def _sweep_positions(s_sorted: np.ndarray, n_thresholds: int | None) -> np.ndarray:
    """Last index (in descending order) of the tie group of each evaluated threshold."""
    n = s_sorted.size
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    if n_thresholds is None:
        return last
    idx = np.linspace(0, n - 1, int(n_thresholds)).astype(int)  # reference sampling
    return last[np.searchsorted(last, idx, side="left")]


def _range_pr_from_sorted(s: np.ndarray, order: np.ndarray, pos: np.ndarray,
                          y: np.ndarray, window: int) -> float:
    soft = soft_range_labels(y, window)
    seg = segments(soft > 0)
    n_seg = len(seg)
    p_orig = float(y.sum())
    p_new = (p_orig + float(soft.sum())) / 2.0
    thr = s[order][pos]
    tp = np.cumsum(soft[order])[pos]
    n_pred = pos + 1.0
    masked = np.where(soft > 0, s, -np.inf)
    seg_max = np.sort(np.maximum.reduceat(masked, seg[:, 0]))
    exist = n_seg - np.searchsorted(seg_max, thr, side="left")  # segments with max >= thr
    tpr = np.minimum(tp / p_new, 1.0) * exist / n_seg
    prec = tp / n_pred
    tpr = np.r_[0.0, tpr]
    prec = np.r_[1.0, prec]
    return float(np.sum((tpr[1:] - tpr[:-1]) * (prec[1:] + prec[:-1]) / 2.0))


def range_pr_auc(scores: Any, labels: Any, window: int = 0,
                 n_thresholds: int | None = None) -> float:
    """Range-based PR-AUC (Paparrizos et al.) with a label buffer of ``window``.

    Curve, as in TSB-UAD ``RangeAUC``: for thresholds t (pred = score >= t),
    TP = sum of soft labels on predicted points, recall = min(TP / P', 1) with
    P' = (P + sum(soft)) / 2, TPR = recall * (fraction of soft segments with a
    predicted point), precision = TP / #pred; area by trapezoids from (0, 1).
    ``n_thresholds=None`` uses every distinct score (exact); 250 reproduces the
    reference's subsampled thresholds.  NaN without anomalies.
    """
    return vus_pr(scores, labels, max_window=window, n_thresholds=n_thresholds, min_window=window)


def vus_pr(scores: Any, labels: Any, max_window: int = VUS_MAX_WINDOW,
           n_thresholds: int | None = None, min_window: int = 0) -> float:
    """VUS-PR (Paparrizos et al., VLDB 2022): mean range-PR-AUC over buffers l = 0..max_window.

    Matches TSB-UAD ``RangeAUC_volume`` (``windowSize = max_window``) except that
    all distinct thresholds are used unless ``n_thresholds=250`` is given.
    (min_window = max_window gives the range-PR-AUC of that one buffer.)
    """
    s = _scores(scores)
    y = _labels(labels, s.size)
    if y.sum() == 0:
        return NAN
    order = np.argsort(-s, kind="mergesort")
    pos = _sweep_positions(s[order], n_thresholds)
    vals = [_range_pr_from_sorted(s, order, pos, y, w) for w in range(int(min_window), int(max_window) + 1)]
    return float(np.mean(vals))


# --------------------------------------------------------------------------- thresholds (no labels)
def percentile_threshold(scores: Any, pct: float) -> float:
    """The ``pct``-th percentile (0..100) of label-free scores (e.g. validation)."""
    s = _scores(scores)
    return float(np.percentile(s, pct))


def _gpd_fit(peaks: np.ndarray) -> tuple[float, float] | None:
    """(gamma, sigma) of a GPD with loc=0 by maximum likelihood; None on failure."""
    from scipy.stats import genpareto
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gamma, _, sigma = genpareto.fit(peaks, floc=0.0)
    except Exception as exc:  # noqa: BLE001 - any optimiser failure -> fallback
        log.warning("SPOT: GPD fit failed (%s)", exc)
        return None
    if not (np.isfinite(gamma) and np.isfinite(sigma) and sigma > 0):
        return None
    # the fit must not be worse than the exponential (gamma=0) special case
    ll_gpd = float(np.sum(genpareto.logpdf(peaks, gamma, loc=0.0, scale=sigma)))
    mu = float(peaks.mean())
    ll_exp = -peaks.size * math.log(mu) - peaks.size
    if not np.isfinite(ll_gpd) or ll_gpd < ll_exp - 1e-9:
        return 0.0, mu
    return float(gamma), float(sigma)


SPOT_LOWEST_LEVEL = 0.5  # the lowest initial quantile spot_threshold lowers init_level to
SPOT_TAIL_CONFIDENCE = 0.95  # beyond the rows, the tail's scale is taken at this upper bound


def exponential_scale_bound(excesses: np.ndarray, confidence: float = SPOT_TAIL_CONFIDENCE) -> float:
    """The one-sided upper `confidence` bound of an exponential tail's scale from k excesses:
    2 k mean / chi2_{1 - confidence}(2 k), the chi-square quantile by Wilson-Hilferty (within
    0.1 % at 2 k >= 20). At k = 10 and 0.95: 1.84 x the mean."""
    k = excesses.size
    nu = 2.0 * k
    z = NormalDist().inv_cdf(1.0 - confidence)
    chi2 = nu * max(1.0 - 2.0 / (9.0 * nu) + z * math.sqrt(2.0 / (9.0 * nu)), 1e-3) ** 3
    return float(2.0 * k * excesses.mean() / chi2)


def spot_threshold(init_scores: Any, q: float = 1e-3, init_level: float = 0.99,
                   min_peaks: int = 10) -> float:
    """Peaks-Over-Threshold threshold (SPOT, Siffer et al., KDD 2017) on label-free scores.

    t = quantile(init_scores, init_level); a generalized Pareto distribution
    (loc 0) is fitted to the excesses over t by maximum likelihood and
    z_q = t + sigma/gamma * ((q n / N_t)^(-gamma) - 1)   (t - sigma log(q n / N_t) if gamma = 0).
    Short histories: where n (1 - init_level) < ``min_peaks``, init_level is lowered (to 0.5 at
    most) so the tail is fitted on ``min_peaks`` excesses, not on the 2-4 that 100-200 rows hold
    above their 0.98 quantile; and where z_q lies beyond the scores (q n < 1) the tail is the
    exponential (gamma = 0): a few dozen peaks cannot tell a bounded tail, whose z_q sits at the
    largest score, from a heavy one, whose z_q explodes. Its scale there is the upper
    SPOT_TAIL_CONFIDENCE bound of the mean excess (exponential_scale_bound): the few peaks of a
    short, autocorrelated history are one or two excursions, and their mean understates the tail
    the next hours reach (docs/decisions.md: the quiet fleet's 180 calibration rows, nezha_ob's
    93, the lab).
    With fewer than ``min_peaks`` excesses or a failed fit the exponential tail is used too (logged
    as a warning), and with < 2 distinct excesses the empirical (1 - q) quantile (logged).
    """
    s = _scores(init_scores)
    if s.size == 0:
        raise ValueError("spot_threshold needs scores")
    if not (0 < q < 1 and 0 < init_level < 1):
        raise ValueError("q and init_level must lie in (0, 1)")
    n = s.size
    if n * (1 - init_level) < min_peaks:
        init_level = min(init_level, max(1 - min_peaks / n, SPOT_LOWEST_LEVEL))
    t = float(np.quantile(s, init_level))
    peaks = s[s > t] - t
    n_t = peaks.size
    if n_t < 2 or np.ptp(peaks) == 0:
        log.warning("SPOT: %d usable peaks over t=%.6g; using the empirical %.4g quantile",
                    n_t, t, 1 - q)
        return float(max(np.quantile(s, 1 - q), t))
    ratio = q * n / n_t
    if n_t < min_peaks or q * n < 1:
        if n_t < min_peaks:
            log.warning("SPOT: only %d peaks (< %d); exponential tail used", n_t, min_peaks)
        fit = (0.0, exponential_scale_bound(peaks) if q * n < 1 else float(peaks.mean()))
    else:
        fit = _gpd_fit(peaks)
        if fit is None:
            log.warning("SPOT: GPD fit unusable; exponential tail used")
            fit = (0.0, float(peaks.mean()))
    gamma, sigma = fit
    if abs(gamma) < 1e-8:
        z = t - sigma * math.log(ratio)
    else:
        z = t + sigma / gamma * (ratio ** (-gamma) - 1.0)
    if not np.isfinite(z):
        log.warning("SPOT: non-finite z_q; using the empirical %.4g quantile", 1 - q)
        z = float(np.quantile(s, 1 - q))
    return float(z)


def select_threshold(init_scores: Any, method: str = "spot", q: float = 1e-3,
                     level: float = 0.99, pct: float = 99.0) -> float:
    """Label-free threshold from (validation) scores: 'spot' or 'percentile'."""
    method = method.lower()
    if method in ("spot", "pot"):
        return spot_threshold(init_scores, q=q, init_level=level)
    if method in ("percentile", "pct", "quantile"):
        return percentile_threshold(init_scores, pct)
    raise ValueError(f"unknown threshold method {method!r}")


# --------------------------------------------------------------------------- interpretation
def _truth_mask(segs: Any, n: int, n_features: int) -> np.ndarray:
    """(n, V) bool: feature j is in the ground truth of point i; overlapping segments unite."""
    mask = np.zeros((n, n_features), dtype=bool)
    for start, end, feats in segs:
        start, end = int(start), int(end)
        if not 0 <= start <= end < n:
            raise ValueError(f"segment [{start}, {end}] outside 0..{n - 1} or start > end")
        idx = np.asarray(list(feats), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_features):
            raise ValueError(f"segment [{start}, {end}]: feature index outside 0..{n_features - 1}")
        mask[start:end + 1, idx] = True
    return mask


def _top_k(n_truth: np.ndarray, p: float, n_features: int) -> np.ndarray:
    if not p > 0:
        raise ValueError(f"p must be > 0 (a percentage such as 100), got {p}")
    # floor(P% x |G|); the epsilon keeps e.g. 150 x 2 / 100 from flooring to 2.999..
    return np.minimum(np.floor(p * n_truth / 100.0 + 1e-9).astype(np.int64), n_features)


def hitrate(contrib: Any, segments: Any, p: float, weights: Any | None = None) -> float:
    """HitRate@P% (OmniAnomaly, KDD 2019) of per-feature contributions ``contrib`` (n, V).

    ``segments``: (start, end_inclusive, feature indices) per interpretation segment.  For each
    point covered by a segment, with ground truth G (the union of the sets of the segments
    covering it): |G ∩ top-k| / |G|, where top-k are the k = floor(P% x |G|) features of highest
    contribution at that point; averaged over the points.  Ties are broken by a stable sort of
    the descending contributions, so among equal values the lower feature index ranks first.
    ``weights`` (n,): each point's weight in the average (sample_weights: a sample of each
    segment's points standing for all of them; 0 = left out). NaN when no point has a
    non-empty G.
    """
    c = np.asarray(contrib, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"contrib must be (n_points, n_features), got shape {c.shape}")
    if c.size and not np.all(np.isfinite(c)):
        raise ValueError("contrib contains NaN/inf")
    truth = _truth_mask(segments, *c.shape)
    w = np.ones(c.shape[0]) if weights is None else np.asarray(weights, np.float64)
    rows = np.flatnonzero(truth.any(axis=1) & (w > 0))
    if rows.size == 0:
        return NAN
    truth, c, w = truth[rows], c[rows], w[rows]
    order = np.argsort(-c, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(c.shape[1])[None, :].repeat(len(rows), 0), axis=1)
    n_truth = truth.sum(axis=1)
    k = _top_k(n_truth, p, c.shape[1])
    hits = (truth & (rank < k[:, None])).sum(axis=1)
    return float(np.average(hits / n_truth, weights=w))


def sample_weights(n: int, segments: Any, per_segment: int) -> np.ndarray:
    """(n,) weights that let a sample of each interpretation segment's points stand for the whole
    segment in hitrate(): per_segment evenly spaced points of a segment of L points (all when
    L <= per_segment; first and last among them) weigh L / m each, every other point 0. Only the
    segment's own sample counts: rows named for other reasons (a flagged run) would weigh the
    segment towards where the detector flags."""
    w = np.zeros(n)
    for start, end, *_ in segments:
        rows = segment_sample(int(start), int(end), per_segment)
        free = rows[w[rows] == 0]  # a row of an earlier (overlapping) segment keeps that one's weight
        w[free] = (int(end) - int(start) + 1) / len(rows)
    return w


def segment_sample(start: int, end: int, per_segment: int = 0) -> np.ndarray:
    """The rows of a run start..end (inclusive) that stand for it: all, or at most per_segment
    evenly spaced (the first and the last among them). The one rule of which points are named
    (scoring.named_rows) and weighed (sample_weights)."""
    n = end - start + 1
    if per_segment <= 0 or n <= per_segment:
        return np.arange(start, end + 1)
    return start + np.unique(np.linspace(0, n - 1, per_segment).round().astype(np.int64))


def hitrate_random(segments: Any, n_features: int, p: float) -> float:
    """Expected HitRate@P% of a uniformly random feature ranking: the floor to read
    :func:`hitrate` against.  For a random ranking, E|G ∩ top-k| = k |G| / V, so each point
    contributes k / V (k = min(floor(P% x |G|), V)); averaged over the same points as
    :func:`hitrate`.  NaN when there are none."""
    segs = list(segments)
    if not segs:
        return NAN
    n = max(int(e) for _, e, _ in segs) + 1
    truth = _truth_mask(segs, n, int(n_features))
    n_truth = truth.sum(axis=1)
    n_truth = n_truth[n_truth > 0]
    if n_truth.size == 0:
        return NAN
    return float(np.mean(_top_k(n_truth, p, int(n_features)) / float(n_features)))


# --------------------------------------------------------------------------- alerts
@dataclass
class AlertState:
    """One entity's alarm, point by point: raised when `hold` scores in a row are above the
    threshold (Prometheus' ``for:``), resolved when `clear` scores in a row are not. An alarm
    lasts at least `clear` points and a quiet spell at least `hold`, so a series flapping around
    its threshold keeps one alarm. The one lifecycle: detect_live.py's alerts, and held_alarms,
    which test.py, baselines.py and ablation.py count alarm events with."""
    hold: int = 1
    clear: int = 1
    on: bool = False
    run: int = 0  # points in a row that disagree with the state (flagged while off, not while on)

    def update(self, flagged: bool) -> bool:
        """Take one point's flag (score > threshold) -> whether the state changed."""
        self.run = self.run + 1 if flagged != self.on else 0
        if self.run < (self.clear if self.on else self.hold):
            return False
        self.on, self.run = not self.on, 0
        return True


def held_alarms(pred: Any, hold: int = 1, clear: int = 1) -> np.ndarray:
    """The alarm state at each point of a series of flags (AlertState: on once `hold` points in a
    row are flagged, off once `clear` in a row are not). hold=1, clear=1: the flags themselves."""
    p = np.asarray(pred).ravel().astype(bool)
    state, out = AlertState(int(hold), int(clear)), np.zeros(p.size, bool)
    for i, f in enumerate(p.tolist()):
        state.update(f)
        out[i] = state.on
    return out


def _fault_kind(faults: np.ndarray | None, a: int, b: int) -> str:
    """The fault kind of the labelled run [a, b): its most common non-empty kind ('' if none)."""
    if faults is None:
        return ""
    kinds = [k for k in faults[a:b] if k]
    return max(set(kinds), key=kinds.count) if kinds else ""


def _fault_kinds(faults: Any | None) -> np.ndarray | None:
    """Fault kinds per point as strings, '' outside faults (None, NaN and '' alike)."""
    if faults is None:
        return None
    return np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                     for v in np.asarray(faults, dtype=object).ravel()], dtype=object)


def alert_metrics(pred: Any, labels: Any, faults: Any | None = None, step_s: float | None = None,
                  elsewhere: Any | None = None) -> dict[str, Any]:
    """What an SRE reads off a series of alarms (pred: 1 = the alarm is on at that point).

    An alarm event is a maximal run of flagged points; it is false when it touches no labelled
    point. A labelled run (fault event) is caught when at least one of its points is flagged;
    its detection delay is the number of steps from its first point to its first flagged one
    (0 when the alarm was already on). Per-day figures need the step between rows in seconds
    (step_s; the span is counted in rows, so a gap in the timestamps does not lengthen it):
    without one (timestamps that are row numbers and no --step_s) they are NaN, and
    ``false_alarms_per_1k`` (per 1,000 points) is the rate to read. ``per_fault_events`` counts
    the fault events and those caught by kind (``faults``: a kind per point, '' outside faults).
    ``elsewhere`` (a mask per point: another entity of the data set is in a labelled fault,
    elsewhere_masks) adds ``false_alarms_elsewhere``: the false alarm events that touch such a
    point, a symptom of a fault elsewhere (a caller's latency, a shared node) rather than noise.
    """
    y = _labels(labels)
    p = np.asarray(pred).ravel().astype(bool)
    if p.size != y.size:
        raise ValueError("labels and pred differ in length")
    fk = _fault_kinds(faults)
    alarms, faults_ = segments(p), segments(y)
    false = sum(1 for a, b in alarms if not y[a:b].any())
    delays, per_kind = [], {}
    for a, b in faults_:
        hit = np.flatnonzero(p[a:b])
        kind = per_kind.setdefault(_fault_kind(fk, a, b) or "unlabelled", {"events": 0, "caught": 0})
        kind["events"] += 1
        if hit.size:
            kind["caught"] += 1
            delays.append(int(hit[0]))
    days = p.size * step_s / DAY_S if step_s and step_s > 0 else NAN
    normal = y == 0
    out: dict[str, Any] = {
        "alarm_events": len(alarms), "false_alarm_events": false,
        "false_alarms_per_day": false / days if days > 0 else NAN,
        "false_alarms_per_1k": 1000.0 * false / p.size if p.size else NAN,
        "fault_events": len(faults_), "faults_caught": len(delays),
        "faults_caught_share": len(delays) / len(faults_) if len(faults_) else NAN,
        "delay_steps": float(np.median(delays)) if delays else NAN,
        "delay_s": float(np.median(delays)) * step_s if delays and step_s and step_s > 0 else NAN,
        "normal_flagged": float(p[normal].mean()) if normal.any() else NAN,
        "days": days,
    }
    if fk is not None:
        out["per_fault_events"] = {k: dict(v, caught_share=v["caught"] / v["events"]) for k, v in sorted(per_kind.items())}
    if elsewhere is not None:
        e = np.asarray(elsewhere, bool).ravel()
        out["false_alarms_elsewhere"] = sum(1 for a, b in alarms if not y[a:b].any() and e[a:b].any())
    return out


def elsewhere_masks(series: Mapping[str, tuple[np.ndarray, np.ndarray | None]], step_s: float | None
                    ) -> dict[str, np.ndarray]:
    """Per entity {name: (test timestamps, labels)}: a mask of its points within one step of a
    labelled point of another entity (alert_metrics' ``elsewhere``). Only where timestamps are
    times (step_s given): entities whose rows are row numbers do not share a clock."""
    if not step_s or step_s <= 0:
        return {}
    labelled = {n: np.sort(np.asarray(ts, np.float64)[np.asarray(y).ravel() > 0])
                for n, (ts, y) in series.items() if y is not None}
    out = {}
    for name, (ts, _) in series.items():
        other = np.concatenate([v for n, v in labelled.items() if n != name] or [np.zeros(0)])
        other.sort()
        t = np.asarray(ts, np.float64)
        if not len(other):
            out[name] = np.zeros(len(t), bool)
            continue
        i = np.searchsorted(other, t - step_s)  # the first labelled time >= t - step
        out[name] = (i < len(other)) & (other[np.minimum(i, len(other) - 1)] <= t + step_s)
    return out


def is_resource_fault(kind: str) -> bool:
    """A fault kind that starves or slows a service (CPU, memory, disk or network), as opposed to a
    code defect (nezha_ob's return and exception) or a pod's loss: the kind's name mentions cpu,
    memory, disk, io or network (nezha_ob's cpu_contention, cpu_consumed and network_delay, the
    lab's cpu-stress, memory-stress and network-delay; Chaos Mesh's StressChaos, NetworkChaos and
    IOChaos names alike)."""
    return bool(re.search(r"cpu|mem|disk|network|(?<![a-z])io(?![a-z])", str(kind).lower()))


def _count_of(a: Mapping[str, Any], kind: str | Callable[[str], bool] | None, field: str) -> int:
    """alert_metrics' result `a` counted over its fault events ("events") or those caught
    ("caught"): all of them, one kind's, or those of the kinds a predicate accepts
    (is_resource_fault)."""
    if kind is None:
        return a["fault_events" if field == "events" else "faults_caught"]
    match = kind if callable(kind) else kind.__eq__
    return sum(v[field] for k, v in a.get("per_fault_events", {}).items() if match(k))


def alert_frontier_oracle(scores: Any, labels: Any, faults: Any | None = None,
                          kind: str | Callable[[str], bool] | None = None, max_cuts: int = 400) -> list[list[int]]:
    """ORACLE (labels choose the threshold): over thresholds at the max_cuts highest scores (flags
    score >= cut, neither held nor cleared), the most fault events caught (of `kind` only, where
    given: a kind, or a predicate on kinds such as is_resource_fault) at each count of false alarm
    events -> [[false alarm events, caught], ...], fewer false alarms first, each pair catching
    more than the one before."""
    s, y = _scores(scores), _labels(labels)
    best: dict[int, int] = {0: 0}
    for t in np.unique(s)[::-1][:max_cuts]:
        a = alert_metrics(s >= t, y, faults)
        c = _count_of(a, kind, "caught")
        best[a["false_alarm_events"]] = max(best.get(a["false_alarm_events"], 0), c)
    front: list[list[int]] = []
    for fa in sorted(best):
        if not front or best[fa] > front[-1][1]:
            front.append([fa, best[fa]])
    return front


def ceiling_oracle(frontiers: list[tuple[list[list[int]], float]], budget: float = 1.0) -> int:
    """ORACLE: the most fault events the entities catch together, each at a point of its
    alert_frontier_oracle, with at most `budget` false alarm events per entity-day over all of
    them (a knapsack; frontiers: (frontier, the entity's days))."""
    allowed = budget * sum(days for _, days in frontiers)
    reach = {0: 0}
    for front, _ in frontiers:
        nxt: dict[int, int] = {}
        for used, caught in reach.items():
            for fa, c in front:
                if used + fa <= allowed:
                    nxt[used + fa] = max(nxt.get(used + fa, -1), caught + c)
        reach = nxt
    return max(reach.values())


def oracle_alert_ceiling(series: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, float | None]],
                         budget: float = 1.0, kind: str | Callable[[str], bool] | None = None) -> tuple[int, int]:
    """ORACLE (labels choose the thresholds): the most fault events the scores could catch with at
    most `budget` false alarm events per entity-day over all the entities together, each entity's
    threshold chosen with its labels (ceiling_oracle over their alert_frontier_oracle). What no
    label-free threshold on these scores beats -> (caught, fault events), counting only the fault
    events of `kind` where one is given (the thresholds then chosen for that kind alone). series:
    (scores, labels, faults, step_s) per entity; an entity without a step counts a day as 1,440
    points."""
    frontiers, total = [], 0
    for s, y, faults, step in series:
        frontiers.append((alert_frontier_oracle(s, y, faults, kind), len(s) * (step or 60.0) / DAY_S))
        total += _count_of(alert_metrics(np.zeros(len(s), bool), y, faults), kind, "events")
    return ceiling_oracle(frontiers, budget), total


# --------------------------------------------------------------------------- evaluate / summarize
def interpretation_metrics(contrib: np.ndarray, segments: list, ps: tuple[int, ...] = (100, 150),
                           weights: np.ndarray | None = None) -> dict[str, float]:
    """hitrate_<P> of per-feature contributions (n, V) (over a sample of the segments' points when
    weights are given: sample_weights) and its random-ranking floor hitrate_<P>_random, for P in
    ps (test.py and baselines.py report the same keys)."""
    out = {}
    for p in ps:
        out[f"hitrate_{p}"] = hitrate(contrib, segments, p, weights)
        out[f"hitrate_{p}_random"] = hitrate_random(segments, contrib.shape[1], p)
    return out


def evaluate(scores: Any, threshold: float | np.ndarray, labels: Any | None,
             faults: Any | None = None, vus_max_window: int = VUS_MAX_WINDOW,
             pred: Any | None = None, step_s: float | None = None, hold: int = 1,
             clear: int = 1, elsewhere: Any | None = None) -> dict[str, Any]:
    """All metrics for one series at a (label-free) threshold; pred = score > threshold unless
    the alarm state per point is given (``pred``), and the alert figures of alert_metrics
    (``step_s``: seconds between rows, for the per-day ones) of the alarms the flags raise under
    ``hold`` and ``clear`` (held_alarms; point-wise metrics are of the flags). Without labels,
    only the alarms (``alarm_events``, ``alarms_per_day``, ``flagged``).

    ``threshold``: a number, or one per point (scoring.thresholds: the drift guard); then
    ``threshold`` in the result is the lowest and ``threshold_max`` the highest.

    ``alert_frontier_oracle``: the labels' best (false alarms, caught) pairs over thresholds
    (alert_frontier_oracle), for alert_totals' oracle ceiling.

    ``faults``: fault-kind strings per point ('' outside faults) -> ``per_fault``
    with recall / f1 / auc_roc / n_points per kind (that kind's points positive,
    normal points negative, other kinds excluded).  Undefined values are NaN.
    """
    s = _scores(scores)
    thr = np.asarray(threshold, np.float64)
    if thr.ndim and thr.shape != s.shape:
        raise ValueError("per-point thresholds and scores differ in length")
    pred = s > thr if pred is None else np.asarray(pred).ravel().astype(bool)
    if pred.shape != s.shape:
        raise ValueError("pred and scores differ in length")
    out: dict[str, Any] = {"threshold": float(thr.min()) if thr.size else float("nan"),
                           "n_points": int(s.size), "n_predicted": int(pred.sum())}
    if thr.ndim:
        out["threshold_max"] = float(thr.max()) if thr.size else float("nan")
    if labels is None:
        alarms = alert_metrics(held_alarms(pred, hold, clear), np.zeros(s.size, np.int64), step_s=step_s)
        out.update(alarm_events=alarms["alarm_events"], alarms_per_day=alarms["false_alarms_per_day"],
                   alarms_per_1k=alarms["false_alarms_per_1k"], flagged=float(pred.mean()) if s.size else NAN,
                   days=alarms["days"], note="no labels: detection metrics need labels")
        return out
    y = _labels(labels, s.size)
    p, r, f = prf(y, pred)
    pp, rp, fpa = prf(y, point_adjust(y, pred))
    out.update(
        precision=p, recall=r, f1=f,
        precision_pa=pp, recall_pa=rp, f1_pa=fpa,
        auc_roc=auc_roc(s, y), auc_pr=auc_pr(s, y),
        best_f1_oracle=best_f1_oracle(s, y),
        best_f1_pa_oracle=best_f1_pa_oracle(s, y),
        vus_pr=vus_pr(s, y, max_window=vus_max_window),
        vus_max_window=int(vus_max_window),
        n_anomalies=int(y.sum()),
    )
    out.update(alert_metrics(held_alarms(pred, hold, clear), y, faults, step_s, elsewhere))
    out["alert_frontier_oracle"] = alert_frontier_oracle(s, y, faults)
    if any(is_resource_fault(k) for k in out.get("per_fault_events", {})):
        out["alert_frontier_resource_oracle"] = alert_frontier_oracle(s, y, faults, is_resource_fault)
    if faults is not None:
        out["per_fault"] = per_fault(s, y, pred, faults)
    return out


def per_fault(s: np.ndarray, y: np.ndarray, pred: np.ndarray, faults: Any) -> dict[str, dict[str, float]]:
    """Recall, F1, AUC-ROC and points of each fault kind (fault-kind strings per point, '' or
    None outside faults): that kind's points positive, normal points negative, other kinds out."""
    fk = np.asarray(faults, dtype=object).ravel()
    if fk.size != s.size:
        raise ValueError("faults and scores differ in length")
    fk = np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in fk], dtype=object)
    normal = (y == 0) & (fk == "")
    per: dict[str, dict[str, float]] = {}
    for kind in sorted(set(fk.tolist()) - {""}):
        pos = fk == kind
        keep = pos | normal
        yk = pos[keep].astype(np.int64)
        _, rk, f1k = prf(yk, pred[keep])
        per[kind] = {"recall": rk, "f1": f1k, "auc_roc": auc_roc(s[keep], yk), "n_points": int(pos.sum())}
    return per


def is_num(v: Any) -> bool:
    """A number, not a bool (what the means over entities average)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def nanmean_dicts(dicts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Key by key, the mean of the finite values of a numeric key over the dicts that have it
    (NaN where none is finite); nested dicts averaged the same way; other keys left out."""
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [d[k] for d in dicts if k in d]
        if vals and all(is_num(v) for v in vals):
            arr = np.asarray(vals, dtype=np.float64)
            out[k] = float(np.mean(arr[np.isfinite(arr)])) if np.isfinite(arr).any() else NAN
        elif vals and all(isinstance(v, Mapping) for v in vals):
            out[k] = nanmean_dicts(vals)
    return out


def summarize(per_entity: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{"entities": per_entity, "mean": nan-mean over entities of every numeric key}.

    Nested dicts (``per_fault``) are averaged key by key over the entities that
    have them; non-numeric values are left out of the mean.
    """
    ents = {str(k): dict(v) for k, v in per_entity.items()}
    mean = nanmean_dicts(list(ents.values()))
    mean["n_entities"] = len(ents)
    return {"entities": ents, "mean": mean, "total": alert_totals(list(ents.values()))}


def alert_totals(per_entity: list[Mapping[str, Any]]) -> dict[str, Any]:
    """alert_metrics summed over entities: the events, and the rates of the sums (false alarm
    events per entity-day = all false alarms over all entity-days; the share of all fault events
    caught, overall and per kind), which a mean of per-entity rates would weigh wrongly; and
    ``caught_at_budget_oracle``, the most fault events the entities' scores could catch at 1 false
    alarm event per entity-day with each entity's threshold chosen on its labels (ceiling_oracle
    over evaluate's ``alert_frontier_oracle``): what no label-free threshold can beat."""
    count = ("alarm_events", "false_alarm_events", "false_alarms_elsewhere", "fault_events", "faults_caught", "days")
    tot: dict[str, Any] = {k: float(np.nansum([e[k] for e in per_entity if is_num(e.get(k))]))
                           for k in count if any(k in e for e in per_entity)}
    if not tot:
        return {}
    if "alarm_events" in tot:  # unlabelled entities' alarms per entity-day (evaluate without labels)
        tot["alarms_per_day"] = tot["alarm_events"] / tot["days"] if tot.get("days") else NAN
    if "false_alarm_events" in tot:
        tot["false_alarms_per_day"] = tot["false_alarm_events"] / tot["days"] if tot.get("days") else NAN
    if "false_alarms_elsewhere" in tot:  # away from every entity's fault: what no incident explains
        tot["false_alarms_quiet"] = tot["false_alarm_events"] - tot["false_alarms_elsewhere"]
        tot["false_alarms_quiet_per_day"] = tot["false_alarms_quiet"] / tot["days"] if tot.get("days") else NAN
    tot["faults_caught_share"] = tot["faults_caught"] / tot["fault_events"] if tot.get("fault_events") else NAN
    ranked = [e for e in per_entity if "alert_frontier_oracle" in e]
    days = [e["days"] if is_num(e.get("days")) and e["days"] == e["days"] else e.get("n_points", 0) / 1440.0
            for e in ranked]
    if ranked:  # labels chose each entity's threshold: an ORACLE beside the label-free figures
        tot["caught_at_budget_oracle"] = float(ceiling_oracle(
            [(e["alert_frontier_oracle"], d) for e, d in zip(ranked, days)], 1.0))
    if any("alert_frontier_resource_oracle" in e for e in ranked):  # the same, resource faults only
        tot["resource_caught_at_budget_oracle"] = float(ceiling_oracle(
            [(e.get("alert_frontier_resource_oracle", [[0, 0]]), d) for e, d in zip(ranked, days)], 1.0))
    kinds: dict[str, dict[str, float]] = {}
    for e in per_entity:
        for kind, v in e.get("per_fault_events", {}).items():
            k = kinds.setdefault(kind, {"events": 0, "caught": 0})
            k["events"] += v["events"]
            k["caught"] += v["caught"]
    if kinds:
        tot["per_fault_events"] = {k: dict(v, caught_share=v["caught"] / v["events"]) for k, v in kinds.items()}
        res = [v for k, v in kinds.items() if is_resource_fault(k)]
        if res:
            n, c = sum(v["events"] for v in res), sum(v["caught"] for v in res)
            tot["resource_faults"] = {"events": n, "caught": c, "caught_share": c / n}
    return tot


def paired_difference(a: Any, b: Any, n_boot: int = 10000, seed: int = 0, ci: float = 0.95
                      ) -> dict[str, float | int]:
    """How sure a difference between two methods is, from their per-entity values a and b (n,)
    of one metric, paired by entity: the mean of a - b, its `ci` interval from resampling the
    entities with replacement (a percentile bootstrap: which servers are in the data set is the
    main source of chance here), and on how many entities a is higher, lower or level; "a" and
    "b" are the two means over the same entities. Entities where either value is missing or NaN
    are left out."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference: a and b must be 1-D of one length, not {a.shape} and {b.shape}")
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    d = a - b
    if len(d) == 0:
        return {"n": 0, "a": NAN, "b": NAN, "mean": NAN, "lo": NAN, "hi": NAN, "higher": 0, "lower": 0, "level": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return {"n": len(d), "a": float(a.mean()), "b": float(b.mean()), "mean": float(d.mean()),
            "lo": float(lo), "hi": float(hi),
            "higher": int((d > 0).sum()), "lower": int((d < 0).sum()), "level": int((d == 0).sum())}
