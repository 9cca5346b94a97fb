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
    d_t  = mean distance of theta0_t (the window's encoding, PUAD only) to its `latent_k`
           nearest among the entity's normal windows' theta0s (the memory: up to
           `latent_memory` windows of the train rows before the calibration rows)
    s_t  = mean_v c_tv + latent_weight x d_t / median(d) on the calibration rows (the distance
           in units of its normal size, as each residual is), then the mean of the last `smooth`
           points (causal: live detection can compute it from the last `smooth` windows)

The latent term catches a window the decoder reconstructs well enough but whose encoding this
entity has never shown: the global prototypes summarise every entity in a few points, the memory
keeps this entity's own normal states (the same term on PCA's or the autoencoder's codes gains
them less: docs/ablation.md). Models without a theta0 (the baselines) are scored without it.

Which metrics an alarm names comes from the same c_tv (the latent term names no metric),
smoothed like the score, each feature's divided by its usual level: its `name_q` quantile (0.9)
over the calibration rows (`named`; puad_feature_score). A feature is named for being far above
its own normal, not for being large: most features sit at the floor, where the largest c_tv
belong to the features of the widest train range, and a quiet metric that moved ten times its
usual amount was ranked below them (HitRate@150% on SMD 0.457, a random ranking 0.430;
docs/ablation.md). The features behind an alarm (segment tables, alerts, HitRate) are then
ranked by `explain`: log(1 + named) plus `repair_weight` x the repair gain, how much the other
features' named contributions fall when this feature's values are replaced by the model's
reconstruction of them. Residuals blame the features whose reconstruction a fault drags along
as much as the one that moved; repairing the one that moved repairs them too.
A feature still at its constant training value is never named (attribution).

Every feature is measured against its own normal error, whatever its noise level (Garg et al.
2021, "An evaluation of anomaly detection and diagnosis in multivariate time series", found this
normalisation and smoothing matter more than the model). A feature constant over the whole train
series (`up` of a service, an error count at 0) has no normal error to speak of, and its leaving
that value is a fault nearly every time (ASD, SMD and the lab: docs/ablation.md): its small
floor makes a stopped service score far above the threshold. `--score=nll` is the paper's score
(-log N(x | mu, sigma) summed over V, learned sigma), `--score=se` a fixed-variance squared error
(the authors' code); both are kept for the ablation (docs/ablation.md).

The threshold is fitted on the scores of the calibration rows, never on labels (SPOT or a
percentile, metrics.select_threshold). It then follows the score's level (`drift_window`, the
drift guard): at each point it stands as far above the median of the previous `drift_window`
scores as it stood above the calibration median, never lower than fitted. A level shift that
persists (a service's memory staying higher after a restart, a series whose normal scores drift
upwards between the calibration rows and today) stops alarming once it is most of the recent
window; a fault shorter than half the window raises the median little. A model whose residuals
are not per feature (kNN, IsolationForest) goes through the same smoothing, threshold and guard
with its scalar scores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch

from metrics import select_threshold
from utils import create_sequences

# a model's reconstruction of scaled windows (B, T, V) -> its mean (B, T, V) and std (None when it
# has none): what explain() repairs a feature with and re-scores (puad.window_reconstructor,
# baselines' PCA and autoencoder)
Reconstruct = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]

SCORES = ("norm", "se", "nll")
MAX_CONTRIBUTION = 1e12  # bounds one feature's share so that a sum over features stays finite
LATENT_FLOOR = 1e-3  # the smallest median memory distance the latent term is scaled by (theta0 units)
USUAL_FLOOR = 1e-3  # the smallest usual level a named contribution is divided by (a feature quiet on the calibration rows)


class Memory:
    """An entity's normal theta0s (M, d), prepared once for nearest-neighbour searches: centred
    float32 (distances good to ~1e-6) with their squared norms, so that a live poll of one window
    per entity costs a (1, M) product and a top-k, not a copy of the memory."""

    def __init__(self, states: np.ndarray):
        m = torch.as_tensor(np.asarray(states, np.float32))
        self.center = m.mean(0)
        self.states = m - self.center
        self.norms = (self.states * self.states).sum(1)

    def __len__(self) -> int:
        return len(self.states)

    def distance(self, z: np.ndarray, k: int) -> np.ndarray:
        """Mean Euclidean distance of each row of z (..., d) to its k nearest states. A row equal
        to the one before it is searched once (the points of one window share its theta0:
        --score_mode=block, the first seq_len - 1 points of a series)."""
        k = max(1, min(int(k), len(self)))
        shape = np.shape(z)[:-1]
        flat = np.asarray(z, np.float32).reshape(-1, self.states.shape[1])
        new = np.r_[True, np.any(flat[1:] != flat[:-1], axis=-1)] if len(flat) else np.zeros(0, bool)
        parts = []
        for zb in (torch.as_tensor(flat[new]) - self.center).split(4096):  # (4096, M) squared distances at a time
            d2 = (zb * zb).sum(1, keepdim=True) + self.norms - 2.0 * zb @ self.states.T
            parts.append(d2.topk(k, dim=1, largest=False).values.clamp_min(0.0).sqrt().mean(1))
        out = torch.cat(parts).double().numpy() if parts else np.zeros(0)
        return out[np.cumsum(new) - 1].reshape(shape)


@dataclass
class Calibration:
    """What turns one entity's residuals into scores and alarms; fitted without labels."""
    threshold: float
    center: np.ndarray | None = None     # (V,) median residual per feature (score=norm)
    scale: np.ndarray | None = None      # (V,) robust residual scale per feature, >= floor
    n_rows: int = 0                      # calibration rows it was fitted on
    median: float = 0.0                  # median calibration score: the level the threshold was fitted at
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the last drift_window calibration scores
    pinned: np.ndarray | None = None     # (V,) the value of each feature constant over the train rows, NaN for the others
    usual: np.ndarray | None = None      # (V,) each feature's usual smoothed contribution (name_q quantile on the
                                         # calibration rows, >= USUAL_FLOOR): what names features is divided by it
    memory: Memory | None = None         # theta0 of the entity's normal windows (M, d_theta; the latent term)
    cap: float = np.inf                  # the largest raw point score of the calibration rows (smooth_scores)
    latent: float = 0.0                  # the latent term's factor: latent_weight / the calibration rows' median
                                         # distance to the memory; 0 = off
    info: dict = field(default_factory=dict)  # score, smooth and threshold method it was fitted with


def smooth_scores(raw: np.ndarray, k: int, cap: float | np.ndarray = np.inf) -> np.ndarray:
    """A point score from the raw point scores (time on axis 0): the causal mean of the last k,
    never more than the point's own raw score plus `cap` (Calibration.cap: the largest raw
    score of the calibration rows). The mean quiets the noise of normal points and gathers a long
    anomaly's evidence; the cap keeps a short fault's huge scores from lingering on the points
    after it, which the mean would rank above most of the fault's own (nezha_ob's 4-point faults:
    AUC-PR 0.251 -> 0.380; docs/decisions.md)."""
    return np.minimum(smooth(raw, k), raw + cap)


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


def knn_distance(z: np.ndarray, memory: np.ndarray | Memory, k: int) -> np.ndarray:
    """Mean Euclidean distance of each row of z (..., d) to its k nearest rows of memory (M, d)."""
    return (memory if isinstance(memory, Memory) else Memory(memory)).distance(z, k)


def raw_scores(contrib: np.ndarray, score: str, latent: np.ndarray | float = 0.0) -> np.ndarray:
    """Raw point scores (n,) from contributions, before smoothing: mean over features (sum for
    nll, the paper's log-likelihood of the point), plus the latent term (Calibration.latent x
    theta0's distance to the memory; 0 without one)."""
    s = contrib.sum(-1) if score == "nll" else contrib.mean(-1)  # over features, the last axis
    return s + latent


def spot_risk(cfg, step_s: float | None) -> float:
    """SPOT's risk level q: the alarm budget (--alarm_budget false alarm events per entity per
    day) spread over the day's points when the step between rows is known (q = budget x step /
    86,400 s: a point above the threshold at most that often starts at most that many alarms a
    day), else --spot_q (timestamps that are row numbers)."""
    if cfg.alarm_budget > 0 and step_s and step_s > 0:
        return float(min(max(cfg.alarm_budget * step_s / 86400.0, 1e-9), 0.5))
    return cfg.spot_q


def calibrate(calib: dict, cfg, score: str | None = None, step_s: float | None = None) -> Calibration:
    """The one calibration: normaliser and threshold from the calibration rows' reconstructions.

    calib: {"x", "mu", "std"} arrays (n, V) of the calibration rows (residual models), and
    optionally "constant" (V,) bool, the features constant over the train series, and "theta0"
    (n, d) with "memory" (M, d) for PUAD's latent term (module docstring; cfg.latent_weight);
    or {"scores": (n,)} for a model with scalar scores only (then only smoothing and threshold).
    """
    score = score or cfg.score
    center = scale = pinned = usual = memory = None
    latent = 0.0
    if "scores" in calib:
        raw = np.asarray(calib["scores"], np.float64)
    else:
        const = np.broadcast_to(np.asarray(calib.get("constant", False), bool), np.shape(calib["x"])[1:])
        pinned = np.where(const, np.asarray(calib["x"], np.float64)[0], np.nan)
        if score == "norm":
            floor = np.where(const, cfg.const_floor, cfg.score_floor)
            center, scale = fit_normaliser(np.asarray(calib["x"], np.float64) - calib["mu"], floor)
        c = contributions(calib["x"], calib["mu"], calib.get("std"), score, center, scale)
        dist = 0.0
        if (cfg.latent_weight > 0 and calib.get("memory") is not None and len(calib["memory"]) and len(c)
                and calib.get("theta0") is not None):
            memory = Memory(calib["memory"])
            dist = memory.distance(calib["theta0"], cfg.latent_k)
            latent = cfg.latent_weight / max(float(np.median(dist)), LATENT_FLOOR)
        raw = raw_scores(c, score, latent * dist)
        if cfg.name_q > 0 and len(c):
            usual = np.maximum(np.quantile(named(c, calib["x"], pinned, None, cfg.smooth), cfg.name_q, axis=0),
                               USUAL_FLOOR)
    cap = float(raw.max()) if len(raw) else np.inf
    s = smooth_scores(raw, cfg.smooth, cap)
    thr = select_threshold(s, cfg.threshold, q=spot_risk(cfg, step_s), level=cfg.spot_level, pct=cfg.percentile)
    w = int(cfg.drift_window)
    return Calibration(float(thr), center, scale, len(s), median=float(np.median(s)) if len(s) else 0.0, cap=cap,
                       recent=s[-w:].copy() if w > 0 else np.zeros(0), pinned=pinned, usual=usual,
                       memory=memory if latent > 0 else None, latent=latent,
                       info={"score": score, "smooth": int(cfg.smooth), "threshold_method": cfg.threshold,
                             "drift_window": w, "latent_k": int(cfg.latent_k),
                             "repair_weight": float(cfg.repair_weight)})


def thresholds(cal: Calibration, scores: np.ndarray) -> np.ndarray:
    """Per-point thresholds (n,) of a scored series that follows the calibration rows: the drift
    guard (module docstring), causal: point t's threshold uses the scores before t only, the last
    calibration scores first. drift_window 0: the fitted threshold at every point."""
    s = np.asarray(scores, np.float64)
    w = int(cal.info.get("drift_window", 0))
    if w <= 0 or len(s) == 0:
        return np.full(len(s), cal.threshold)
    past = np.concatenate([cal.recent, s])
    med = pd.Series(past).rolling(w, min_periods=1).median().to_numpy()  # med[i]: past[i-w+1..i]
    before = med[len(cal.recent) - 1: len(past) - 1] if len(cal.recent) else np.r_[cal.median, med[:-1]]
    return cal.threshold + np.maximum(before - cal.median, 0.0)


def fixed_threshold(cal: Calibration, value: float) -> Calibration:
    """A copy of cal whose threshold is `value` at every point: no drift guard
    (detect_live.py's --threshold=NUMBER)."""
    return dataclasses.replace(cal, threshold=float(value), info={**cal.info, "drift_window": 0})


def live_threshold(cal: Calibration, history: np.ndarray) -> float:
    """The drift guard's threshold for the next point given the scores before it (the last
    drift_window of them are used; detect_live.py keeps them per entity, starting from
    cal.recent): the last value thresholds() would give."""
    w = int(cal.info.get("drift_window", 0))
    h = np.asarray(history, np.float64)[-w:] if w > 0 else np.zeros(0)
    if len(h) == 0:
        return cal.threshold
    return cal.threshold + max(float(np.median(h)) - cal.median, 0.0)


def top_features(contrib: np.ndarray, features: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The k features with the largest weights over some points (explain's output or apply's
    second, (n, V) or (V,), summed over the points) -> [(name, share of the total in 0..1)],
    largest first. The one ranking behind test.py's segment tables, detect_live.py's alerts and
    the HitRate metrics (there of explain's weights)."""
    c = np.asarray(contrib, np.float64)
    c = c.sum(0) if c.ndim == 2 else c
    c = np.maximum(c, 0)
    order = np.argsort(-c, kind="stable")[:k]
    total = c.sum()
    return [(features[i], float(c[i] / total) if total > 0 else 0.0) for i in order]


def constant_features(x_train: np.ndarray) -> np.ndarray:
    """(V,) True where a feature takes one value over the whole train series."""
    return np.ptp(x_train, axis=0) == 0


def attribution(contrib: np.ndarray, x: np.ndarray, pinned: np.ndarray | None) -> np.ndarray:
    """The contributions that name features: a feature constant over the train rows that still
    sits at that value did not move, so it is never named (0), whatever the reconstruction of
    it did. Its residual stays in the score: the model's disagreement shows there too, and
    counting it detects better (SMD AUC-PR, docs/ablation.md), but it is not a cause to report."""
    if pinned is None:
        return contrib
    still = np.isclose(np.asarray(x, np.float64), pinned, rtol=0.0, atol=1e-9)  # False where pinned is NaN
    return np.where(still, 0.0, contrib)


def named(contrib: np.ndarray, x: np.ndarray, pinned: np.ndarray | None, usual: np.ndarray | None,
          k: int) -> np.ndarray:
    """What names features: the contributions smoothed over k points like the score, a feature
    still at its constant training value at 0 (attribution), each feature's over its usual level
    (Calibration.usual; None, as with --name_q=0: the contributions as scored). Time on axis 0,
    features on the last."""
    c = smooth(attribution(contrib, x, pinned), k)
    return c if usual is None else np.minimum(c / usual, MAX_CONTRIBUTION)


def apply(cal: Calibration, out: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (n,) and the named contributions (n, V) (named(); None for scalar models) of a
    scored series. With --name_q=0 and no latent term the contributions of a point average to its
    score (norm, se) or sum to it (nll), except that a feature still at its constant training
    value has none."""
    k = cal.info.get("smooth", 1)
    if "scores" in out:
        return smooth_scores(np.asarray(out["scores"], np.float64), k, cal.cap), None
    score = cal.info["score"]
    c = contributions(out["x"], out["mu"], out.get("std"), score, cal.center, cal.scale)
    raw = raw_scores(c, score, latent_term(cal, out.get("theta0")))
    return smooth_scores(raw, k, cal.cap), named(c, out["x"], cal.pinned, cal.usual, k)


def latent_term(cal: Calibration, theta0: np.ndarray | None) -> np.ndarray | float:
    """What theta0's distance to the entity's memory adds to each point score (n,): 0 when the
    calibration has no latent term; a calibration with one needs the points' theta0 (n, d)."""
    if cal.latent <= 0:
        return 0.0
    if theta0 is None:
        raise ValueError("this calibration has a latent term; the scored output needs theta0")
    return cal.latent * cal.memory.distance(theta0, cal.info.get("latent_k", 5))


def apply_batch(cals: list[Calibration], out: dict) -> tuple[np.ndarray, np.ndarray]:
    """apply() of E series of the same length at once (detect_live.py's batched poll): out holds
    "x", "mu" (and "std" for nll) of shape (E, n, V), cals one Calibration per series, all with
    the same score and smooth -> scores (E, n) and named contributions (E, n, V), the numbers
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
    z = out.get("theta0")
    latent = np.stack([np.broadcast_to(latent_term(c_, None if z is None else z[i]), c.shape[:1])
                       for i, c_ in enumerate(cals)], axis=1)  # (n, E)
    pinned = None if any(c_.pinned is None for c_ in cals) else np.stack([c_.pinned for c_ in cals])[None]
    usual = None
    if any(c_.usual is not None for c_ in cals):
        usual = np.stack([np.ones(c.shape[-1]) if c_.usual is None else c_.usual for c_ in cals])[None]
    cap = np.array([c_.cap for c_ in cals])  # (E,), broadcast along the entities' axis 1
    return (np.swapaxes(smooth_scores(raw_scores(c, score, latent), k, cap), 0, 1),
            np.swapaxes(named(c, t(out["x"]), pinned, usual, k), 0, 1))


def named_rows(flagged: np.ndarray, interpretation: list | None = None) -> np.ndarray:
    """The rows whose features test.py and baselines.py name (explain): the flagged ones (segment
    tables, heatmaps) and those of the interpretation segments ((start, end inclusive, ...) each;
    HitRate). A row's ranking does not depend on which rows are named, so labels only choose
    where it is computed, never what it is."""
    rows = [np.flatnonzero(flagged)] + [np.arange(s, e + 1) for s, e, *_ in interpretation or []]
    return np.unique(np.concatenate(rows)).astype(np.int64)


def explain(cal: Calibration, named_: np.ndarray, x: np.ndarray, recon: Reconstruct, points: np.ndarray,
            seq_len: int, batch: int = 256) -> np.ndarray:
    """What ranks features at `points` (n, V): each feature's weight in naming the metrics behind
    an alarm, log(1 + its named contribution) (apply's second output, named_) plus, times the
    calibration's repair_weight, its repair gain: how much the other features' named
    contributions fall, in the same log units, when this feature's values in the window are
    replaced by the model's reconstruction of them and the window is reconstructed again (mean
    over the last `smooth` points, as named). A feature that pulls the reconstruction of the
    others away from them gets the share of the anomaly it causes, which residuals alone give to
    the features it disturbs (docs/ablation.md, "Naming by repair"). A feature named 0 (still at
    its constant training value) gets no gain either. Rows not in `points` hold log(1 + named_)
    only; each row's value does not depend on which other rows are asked for.

    x: the scaled input as the model saw it (n, V; score_series' "x"); recon: the model's
    reconstruction of such windows. Point t is named by the window ending at it (the first
    seq_len - 1 points by the first window), as it is scored. Costs V + 1 reconstructions per
    point asked for and per point the smoothing reads before it.
    """
    x = np.asarray(x, np.float32)
    out = np.log1p(np.maximum(np.asarray(named_, np.float64), 0.0))
    weight, k = float(cal.info.get("repair_weight", 0.0)), max(int(cal.info.get("smooth", 1)), 1)
    points = np.unique(np.asarray(points, np.int64))
    if weight <= 0 or len(points) == 0 or cal.info.get("score") is None:
        return out
    n, V = x.shape
    need = np.unique((points[:, None] - np.arange(k)[None]).clip(0))  # the rows the smoothing reads
    windows = create_sequences(x, seq_len)
    start = np.maximum(need - (seq_len - 1), 0)
    pos = need - start
    score = cal.info["score"]

    gain = np.zeros((n, V))
    for i in range(0, len(need), batch):
        xb = np.ascontiguousarray(windows[start[i:i + batch]])
        at = (np.arange(len(xb)), pos[i:i + batch])  # each window's named point
        xt = xb[at]

        def logs(xw: np.ndarray, mu: np.ndarray, std: np.ndarray | None) -> np.ndarray:  # (B, V) at the named points
            c = contributions(xw[at], mu[at], None if std is None else std[at], score, cal.center, cal.scale)
            return np.log1p(np.maximum(named(c, xt, cal.pinned, cal.usual, 1), 0.0))

        mu, std = recon(xb)
        before = logs(xb, mu, std)
        for v in range(V):
            repaired = xb.copy()
            repaired[:, :, v] = mu[:, :, v]
            fall = before - logs(repaired, *recon(repaired))
            gain[need[i:i + batch], v] = fall.sum(1) - fall[:, v]  # what repairing v lowers in the others
    gain = np.maximum(smooth(gain, k)[points], 0.0)
    out[points] += weight * gain * (named_[points] > 0)
    return out
