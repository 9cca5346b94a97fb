"""Classical baselines scored and evaluated exactly like PUAD.

    python baselines.py --data=../shared/datasets/ASD [--methods=random,pca,iforest,knn,ae,tranad]
                        [--out_dir=DIR] [any Config field, e.g. --seq_len=20]

Per entity: a scaler fitted on the train series only (as train_safe.prepare does), the last
``val_frac`` of train held out, each model fitted on the rest (flattened windows of
``seq_len``), then validation and test windows scored, point t by the window ending at t.
PCA and the autoencoder reconstruct their input and go through the project's scorer exactly
as PUAD does (``scoring.Scorer``, fitted on the validation rows: ``--score_floor``,
``--smooth``); kNN, IsolationForest, random and TranAD (tranad.py, Tuli et al. 2022, on windows
of seq_len, its score at each window's last point, mean over features; run only when --methods
names it) give scalar scores, which get the same smoothing. The threshold is chosen on the
*validation* scores without labels (SPOT at the alarm budget, ``spot_q``/``spot_level``), and
``metrics.evaluate`` computes every metric (alarm events under ``--alarm_hold`` and ``--alarm_clear``).
For an entity with interpretation labels (interpretation.csv), PCA and the autoencoder, whose
scores are sums over features, also report ``hitrate_100``/``hitrate_150`` from their per-feature
contributions (metrics.interpretation_metrics) and the random-ranking floors
``hitrate_100_random``/``hitrate_150_random``; the other methods report none of these keys.
Writes ``<out_dir>/<method>/metrics.json`` = {"entities", "mean", meta...} and each entity's test
scores, ``<out_dir>/<method>/scores_<entity>.csv`` (test.py's columns: timestamp, score,
threshold, prediction, label), atomically; the
default out_dir is ``res_hr/baselines/<dataset folder name>`` (e.g. res_hr/baselines/ASD).

Baseline-only options (not Config fields): --methods, --knn_k (5), --knn_max_train (5000),
--ae_epochs (5), --pca_var (0.95), --iforest_trees (100), --tranad_epochs (5).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

import metrics
import scoring
import tranad
from config import Config, cli, cli_error
from utils import (DataError, Entity, Scaler, create_sequences, interpretation_segments, load_dataset, log,
                   scores_frame, set_seed, set_threads, shared_features, split_train_val, time_step,
                   window_to_point_scores, write_csv_atomic, write_json_atomic)

# the Config fields baselines.py takes: the data, its split and window, the scorer, the AE's batch
READS = ("data", "entities", "out_dir", "smooth", "alarm_budget", "alarm_hold", "alarm_clear", "num_threads", "seed", "seq_len",
         "val_frac", "val_blocks", "score_floor", "name_q", "repair_weight", "spot_q", "spot_level", "drift_window",
         "batch_size", "score_batch")
METHODS = ("random", "pca", "iforest", "knn", "ae", "tranad")
DEFAULT_METHODS = METHODS[:5]  # tranad only when asked: its training takes minutes per entity
EXTRA_DEFAULTS: dict[str, Any] = {"methods": ",".join(DEFAULT_METHODS), "knn_k": 5,
                                  "knn_max_train": 5000, "ae_epochs": 5, "pca_var": 0.95,
                                  "iforest_trees": 100, "tranad_epochs": tranad.EPOCHS}

# a scorer maps flattened windows (n, T*V) to {"scores": per-timestep scores (n, T)} or, for a
# model that reconstructs its input, {"mu": the reconstruction (n, T, V)}; the latter goes through
# the project's per-feature scoring (scoring.py) exactly as PUAD's reconstruction does
WindowModel = Callable[[np.ndarray], dict]


def _flat(x: np.ndarray, seq_len: int, stride: int = 1) -> np.ndarray:
    w = create_sequences(x, seq_len, stride)
    return np.ascontiguousarray(w.reshape(len(w), -1), dtype=np.float32)


def _per_window(score: np.ndarray, seq_len: int) -> np.ndarray:
    """A window-level score repeated over the window's timesteps -> (n, T)."""
    return np.repeat(np.asarray(score, dtype=np.float64)[:, None], seq_len, axis=1)


def fit_random(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """Uniform random scores: the floor every metric should be read against (point adjustment
    lifts it far above zero)."""
    rng = np.random.default_rng(cfg.seed)
    return lambda x: {"scores": rng.random((len(x), cfg.seq_len))}


def fit_pca(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """PCA on flattened windows; the reconstruction is scored like PUAD's."""
    T = cfg.seq_len
    if len(train) < 2:  # one window has no variance to explain (sklearn divides 0 by 0): its mean
        mean = train.mean(0)
        return lambda x: {"mu": np.broadcast_to(mean, x.shape).reshape(len(x), T, -1).copy()}
    pca = PCA(n_components=float(opt["pca_var"]), svd_solver="full").fit(train)
    return lambda x: {"mu": pca.inverse_transform(pca.transform(x)).reshape(len(x), T, -1)}


def fit_iforest(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """IsolationForest on flattened windows; score = -score_samples (window level)."""
    forest = IsolationForest(n_estimators=int(opt["iforest_trees"]), random_state=cfg.seed,
                             n_jobs=1).fit(train)
    return lambda x: {"scores": _per_window(-forest.score_samples(x), cfg.seq_len)}


def fit_knn(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """Mean Euclidean distance to the k nearest train windows (train subsampled if big)."""
    rng = np.random.default_rng(cfg.seed)
    m = int(opt["knn_max_train"])
    if len(train) > m:
        train = train[np.sort(rng.choice(len(train), m, replace=False))]
    k = min(int(opt["knn_k"]), len(train))
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train)

    def score(x: np.ndarray) -> dict:
        out = np.empty(len(x))
        for i in range(0, len(x), 4096):
            d, _ = nn.kneighbors(x[i:i + 4096])
            out[i:i + 4096] = d.mean(axis=1)
        return {"scores": _per_window(out, cfg.seq_len)}
    return score


class _AE(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int = 128, code: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, code),
            torch.nn.ReLU(), torch.nn.Linear(code, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fit_ae(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """MLP autoencoder over a flattened window; the reconstruction is scored like PUAD's."""
    torch.manual_seed(cfg.seed)
    model = _AE(train.shape[1])
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(train)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = max(int(cfg.batch_size), 1)
    model.train()
    for _ in range(int(opt["ae_epochs"])):
        for idx in torch.randperm(len(xt), generator=gen).split(bs):
            xb = xt[idx]
            loss = torch.mean((model(xb) - xb) ** 2)
            optim.zero_grad()
            loss.backward()
            optim.step()
    model.eval()
    T = cfg.seq_len

    @torch.no_grad()
    def score(x: np.ndarray) -> dict:
        rec = torch.cat([model(b) for b in torch.from_numpy(x).split(8192)]).numpy()
        return {"mu": rec.reshape(len(x), T, -1).astype(np.float64)}
    return score


def fit_tranad(train: np.ndarray, cfg: Config, opt: dict) -> WindowModel:
    """TranAD (tranad.py) on windows of seq_len; its score (at each window's last point,
    mean over features) is scalar: no per-feature normalisation, no naming."""
    T = cfg.seq_len
    model = tranad.fit(train.reshape(len(train), T, -1), epochs=int(opt["tranad_epochs"]), seed=cfg.seed)
    return lambda x: {"scores": _per_window(tranad.window_scores(model, x.reshape(len(x), T, -1),
                                                                 cfg.score_batch).mean(1), T)}


FITTERS: dict[str, Callable[[np.ndarray, Config, dict], WindowModel]] = {
    "random": fit_random, "pca": fit_pca, "iforest": fit_iforest, "knn": fit_knn, "ae": fit_ae, "tranad": fit_tranad}


def point_output(out: dict, x: np.ndarray, seq_len: int) -> scoring.Reconstruction:
    """A scorer's window output -> per point (point t from the window ending at it, as PUAD)."""
    if "mu" in out:
        return scoring.Reconstruction(x, mu=window_to_point_scores(out["mu"], seq_len))
    return scoring.Reconstruction(x, scores=window_to_point_scores(out["scores"], seq_len))


def run_entity(ent: Entity, method: str, cfg: Config, opt: dict, elsewhere: np.ndarray | None = None,
               host: np.ndarray | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit one baseline on one entity; calibrate on the held-out rows (scoring.Scorer, as PUAD;
    host: the data set's host-level features, named but not scored); evaluate on test -> (its
    metrics, its test scores in test.py's scores_<entity>.csv columns)."""
    t0 = time.perf_counter()
    if ent.test is None:
        raise SystemExit(f"{ent.name}: no test split to score")
    scaler = Scaler().fit(ent.train)  # train only
    tr, held = split_train_val(scaler.transform(ent.train), cfg.val_frac, cfg.seq_len, cfg.val_blocks)
    model = FITTERS[method](np.concatenate([_flat(p, cfg.seq_len) for p in tr]), cfg, opt)
    calib = scoring.Reconstruction.concat([point_output(model(_flat(p, cfg.seq_len)), p, cfg.seq_len) for p in held])
    scorer = scoring.Scorer.from_config(cfg).fit(calib, scoring.constant_features(ent.train), step_s=time_step([ent]),
                                                 host=host)
    test = scaler.transform(ent.test)
    rec = point_output(model(_flat(test, cfg.seq_len)), test, cfg.seq_len)
    test_scores = scorer.score(rec)
    thresholds = scorer.thresholds(test_scores)
    res = metrics.evaluate(test_scores, thresholds, ent.labels, ent.faults, step_s=time_step([ent]),
                           hold=cfg.alarm_hold, clear=cfg.alarm_clear, elsewhere=elsewhere)
    scores = scores_frame(ent, test_scores, thresholds)
    if ent.interpretation is not None and rec.mu is not None:  # named as PUAD's (Scorer.explain)
        recon = lambda w: model(np.ascontiguousarray(w.reshape(len(w), -1), dtype=np.float32))["mu"]  # noqa: E731
        segs = interpretation_segments(ent, ent.features)
        named = scoring.named_rows(np.zeros(len(test), bool), ent.interpretation, scoring.NAMED_PER_SEGMENT)
        res.update(metrics.interpretation_metrics(scorer.explain(rec, recon, named, cfg.seq_len), segs,
                                                  weights=metrics.sample_weights(len(test), segs, scoring.NAMED_PER_SEGMENT)))
    res["n_val"] = int(scorer.n_rows_)
    res["time_s"] = round(time.perf_counter() - t0, 3)
    return res, scores


OPTION_HELP = {"knn_k": "kNN: neighbours averaged", "knn_max_train": "kNN: train windows kept (a random subset)",
               "ae_epochs": "windowed AE: training epochs", "pca_var": "PCA: share of the variance kept",
               "iforest_trees": "IsolationForest: trees", "tranad_epochs": "TranAD: training epochs"}


def add_options(parser) -> None:
    """baselines.py's own options (EXTRA_DEFAULTS), after Config's."""
    group = parser.add_argument_group("baselines")
    group.add_argument("--methods", default=EXTRA_DEFAULTS["methods"],
                       help=f"comma list of {', '.join(METHODS)} (default: {EXTRA_DEFAULTS['methods']})")
    for key, value in EXTRA_DEFAULTS.items():
        if key != "methods":
            group.add_argument(f"--{key}", type=lambda t, kind=type(value): kind(float(t)), default=value,
                               metavar=type(value).__name__.upper(), help=f"{OPTION_HELP[key]} [default {value!r}]")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the chosen baselines; returns {method: metrics.json content}."""
    parsed = cli(argv, defaults={"out_dir": "res_hr/baselines"}, description=__doc__, extra=add_options, reads=READS)
    cfg, opt = parsed.cfg, vars(parsed.opts)
    methods = [m.strip() for m in str(opt["methods"]).split(",") if m.strip()]
    unknown = [m for m in methods if m not in FITTERS]
    if not methods:
        cli_error(f"--methods: no method given; choose from {METHODS}")
    if unknown:
        cli_error(f"unknown method(s) {unknown}; choose from {METHODS}")
    if "out_dir" not in parsed.given:  # default: one folder per dataset, so runs do not overwrite each other
        cfg.out_dir = str(Path(cfg.out_dir) / Path(cfg.data).resolve().name)
    set_threads(cfg.num_threads)
    try:
        entities = load_dataset(cfg.data, cfg.entities, min_rows=cfg.seq_len)
    except DataError as e:
        raise SystemExit(f"baselines.py: error: {e}") from None
    out: dict[str, dict] = {}
    tested = [e for e in entities if e.test is not None]
    elsewhere = metrics.elsewhere_masks({e.name: (e.test_ts, e.labels) for e in tested}, time_step(tested))
    host = shared_features(entities)  # as train_safe.py stores in PUAD's checkpoint
    for method in methods:
        t0 = time.perf_counter()
        set_seed(cfg.seed)
        per_entity, scores = {}, {}
        for ent in entities:
            per_entity[ent.name], scores[ent.name] = run_entity(ent, method, cfg, opt, elsewhere.get(ent.name), host)
            r = per_entity[ent.name]
            log.info("%s %s: auc_pr=%.3f f1=%.3f best_f1=%.3f (%.1fs)", method, ent.name,
                     r.get("auc_pr", float("nan")), r.get("f1", float("nan")),
                     r.get("best_f1_oracle", float("nan")), r["time_s"])
        summary = metrics.summarize(per_entity)
        summary.update(method=method, data=str(cfg.data), wall_s=round(time.perf_counter() - t0, 2),
                       options={k: opt[k] for k in opt if k != "methods"},
                       config=dataclasses.asdict(cfg))
        path = f"{cfg.out_dir}/{method}/metrics.json"
        try:
            write_json_atomic(path, summary)
            for name, frame in scores.items():
                path = f"{cfg.out_dir}/{method}/scores_{name}.csv"
                write_csv_atomic(path, frame)
        except OSError as e:
            raise SystemExit(f"baselines.py: error: cannot write {path} ({e.strerror or e})") from None
        m = summary["mean"]
        log.info("%s mean: auc_roc=%s auc_pr=%s f1=%s best_f1=%s best_f1_pa=%s vus_pr=%s  [%.1fs]",
                 method, *(_fmt(m.get(k)) for k in ("auc_roc", "auc_pr", "f1", "best_f1_oracle",
                                                     "best_f1_pa_oracle", "vus_pr")),
                 summary["wall_s"])
        out[method] = summary
    return out


def _fmt(v: Any) -> str:
    return "nan" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
