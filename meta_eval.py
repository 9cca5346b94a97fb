"""Meta anomaly detection on ASD (paper section 4.2.2, table 2): adapt to a new server from N windows.

History: one shared model trained on omi-1..omi-9 (80 % of the servers). For each new server
(omi-10, omi-11, omi-12) and each N in 1, 5, 10, 20, 200, compare on that server's test split:
  adapted       history model + local prototypes beta_l fitted on the first N train windows
  history-only  (a) the same history model, global prototypes only (same scaler)
  scratch       (b) a PUAD trained from scratch on only those N windows
  full          (c) a PUAD trained on the server's whole train series (the upper bound; N = all)
  pca           (d) PCA reconstruction error fitted on the same N windows
Thresholds come from the N windows' own scores (SPOT), never from labels.

    python meta_eval.py                       # cpu preset
Writes <out_dir>/meta_eval.csv and <out_dir>/meta_eval.png; models under <out_dir>/meta/.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import baselines  # noqa: E402
import metrics  # noqa: E402
import scoring  # noqa: E402
import test as evaluate  # noqa: E402
import train_safe  # noqa: E402
from config import SCORES, TRAINS, Config, cli_config  # noqa: E402
from utils import Scaler, atomic_write, load_dataset, set_threads, write_csv_atomic  # noqa: E402

HISTORY = [f"omi-{i}" for i in range(1, 10)]
NEW = ["omi-10", "omi-11", "omi-12"]
NS = [1, 5, 10, 20, 200]
ADAPT_STEPS = 100     # gradient steps for the local fit, whatever N (N <= batch: one step an epoch)
SCRATCH_STEPS = 300   # gradient steps for a model trained from scratch on N windows
KEYS = ["auc_pr", "auc_roc", "vus_pr", "f1", "best_f1_oracle", "f1_pa", "best_f1_pa_oracle", "local_share"]


def epochs_for(steps: int, n_windows: int, batch: int) -> int:
    return max(1, math.ceil(steps / math.ceil(n_windows / batch)))


def with_paths(cfg: Config, ckpt: Path, **changes) -> Config:
    """A train or test run of this study: the user's Config with this run's checkpoint and loss
    file, no plots, then the run's own changes."""
    values = dict(ckpt=str(ckpt), loss_csv=str(ckpt.parent / "loss_metrics.csv"), plots=False,
                  resume=False, entity="", adapt_windows=0)
    values.update(changes)
    return dataclasses.replace(cfg, **values)


def scores_row(res: dict, entity: str, n: int | str, method: str, seconds: float) -> dict:
    m = res["entities"][entity] if "entities" in res else res
    return dict(entity=entity, n_windows=n, method=method, **{k: m.get(k) for k in KEYS},
                threshold=m.get("threshold"), seconds=round(seconds, 1))


def pca_few_shot(cfg: Config, entity: str, n: int) -> dict:
    """(d) PCA fitted on the first n windows, calibrated on them (scoring.Scorer, as PUAD)."""
    ent = load_dataset(cfg.data, [entity], min_rows=cfg.seq_len)[0]
    rows = ent.train[: n + cfg.seq_len - 1]
    scaler = Scaler().fit(rows)
    score = baselines.FITTERS["pca"](baselines._flat(scaler.transform(rows), cfg.seq_len), cfg,
                                     dict(baselines.EXTRA_DEFAULTS))
    out = lambda x: baselines.point_output(score(baselines._flat(x, cfg.seq_len)), x, cfg.seq_len)  # noqa: E731
    scorer = scoring.Scorer.from_config(cfg).fit(out(scaler.transform(rows)), scoring.constant_features(rows))
    test_scores = scorer.score(out(scaler.transform(ent.test)))
    return metrics.evaluate(test_scores, scorer.thresholds(test_scores), ent.labels)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    cfg = cli_config(argv, defaults=dict(data="../shared/datasets/ASD"), description=__doc__,
                     reads=tuple(dict.fromkeys(TRAINS + SCORES)))
    set_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    work = out / "meta"
    rows: list[dict] = []
    csv_path = out / "meta_eval.csv"

    def record(row: dict) -> None:
        rows.append(row)
        write_csv_atomic(csv_path, pd.DataFrame(rows))  # partial results survive an interruption
        print(f"[meta] {row['entity']} N={row['n_windows']} {row['method']}: AUC-PR {row['auc_pr']:.3f} "
              f"F1 {row['f1']:.3f} best-F1(oracle) {row['best_f1_oracle']:.3f}", flush=True)

    def test_run(ckpt: Path, entity: str, res_dir: Path, **changes) -> dict:
        return evaluate.evaluate_checkpoint(with_paths(cfg, ckpt, entity=entity, out_dir=str(res_dir), **changes))

    history = work / "history" / "puad.ckpt"
    t0 = time.time()
    if not history.is_file():
        train_safe.train(with_paths(cfg, history, entities=",".join(HISTORY), stage="global"))
    print(f"[meta] history model: {history} ({time.time() - t0:.0f}s)")
    for entity in NEW:
        t = time.time()
        full = work / f"full-{entity}" / "puad.ckpt"
        train_safe.train(with_paths(cfg, full, entities=entity, stage="both"))
        record(scores_row(test_run(full, entity, full.parent / "res"), entity, "all", "full", time.time() - t))
        for n in NS:
            t = time.time()
            train_safe.train(with_paths(cfg, history, stage="local", entity=entity, adapt_windows=n,
                                        local_epochs=epochs_for(ADAPT_STEPS, n, cfg.batch_size),
                                        loss_csv=str(work / f"adapt-{entity}-{n}.csv")))
            res_dir = work / f"adapt-{entity}-{n}"
            record(scores_row(test_run(history, entity, res_dir), entity, n, "adapted", time.time() - t))
            t = time.time()
            record(scores_row(test_run(history, entity, res_dir / "history_only", use_local=False),
                              entity, n, "history-only", time.time() - t))
            t = time.time()
            scratch = work / f"scratch-{entity}-{n}" / "puad.ckpt"
            epochs = epochs_for(SCRATCH_STEPS, n, cfg.batch_size)
            train_safe.train(with_paths(cfg, scratch, entities=entity, stage="global", adapt_windows=n,
                                        epochs=epochs, warmup_epochs=max(1, epochs // 3)))
            record(scores_row(test_run(scratch, entity, scratch.parent / "res"), entity, n, "scratch", time.time() - t))
            t = time.time()
            record(scores_row(pca_few_shot(cfg, entity, n), entity, n, "pca", time.time() - t))
    df = pd.DataFrame(rows)
    plot(df, out / "meta_eval.png")
    summary = df.groupby(["method", "n_windows"], sort=False)[["auc_pr", "f1", "best_f1_oracle", "f1_pa"]].mean()
    print(summary.round(3).to_string())
    print(f"[meta] wrote {csv_path} in {time.time() - t0:.0f}s")
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ["auc_pr", "f1", "best_f1_oracle"]):
        for method, g in df[df.n_windows != "all"].groupby("method", sort=False):
            m = g.assign(n=g.n_windows.astype(int)).groupby("n")[key].mean()
            ax.plot(m.index, m.values, marker="o", label=method)
        full = df[df.method == "full"][key].mean()
        ax.axhline(full, color="k", ls="--", lw=1, label="full (upper bound)")
        ax.set_xscale("log")
        ax.set_xlabel("N adaptation windows")
        ax.set_title(f"{key} (mean over {', '.join(NEW)})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
