"""From reconstructions to anomaly scores, per-feature contributions and a label-free threshold.

The one scorer's second half, shared by test.py, detect_live.py, meta_eval.py and baselines.py.
PUAD's decoder gives, for every point t of a series, the mean mu_t and standard deviation sigma_t
of its V values, from the window that ends at t (puad.score_series). With the default
`--score=norm`:

    r_tv = x_tv - mu_tv                                  residual of feature v at point t
    z_tv = (r_tv - median_v) / max(IQR_v / 1.349, floor) normalised by that feature's residuals on
                                                         the calibration rows (normal data the
                                                         model did not train on); the floor is
                                                         `const_floor` for a feature that was
                                                         constant over the train series
    c_tv = z_tv ** 2                                     feature v's contribution
    s_t  = mean_v c_tv, then the mean of the last `smooth` points (causal: live detection can
           compute it from the last `smooth` windows)

Every feature is measured against its own normal error, whatever its noise level (Garg et al.
2021, "An evaluation of anomaly detection and diagnosis in multivariate time series", found this
normalisation and smoothing matter more than the model). A feature constant over the whole train
series (`up` of a service, an error count at 0) has no normal error to speak of, and its leaving
that value is a fault nearly every time (ASD, SMD and the lab: docs/ablation.md): its small
floor makes a stopped service score far above the threshold. `--score=nll` is the paper's score
(-log N(x | mu, sigma) summed over V, learned sigma), `--score=se` a fixed-variance squared error
(the authors' code); both are kept for the ablation (docs/ablation.md).

The threshold is fitted on the scores of the calibration rows, never on labels (SPOT or a
percentile, metrics.select_threshold). A model whose residuals are not per feature (kNN,
IsolationForest) goes through the same smoothing and threshold with its scalar scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from metrics import select_threshold

SCORES = ("norm", "se", "nll")
MAX_CONTRIBUTION = 1e12  # bounds one feature's share so that a sum over features stays finite


@dataclass
class Calibration:
    """What turns one entity's residuals into scores and alarms; fitted without labels."""
    threshold: float
    center: np.ndarray | None = None     # (V,) median residual per feature (score=norm)
    scale: np.ndarray | None = None      # (V,) robust residual scale per feature, >= floor
    n_rows: int = 0                      # calibration rows it was fitted on
    info: dict = field(default_factory=dict)  # score, smooth and threshold method it was fitted with


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Causal moving mean over the last k points along axis 0 (fewer at the start); k <= 1: x."""
    if k <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.concatenate([np.zeros((1,) + x.shape[1:]), x]), axis=0)
    i = np.arange(len(x))
    lo = np.maximum(i - k + 1, 0)
    n = (i + 1 - lo).reshape((-1,) + (1,) * (x.ndim - 1))
    return (c[i + 1] - c[lo]) / n


def fit_normaliser(resid: np.ndarray, floor: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature median and robust scale (IQR / 1.349, the std of a Gaussian) of residuals,
    the scale at least `floor` (a number, or one per feature)."""
    q1, med, q3 = np.percentile(resid, [25, 50, 75], axis=0)
    return med, np.maximum((q3 - q1) / 1.349, floor)


def contributions(x: np.ndarray, mu: np.ndarray, std: np.ndarray | None, score: str,
                  center: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """Each feature's part c_tv of the point score (n, V), before smoothing; higher = worse fit."""
    r = np.asarray(x, np.float64) - mu
    if score == "norm":
        c = ((r - center) / scale) ** 2
    elif score == "se":
        c = r ** 2
    elif score == "nll":
        c = 0.5 * (r / std) ** 2 + np.log(std) + 0.5 * np.log(2 * np.pi)
    else:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    return np.minimum(c, MAX_CONTRIBUTION)


def point_scores(contrib: np.ndarray, score: str, k: int) -> np.ndarray:
    """Point scores (n,) from contributions: mean over features (sum for nll, the paper's
    log-likelihood of the point), then the causal mean of the last k points."""
    s = contrib.sum(-1) if score == "nll" else contrib.mean(-1)  # over features, the last axis
    return smooth(s, k)


def calibrate(calib: dict, cfg, score: str | None = None) -> Calibration:
    """The one calibration: normaliser and threshold from the calibration rows' reconstructions.

    calib: {"x", "mu", "std"} arrays (n, V) of the calibration rows (residual models), and
    optionally "constant" (V,) bool, the features constant over the train series; or
    {"scores": (n,)} for a model with scalar scores only (then only smoothing and threshold).
    """
    score = score or cfg.score
    center = scale = None
    if "scores" in calib:
        s = smooth(np.asarray(calib["scores"], np.float64), cfg.smooth)
    else:
        if score == "norm":
            floor = np.where(calib.get("constant", False), cfg.const_floor, cfg.score_floor)
            center, scale = fit_normaliser(np.asarray(calib["x"], np.float64) - calib["mu"], floor)
        s = point_scores(contributions(calib["x"], calib["mu"], calib.get("std"), score, center, scale),
                         score, cfg.smooth)
    thr = select_threshold(s, cfg.threshold, q=cfg.spot_q, level=cfg.spot_level, pct=cfg.percentile)
    return Calibration(float(thr), center, scale, len(s),
                       {"score": score, "smooth": int(cfg.smooth), "threshold_method": cfg.threshold})


def top_features(contrib: np.ndarray, features: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The k features with the largest share of the score over some points (contributions
    (n, V) or (V,)) -> [(name, share of the score in 0..1)], largest first. The one ranking
    behind test.py's segment tables, detect_live.py's alerts and the HitRate metrics."""
    c = np.asarray(contrib, np.float64)
    c = c.sum(0) if c.ndim == 2 else c
    c = np.maximum(c, 0)
    order = np.argsort(-c, kind="stable")[:k]
    total = c.sum()
    return [(features[i], float(c[i] / total) if total > 0 else 0.0) for i in order]


def constant_features(x_train: np.ndarray) -> np.ndarray:
    """(V,) True where a feature takes one value over the whole train series."""
    return np.ptp(x_train, axis=0) == 0


def apply(cal: Calibration, out: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (n,) and smoothed contributions (n, V) (None for scalar models) of a scored series;
    the contributions of a point average to its score (norm, se) or sum to it (nll)."""
    k = cal.info.get("smooth", 1)
    if "scores" in out:
        return smooth(np.asarray(out["scores"], np.float64), k), None
    score = cal.info["score"]
    c = contributions(out["x"], out["mu"], out.get("std"), score, cal.center, cal.scale)
    return point_scores(c, score, k), smooth(c, k)


def apply_batch(cals: list[Calibration], out: dict) -> tuple[np.ndarray, np.ndarray]:
    """apply() of E series of the same length at once (detect_live.py's batched poll): out holds
    "x", "mu" (and "std" for nll) of shape (E, n, V), cals one Calibration per series, all with
    the same score and smooth -> scores (E, n) and smoothed contributions (E, n, V), the numbers
    apply() gives each series alone (the same operations, along the same axis)."""
    score, k = cals[0].info["score"], cals[0].info.get("smooth", 1)
    if any(c.info["score"] != score or c.info.get("smooth", 1) != k for c in cals):
        raise ValueError("apply_batch: calibrations of different scores or smoothing")
    center = scale = None
    if score == "norm":
        center = np.stack([c.center for c in cals])[None]  # (1, E, V)
        scale = np.stack([c.scale for c in cals])[None]
    t = lambda a: None if a is None else np.swapaxes(np.asarray(a), 0, 1)  # noqa: E731  (n, E, V): smooth runs along axis 0
    c = contributions(t(out["x"]), t(out["mu"]), t(out.get("std")), score, center, scale)
    return np.swapaxes(point_scores(c, score, k), 0, 1), np.swapaxes(smooth(c, k), 0, 1)
