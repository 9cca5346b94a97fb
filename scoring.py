"""From reconstructions to anomaly scores, the metrics behind them and a label-free threshold.

The one scorer, shared by test.py, detect_live.py, meta_eval.py, ablation.py and baselines.py, in
pyod's shape: `Scorer(...).fit(calibration rows)` learns its state in fields ending in `_`
(`threshold_`, `scale_`, ...), then `score()`, `thresholds()` and `explain()` apply it. What it
reads is a `Reconstruction`: for every point t of a scaled series, the input x_t and the model's
reconstruction mu_t from the window that ends at t (puad.score_series; PCA's and the AE's too),
PUAD's theta0 of that window, or a scalar model's raw score (kNN, IsolationForest).

    r_tv = x_tv - mu_tv                                  residual of feature v at point t
    z_tv = (r_tv - median_v) / max(IQR_v / 1.349, floor) normalised by that feature's residuals on
                                                         the calibration rows (normal data the
                                                         model did not train on); the floor is
                                                         0.01 for a feature that was
                                                         constant over the train series
    c_tv = z_tv ** 2                                     feature v's contribution
    d_t  = mean distance of theta0_t (the window's encoding, PUAD only) to its 5 nearest among
           the entity's normal windows' theta0s (the memory: up to 1,000 windows of the train
           rows that are not calibration rows)
    u_t  = mean_v c_tv + latent_weight x d_t / median(d) on the calibration rows (the distance
           in units of its normal size, as each residual is)           the raw point score
    s_t  = min(mean of u over the last `smooth` points, u_t + the largest u of the calibration
           rows): the mean quiets normal noise and gathers a long anomaly's evidence; the cap
           keeps a short fault's huge scores off the points after it (causal: live detection
           computes it from the last `smooth` windows)

The latent term catches a window the decoder reconstructs well enough but whose encoding this
entity has never shown (docs/decisions.md). Which metrics an alarm names comes from c_tv (the
latent term names no metric), smoothed like the score, each feature's over its usual level: its
`name_q` quantile over the calibration rows (`name`). The features behind an alarm (segment
tables, alerts, HitRate) are then ranked by `explain`: log(1 + named) plus `repair_weight` x the
repair gain, how much the other features' named contributions fall when this feature's values
are replaced by the model's reconstruction of them. A feature still at its constant training
value is never named (attribution). A feature constant over the whole train series (`up`, an
error count at 0) has a small floor, so a stopped service scores far above the threshold.

The threshold is fitted on the calibration rows' scores, never on labels: SPOT at the risk that
spreads `alarm_budget` false alarm events a day over the day's points when the timestamps give
the step (spot_risk; metrics.spot_threshold). It then follows the score's
level (`drift_window`, the drift guard): at each point it stands as far above the median of the
previous `drift_window` scores as it stood above the calibration median, never lower than
fitted. A level shift that persists stops alarming once it is most of the recent window; a fault
shorter than half the window raises the median little.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from metrics import segment_sample, spot_threshold
from utils import create_sequences, release_freed_memory

# a model's reconstruction of scaled windows (B, T, V) -> its mean (B, T, V): what explain()
# repairs a feature with and re-scores (puad.window_reconstructor, baselines' PCA and AE)
Reconstruct = Callable[[np.ndarray], np.ndarray]

MAX_CONTRIBUTION = 1e12  # bounds one feature's share so that a sum over features stays finite
LATENT_FLOOR = 1e-3  # the smallest median memory distance the latent term is scaled by (theta0 units)
LATENT_K = 5  # the latent term's nearest normal windows (1 to 20: within 0.005 AUC-PR, docs/decisions.md)
NAMED_PER_SEGMENT = 20  # test.py and baselines.py repair at most 20 points of a flagged run or an interpretation segment
RUNS_NAMED = 50  # ... and of the 50 flagged runs of an entity that peak highest (the rest: contributions only)
CONST_FLOOR = 0.01  # the residual scale floor of a feature constant over the train series (0.1 for all: the lab's
                    # AUC-PR 0.891 -> 0.818, python ablation.py; docs/decisions.md)
USUAL_FLOOR = 1e-3  # the smallest usual level a named contribution is divided by (a feature quiet on the calibration rows)


@dataclass
class Reconstruction:
    """A series as a model saw and reconstructed it, point by point (n points, V features)."""
    x: np.ndarray                          # (n, V) the scaled, clipped input
    mu: np.ndarray | None = None           # (n, V) the reconstruction; None for a scalar model
    theta0: np.ndarray | None = None       # (n, d) PUAD: the encoding of the window ending at each point
    scores: np.ndarray | None = None       # (n,) a scalar model's raw point scores (kNN, IsolationForest)
    plan: np.ndarray | None = None         # (n, K) PUAD: that window's transport plan
    plan_global: np.ndarray | None = None  # (n, K_g) PUAD with local prototypes: the plan without them
    local_used: np.ndarray | None = None   # (n,) PUAD: the point went through the local prototypes
    fall: np.ndarray | None = None         # (n, V) PUAD: how far a level gauge's window sits below its recent
                                           # level (>= 0; not scored, named: Scorer.name; puad.score_series)

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def concat(cls, parts: list["Reconstruction"]) -> "Reconstruction":
        """Stretches of one series scored one after another (held-out parts), in order."""
        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)
        return cls(**{f.name: cat(f.name) for f in dataclasses.fields(cls)})

    def tail(self, n: int) -> "Reconstruction":
        """The last n points."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[-n:] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})


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


class MemoryBank:
    """The memories of E entities stacked (E, M, d), for one batched search of all their windows
    (score_many: a live poll of a fleet) instead of one search per entity. A shorter memory is
    padded with states at infinite distance, never among its k nearest; an entity without one
    (None) gets distance 0. The states are held once: each Memory's tensors become views into
    the stack (the same values, so Memory.distance gives the same numbers)."""

    def __init__(self, memories: list[Memory | None]):
        self.memories = list(memories)
        present = [m for m in memories if m is not None]
        E, M, d = len(memories), max((len(m) for m in present), default=0), present[0].states.shape[1] if present else 0
        # filled entity by entity, each Memory's own tensors freed as it moves in: no second copy at once
        self.states, self.norms = torch.empty(E, M, d), torch.full((E, M), np.inf)
        self.center, self.size = torch.zeros(E, d), torch.tensor([0 if m is None else len(m) for m in memories])
        for i, m in enumerate(memories):
            n = 0 if m is None else len(m)
            self.states[i, n:] = 0.0
            if m is not None:
                self.states[i, :n], self.norms[i, :n], self.center[i] = m.states, m.norms, m.center
                m.states, m.norms, m.center = self.states[i, :n], self.norms[i, :n], self.center[i]
        release_freed_memory()  # the memories' own copies, freed among the calibrations' temporaries

    def distance(self, z: np.ndarray, k: int, block: int = 1 << 22) -> np.ndarray:
        """(E, n) Memory.distance of each entity's rows z (E, n, d) to its own memory, k nearest
        (fewer when its memory is smaller), as one baddbmm + top-k per block of about `block`
        squared distances. A point equal to the one before it in every entity is searched once."""
        E, n = np.shape(z)[:2]
        if E == 0 or n == 0 or self.states.shape[1] == 0:
            return np.zeros((E, n))
        z = np.asarray(z, np.float32)
        new = np.r_[True, np.any(z[:, 1:] != z[:, :-1], axis=(0, 2))]
        q = torch.as_tensor(z[:, new]) - self.center[:, None]  # (E, U, d)
        kk = min(max(int(k), 1), self.states.shape[1])
        ke = self.size.clamp(max=kk)  # each entity's k
        take = torch.arange(kk)[None, None] < ke[:, None, None]  # (E, 1, kk)
        out = torch.zeros(E, q.shape[1])
        rows = max(1, min(q.shape[1], block // self.states.shape[1]))
        ents = max(1, block // (rows * self.states.shape[1]))
        for e in range(0, E, ents):
            es = slice(e, e + ents)
            for r in range(0, q.shape[1], rows):
                qb = q[es, r:r + rows]
                d2 = torch.baddbmm((qb * qb).sum(-1, keepdim=True) + self.norms[es, None], qb,
                                   self.states[es].transpose(1, 2), alpha=-2.0)
                near = d2.topk(kk, dim=2, largest=False).values.clamp_min(0.0).sqrt()
                out[es, r:r + rows] = torch.where(take[es], near, 0.0).sum(2) / ke[es, None].clamp(min=1)
        return out.double().numpy()[:, np.cumsum(new) - 1]


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Causal moving mean over the last k points along axis 0 (fewer at the start); k <= 1: x."""
    if k <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.concatenate([np.zeros((1,) + x.shape[1:]), x]), axis=0)
    i = np.arange(len(x))
    lo = np.maximum(i - k + 1, 0)
    n = (i + 1 - lo).reshape((-1,) + (1,) * (x.ndim - 1))
    return (c[i + 1] - c[lo]) / n


def smooth_scores(raw: np.ndarray, k: int, cap: float | np.ndarray = np.inf) -> np.ndarray:
    """Point scores from raw ones (time on axis 0): the causal mean of the last k, never more than
    the point's own raw score plus `cap` (Scorer.cap_: the largest raw score of the calibration
    rows). Without the cap, a short fault's huge scores linger on the points after it and rank
    above most of the fault's own (nezha_ob's 4-point faults: AUC-PR 0.251 -> 0.380)."""
    return np.minimum(smooth(raw, k), raw + cap)


def fit_normaliser(resid: np.ndarray, floor: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature median and robust scale (IQR / 1.349, the std of a Gaussian) of residuals,
    the scale at least `floor` (a number, or one per feature)."""
    q1, med, q3 = np.percentile(resid, [25, 50, 75], axis=0)
    return med, np.maximum((q3 - q1) / 1.349, floor)


def constant_features(x_train: np.ndarray) -> np.ndarray:
    """(V,) True where a feature takes one value over the whole train series."""
    return np.ptp(x_train, axis=0) == 0


def attribution(contrib: np.ndarray, x: np.ndarray, pinned: np.ndarray | None) -> np.ndarray:
    """The contributions that name features: a feature constant over the train rows that still
    sits at that value did not move, so it is never named (0), whatever the reconstruction of
    it did. Its residual stays in the score: the model's disagreement shows there too, and
    counting it detects better (SMD AUC-PR, docs/decisions.md), but it is not a cause to report."""
    if pinned is None:
        return contrib
    still = np.isclose(np.asarray(x, np.float64), pinned, rtol=0.0, atol=1e-9)  # False where pinned is NaN
    return np.where(still, 0.0, contrib)


def spot_risk(alarm_budget: float, spot_q: float, step_s: float | None) -> float:
    """SPOT's risk level q: the alarm budget (false alarm events per entity per day) spread over
    the day's points when the step between rows is known (q = budget x step / 86,400 s: a point
    above the threshold at most that often starts at most that many alarms a day), else spot_q
    (timestamps that are row numbers)."""
    if alarm_budget > 0 and step_s and step_s > 0:
        return float(min(max(alarm_budget * step_s / 86400.0, 1e-9), 0.5))
    return spot_q


class Scorer:
    """Reconstructions -> anomaly scores, per-point thresholds and the features behind them.

    fit() learns, from the calibration rows only (normal data the model did not train on): each
    feature's residual median and scale (center_, scale_), the features pinned at a constant
    training value (pinned_: the value, NaN for the others), each feature's usual named level
    (usual_), the latent term (memory_, latent_: its factor, 0 = off), the smoothing cap (cap_),
    the threshold (threshold_), the calibration median (median_) and last scores (recent_) the
    drift guard starts from, and n_rows_. The host-level features (host_: the same values in
    entities that share a node, utils.shared_features; None: none) are named but not scored.
    """

    def __init__(self, smooth: int = 5, score_floor: float = 0.1, latent_weight: float = 0.5, name_q: float = 0.9,
                 repair_weight: float = 1.0, spot_q: float = 1e-2, spot_level: float = 0.98,
                 alarm_budget: float = 1.0, drift_window: int = 1000):
        self.smooth, self.score_floor = int(smooth), score_floor
        self.latent_weight, self.name_q, self.repair_weight = latent_weight, name_q, repair_weight
        self.spot_q, self.spot_level = spot_q, spot_level
        self.alarm_budget, self.drift_window = alarm_budget, int(drift_window)
        self.center_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.pinned_: np.ndarray | None = None
        self.usual_: np.ndarray | None = None
        self.host_: np.ndarray | None = None
        self.memory_: Memory | None = None
        self.latent_ = 0.0
        self.cap_ = np.inf
        self.threshold_ = np.nan
        self.median_ = 0.0
        self.recent_ = np.zeros(0)
        self.n_rows_ = 0

    @classmethod
    def from_config(cls, cfg) -> "Scorer":
        return cls(smooth=cfg.smooth, score_floor=cfg.score_floor, latent_weight=cfg.latent_weight,
                   name_q=cfg.name_q, repair_weight=cfg.repair_weight, spot_q=cfg.spot_q, spot_level=cfg.spot_level,
                   alarm_budget=cfg.alarm_budget, drift_window=cfg.drift_window)

    # ---- fit
    def fit(self, calib: Reconstruction, constant: np.ndarray | None = None, memory: np.ndarray | None = None,
            step_s: float | None = None, host: np.ndarray | None = None) -> "Scorer":
        """Learn the normaliser, latent term, cap and threshold from the calibration rows.
        constant: (V,) the features constant over the train series; memory: (M, d) theta0 of the
        entity's normal windows (PUAD's latent term; None: no term); step_s: seconds between rows
        (the alarm budget needs it); host: (V,) the host-level features, named but not scored (a
        node's load moving is not evidence about one service on it: docs/decisions.md)."""
        self.n_rows_ = len(calib)
        self.host_ = np.asarray(host, bool) if host is not None and np.any(host) else None
        if calib.scores is None:
            const = np.broadcast_to(np.asarray(False if constant is None else constant, bool), calib.x.shape[1:])
            self.pinned_ = np.where(const, np.asarray(calib.x, np.float64)[0], np.nan)
            self.center_, self.scale_ = fit_normaliser(np.asarray(calib.x, np.float64) - calib.mu,
                                                       np.where(const, CONST_FLOOR, self.score_floor))
            if self.latent_weight > 0 and memory is not None and len(memory) and len(calib) and calib.theta0 is not None:
                self.memory_ = Memory(memory)
                dist = self.memory_.distance(calib.theta0, LATENT_K)
                self.latent_ = self.latent_weight / max(float(np.median(dist)), LATENT_FLOOR)
            if self.name_q > 0 and len(calib):
                self.usual_ = np.maximum(np.quantile(self.name(calib), self.name_q, axis=0), USUAL_FLOOR)
        raw = self.raw_scores(calib)
        self.cap_ = float(raw.max()) if len(raw) else np.inf
        s = smooth_scores(raw, self.smooth, self.cap_)
        self.threshold_ = float(spot_threshold(s, spot_risk(self.alarm_budget, self.spot_q, step_s), self.spot_level)
                                if len(s) else np.inf)
        self.median_ = float(np.median(s)) if len(s) else 0.0
        self.recent_ = s[-self.drift_window:].copy() if self.drift_window > 0 else np.zeros(0)
        return self

    def fixed(self, value: float) -> "Scorer":
        """A copy whose threshold is `value` at every point: no drift guard (detect_live.py's
        --fixed_threshold)."""
        other = copy.copy(self)
        other.threshold_, other.drift_window, other.recent_ = float(value), 0, np.zeros(0)
        return other

    # ---- score
    def contributions(self, rec: Reconstruction) -> np.ndarray:
        """Each feature's part c_tv of the raw point score (n, V), before smoothing."""
        return contributions_of(rec.x, rec.mu, self.center_, self.scale_)

    def latent_term(self, theta0: np.ndarray | None) -> np.ndarray | float:
        """What theta0's distance to the entity's memory adds to each raw point score (n,)."""
        if self.latent_ <= 0:
            return 0.0
        if theta0 is None:
            raise ValueError("this scorer has a latent term; the reconstruction needs theta0")
        return self.latent_ * self.memory_.distance(theta0, LATENT_K)

    def raw_scores(self, rec: Reconstruction) -> np.ndarray:
        """Raw point scores (n,): the mean contribution over features plus the latent term; a
        scalar model's own."""
        if rec.scores is not None:
            return np.asarray(rec.scores, np.float64)
        return scored(self.contributions(rec), self.host_).mean(-1) + self.latent_term(rec.theta0)

    def score(self, rec: Reconstruction) -> np.ndarray:
        """Point scores (n,): higher = more anomalous (module docstring)."""
        return smooth_scores(self.raw_scores(rec), self.smooth, self.cap_)

    def name(self, rec: Reconstruction) -> np.ndarray | None:
        """What names features (n, V): the contributions smoothed like the score, a feature still
        at its constant training value at 0, each over its usual level (usual_; none before it is
        fitted or with name_q=0); None for a scalar model."""
        if rec.scores is not None or rec.mu is None:
            return None
        if rec.fall is not None:  # a level gauge's fall names it, though it does not raise the score
            rec = dataclasses.replace(rec, mu=rec.mu + rec.fall, fall=None)
        c = smooth(attribution(self.contributions(rec), rec.x, self.pinned_), self.smooth)
        return c if self.usual_ is None else np.minimum(c / self.usual_, MAX_CONTRIBUTION)

    # ---- thresholds
    def thresholds(self, scores: np.ndarray) -> np.ndarray:
        """Per-point thresholds (n,) of a scored series that follows the calibration rows: the
        drift guard, causal (point t's threshold uses the scores before t, recent_ first);
        drift_window 0: threshold_ at every point."""
        s = np.asarray(scores, np.float64)
        w = self.drift_window
        if w <= 0 or len(s) == 0:
            return np.full(len(s), self.threshold_)
        past = np.concatenate([self.recent_, s])
        med = pd.Series(past).rolling(w, min_periods=1).median().to_numpy()  # med[i]: past[i-w+1..i]
        before = med[len(self.recent_) - 1: len(past) - 1] if len(self.recent_) else np.r_[self.median_, med[:-1]]
        return self.threshold_ + np.maximum(before - self.median_, 0.0)

    def next_threshold(self, history: np.ndarray) -> float:
        """The drift guard's threshold for the next point given the scores before it (the last
        drift_window used; detect_live.py keeps them per entity, recent_ first)."""
        h = np.asarray(history, np.float64)[-self.drift_window:] if self.drift_window > 0 else np.zeros(0)
        return self.threshold_ if len(h) == 0 else self.threshold_ + max(float(np.median(h)) - self.median_, 0.0)

    # ---- which metrics
    def explain(self, rec: Reconstruction, recon: Reconstruct, points: np.ndarray, seq_len: int,
                batch: int = 256) -> np.ndarray:
        """What ranks features at `points` (n, V): log(1 + named) (name()) plus, times
        repair_weight, each feature's repair gain: how much the other features' named
        contributions fall, in the same log units, when this feature's values in the window are
        replaced by the model's reconstruction of them and the window is reconstructed again
        (at the point itself: the gain is not smoothed). A feature that pulls the reconstruction
        of the others away gets the share of the anomaly it causes, which residuals alone give
        to the features it disturbs (docs/decisions.md, "Naming by repair"). A feature that no
        asked point names (still at its constant training value) is not repaired. Rows not in
        `points` hold log(1 + named) only; each row's value does not depend on which other rows
        are asked for.

        rec: the series' reconstruction (its x, and the named contributions); recon: the model's
        reconstruction of windows. Point t is named by the window ending at
        it (the first seq_len - 1 points by the first window). Costs one window reconstruction per
        feature that a point names, per point asked for.
        """
        named = self.name(rec)
        out = np.log1p(np.maximum(named, 0.0))
        points = np.unique(np.asarray(points, np.int64))
        if self.repair_weight <= 0 or len(points) == 0:
            return out
        x = np.asarray(rec.x, np.float32)
        n, V = x.shape
        windows = create_sequences(x, seq_len)
        start = np.maximum(points - (seq_len - 1), 0)
        pos = points - start
        can = named[points] > 0  # a feature a point does not name is not repaired for it
        features = np.flatnonzero(can.any(0))
        gain = np.zeros((len(points), V))
        for i in range(0, len(points), batch):
            rows = slice(i, i + batch)
            xb = np.ascontiguousarray(windows[start[rows]])
            at = (np.arange(len(xb)), pos[rows])  # each window's named point
            mu = recon(xb)  # the repair values, and the named contributions before any repair
            before = self._log_named(xb[at], mu[at])
            for v in features:
                repaired = xb.copy()
                repaired[:, :, v] = mu[:, :, v]
                fall = before - self._log_named(xb[at], recon(repaired)[at])
                gain[rows, v] = fall.sum(1) - fall[:, v]  # what repairing v lowers in the others
        out[points] += self.repair_weight * np.maximum(gain, 0.0) * can
        return out

    def _log_named(self, x: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """log(1 + each feature's named contribution) of single points (B, V), unsmoothed."""
        c = attribution(contributions_of(x, mu, self.center_, self.scale_), x, self.pinned_)
        c = c if self.usual_ is None else np.minimum(c / self.usual_, MAX_CONTRIBUTION)
        return np.log1p(np.maximum(c, 0.0))


def scored(contrib: np.ndarray, host: np.ndarray | None) -> np.ndarray:
    """The contributions that make the score: a host-level feature's (host, (..., V) bool) are 0;
    the mean is still over every feature."""
    return contrib if host is None else np.where(host, 0.0, contrib)


def contributions_of(x: np.ndarray, mu: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Each feature's contribution: its residual x - mu, less the normaliser's center, over its
    scale, squared, capped at MAX_CONTRIBUTION (Scorer.contributions; score_many for E series)."""
    return np.minimum(((np.asarray(x, np.float64) - mu - center) / scale) ** 2, MAX_CONTRIBUTION)


def score_many(scorers: list[Scorer], x: np.ndarray, mu: np.ndarray | None, theta0: np.ndarray | None,
               raw: np.ndarray | None = None, fall: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scorer.score and Scorer.name of E series of the same length at once (detect_live.py's
    batched poll): x, mu (E, n, V) and fall (E, n, V) or None (Reconstruction.fall), theta0 (E, n, d)
    or a scalar model's raw scores (E, n), one
    fitted Scorer per series, all with the same smoothing -> scores (E, n) and named (E, n, V),
    the numbers each scorer gives its series alone (the same operations along the same axis)."""
    k = scorers[0].smooth
    if any(s.smooth != k for s in scorers):
        raise ValueError("score_many: scorers of different smoothing")
    t = lambda a: np.swapaxes(np.asarray(a), 0, 1)  # noqa: E731  (n, E, ...): smooth runs along axis 0
    cap = np.array([s.cap_ for s in scorers])  # (E,), broadcast along the entities' axis 1
    if raw is not None:
        return np.swapaxes(smooth_scores(t(raw).astype(np.float64), k, cap), 0, 1), None
    center = np.stack([s.center_ for s in scorers])[None]  # (1, E, V)
    scale = np.stack([s.scale_ for s in scorers])[None]
    xt = t(x).astype(np.float64)
    c = contributions_of(xt, t(mu), center, scale)
    latent = t(latent_many(scorers, theta0, c.shape[0]))  # (n, E)
    pinned = np.stack([s.pinned_ for s in scorers])[None]
    usual = np.stack([np.ones(c.shape[-1]) if s.usual_ is None else s.usual_ for s in scorers])[None]
    c_named = c if fall is None else contributions_of(xt, t(mu) + t(fall), center, scale)
    named = np.minimum(smooth(attribution(c_named, xt, pinned), k) / usual, MAX_CONTRIBUTION)
    host = np.stack([np.zeros(c.shape[-1], bool) if s.host_ is None else s.host_ for s in scorers])[None]
    return (np.swapaxes(smooth_scores(scored(c, host).mean(-1) + latent, k, cap), 0, 1), np.swapaxes(named, 0, 1))


_BANK: list = [None]  # the last MemoryBank latent_many stacked: reused while its entities' memories are the same


def latent_many(scorers: list[Scorer], theta0: np.ndarray | None, n: int) -> np.ndarray:
    """Scorer.latent_term of E series at once (E, n): theta0 (E, n, d), one search of every
    entity's memory (MemoryBank, built once for a list of memories and kept for the next poll)."""
    weight = np.array([s.latent_ for s in scorers], np.float64)
    if not (weight > 0).any():
        return np.zeros((len(scorers), n))
    if theta0 is None:
        raise ValueError("this scorer has a latent term; the reconstruction needs theta0")
    memories = [s.memory_ if s.latent_ > 0 else None for s in scorers]
    bank = _BANK[0]
    if bank is None or len(bank.memories) != len(memories) or any(a is not b for a, b in zip(bank.memories, memories)):
        bank = _BANK[0] = MemoryBank(memories)
    return weight[:, None] * bank.distance(theta0, LATENT_K)


def top_features(weights: np.ndarray, features: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The k features with the largest weights over some points (explain's output or name()'s,
    (n, V) or (V,), summed over the points) -> [(name, share of the total in 0..1)], largest
    first. The one ranking behind test.py's segment tables, detect_live.py's alerts and HitRate."""
    c = np.asarray(weights, np.float64)
    c = np.maximum(c.sum(0) if c.ndim == 2 else c, 0)
    order = np.argsort(-c, kind="stable")[:k]
    total = c.sum()
    return [(features[i], float(c[i] / total) if total > 0 else 0.0) for i in order]


def named_rows(flagged: np.ndarray, interpretation: list | None = None, per_segment: int = 0,
               scores: np.ndarray | None = None, max_runs: int = RUNS_NAMED) -> np.ndarray:
    """The rows test.py and baselines.py name by repair (Scorer.explain): those of the flagged
    runs (segment tables, heatmaps; with scores, only the max_runs runs that peak highest) and of
    the interpretation segments ((start, end inclusive, ...) each; HitRate); per_segment > 0 keeps
    at most that many evenly spaced rows of each run and segment (metrics.segment_sample). Other
    rows are named by their contributions alone. A row's ranking does not depend on which rows are
    named, so labels only choose where it is computed, never what it is."""
    flagged_runs = _runs(flagged)
    if scores is not None and len(flagged_runs) > max_runs:
        peak = [float(np.max(scores[a:b])) for a, b in flagged_runs]
        flagged_runs = [flagged_runs[i] for i in sorted(np.argsort(peak, kind="stable")[::-1][:max_runs])]
    runs = [(a, b - 1) for a, b in flagged_runs] + [(s, e) for s, e, *_ in interpretation or []]
    rows = [segment_sample(s, e, per_segment) for s, e in runs]
    return np.unique(np.concatenate(rows)).astype(np.int64) if rows else np.zeros(0, np.int64)


def _runs(flagged: np.ndarray) -> list[tuple[int, int]]:
    f = np.asarray(flagged).astype(bool)
    d = np.diff(np.r_[0, f.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))
