"""Evaluate a trained PUAD checkpoint: scores, label-free threshold, metrics and plots.

    python test.py                          # every entity the checkpoint was trained on
    python test.py --entity=omi-3           # one entity (uses its local file if adapted)

For each entity: score the held-out validation tail of its train series and its test series
(point t is scored by the window that ends at t; the first seq_len-1 points by the first
window), fix the threshold from the validation scores alone (SPOT at the alarm budget), then
compare with the labels. Labels are read only
to compute metrics. Writes to --out_dir (res_hr/): metrics.json, scores_<entity>.csv,
evaluation_metrics.png, anomaly_scores_<entity>.png, transport_plan.png. One run per --out_dir
(a second one stops with a one-line error naming <out_dir>/.test.lock). A local file that does
not belong to the checkpoint and entity is refused (puad.local_mismatch).

The model (the checkpoint's model_args) is the checkpoint's; --data, --entities, --val_frac and
--scaler default to its training run's; every other option (scoring, thresholds, outputs) is
the command line's, with Config's defaults (puad.run_config).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from config import SCORES, Config, cli, print_config  # noqa: E402
from metrics import elsewhere_masks, evaluate, held_alarms, interpretation_metrics, sample_weights, segments, summarize  # noqa: E402
import scoring  # noqa: E402
from puad import (build_model, fit_scorer, history_warning, read_checkpoint, reconstruct_entity, run_config,  # noqa: E402
                  window_reconstructor)
from utils import (EPOCH_S, DataError, Entity, LockError, align_features, atomic_write, get_device,  # noqa: E402
                   interpretation_segments, load_dataset, log, output_lock, run_outputs, scores_frame, set_threads,
                   time_step, write_csv_atomic, write_json_atomic)

READS = SCORES  # the Config fields test.py takes
SHOWN_METRICS = ["auc_roc", "auc_pr", "vus_pr", "precision", "recall", "f1", "best_f1_oracle",
                 "f1_pa", "best_f1_pa_oracle"]


def score_entity(model, ckpt: dict, cfg: Config, ent: Entity) -> dict:
    """Calibrate on the held-out rows (or, for an entity adapted from N windows, those N
    windows) of one entity, then score its test series with that calibration and name the
    features behind its flagged runs and interpretation segments (scoring.named_rows: naming by
    repair costs a reconstruction per feature and point)."""
    r = reconstruct_entity(model, ckpt, cfg, ent)
    scorer = fit_scorer(cfg, r.calib, time_step([ent]))
    scores = scorer.score(r.test)
    threshold = scorer.thresholds(scores)
    named = scoring.named_rows(scores > threshold, ent.interpretation, scoring.NAMED_PER_SEGMENT, scores)
    naming = scorer.explain(r.test, window_reconstructor(model, r.use_local), named, cfg.seq_len)
    return dict(test_scores=scores, contrib=scorer.name(r.test), naming=naming, named=named, rec=r.test,
                threshold=threshold, scorer=scorer, use_local=r.use_local)


def alerts_text(m: dict) -> str:
    """The alert figures of a metrics dict (one entity's or the totals) as a log fragment."""
    per = f"{m['false_alarms_per_day']:.2f} per day" if np.isfinite(m.get("false_alarms_per_day", np.nan)) \
        else f"{1000 * m['false_alarm_events'] / max(m.get('n_points', 0), 1):.2f} per 1k points"
    during = (f", {m['false_alarms_elsewhere']:.0f} of them during another entity's fault"
              if "false_alarms_elsewhere" in m else "")
    ceiling = (f" (ORACLE, each threshold chosen on the labels: at most {m['caught_at_budget_oracle']:.0f} at 1 false "
               "alarm per entity-day)" if "caught_at_budget_oracle" in m else "")
    res = m.get("resource_faults")
    resource = (f"; resource faults {res['caught']:.0f}/{res['events']:.0f}" + (
        f" (ORACLE: at most {m['resource_caught_at_budget_oracle']:.0f} at 1 false alarm per entity-day)"
        if "resource_caught_at_budget_oracle" in m else "") if res else "")
    return (f"false alarms {m['false_alarm_events']:.0f} ({per}{during}), faults caught "
            f"{m['faults_caught']:.0f}/{m['fault_events']:.0f}{ceiling}{resource}")


def when(t) -> str:
    """A test timestamp for people: Unix seconds or milliseconds and dates as UTC, else a row number."""
    if isinstance(t, (np.datetime64, pd.Timestamp)):
        return str(pd.Timestamp(t))[:19]
    for scale in (1.0, 1e-3):
        if EPOCH_S[0] <= float(t) * scale < EPOCH_S[1]:
            return pd.Timestamp(float(t) * scale, unit="s").strftime("%Y-%m-%d %H:%M:%SZ")
    return f"row {float(t):g}"


def preview_lines(ent: Entity, pred: np.ndarray, segs: pd.DataFrame | None, hold: int, clear: int,
                  step_s: float | None, shown: int = 10) -> list[str]:
    """What an entity without labelled anomalies (recent normal data) would page: its alarm
    events (raised after `hold` flagged points in a row, ended after `clear` unflagged:
    metrics.held_alarms, as detect_live.py alerts) per day, when each starts and ends, and the 3
    metrics naming it (its flagged run's row of segments_<entity>.csv); the first `shown`."""
    events = segments(held_alarms(pred, hold, clear))
    days = len(pred) * step_s / 86400 if step_s else None
    rate = f"{len(events) / days:.1f} per day over {days * 24:.1f} h" if days else \
        f"{1000 * len(events) / max(len(pred), 1):.2f} per 1k points (no time step)"
    lines = [f"{ent.name}: {len(events)} alarm event{'' if len(events) == 1 else 's'} ({rate}; alarms held {hold} points, "
                                                                              f"cleared after {clear})"]
    for a, b in events[:shown]:
        run = segs[(segs["start"] <= a) & (segs["end"] >= a)] if segs is not None else segs
        names = run["top_features"].iloc[0].replace(";", ", ") if run is not None and len(run) else "n/a"
        lines.append(f"  {when(ent.test_ts[a])} -> {when(ent.test_ts[b - 1])}  {names}")
    if len(events) > shown:
        lines.append(f"  ... {len(events) - shown} more (their flagged runs: segments_{ent.name}.csv)")
    return lines


def plot_scores(path: Path, ent: Entity, scaled_test: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> None:
    """The paper's figure 4: input channels, score curve, threshold (per point: the drift guard
    raises it while the score's level stays high), true anomaly segments.
    The score axis is logarithmic (linear below a tenth of the threshold) when the highest
    score is more than 30 times the threshold, so the threshold and the normal scores stay
    readable beside peaks a million times larger; flagged points are marked along the bottom."""
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(14, 6), sharex=True)
    t = np.arange(len(scores))
    ax0.plot(t, scaled_test, lw=0.5, alpha=0.6)
    ax0.set_ylabel("scaled inputs")
    ax1.plot(t, scores, lw=0.7, color="k", label="score")
    threshold = float(np.min(thresholds))  # the fitted one; the guard only raises it
    raised = f", raised up to {np.max(thresholds):.3g}" if np.max(thresholds) > threshold else ""
    ax1.plot(t, thresholds, color="r", lw=1, ls="--", label=f"threshold {threshold:.3g}{raised}")
    if ent.labels is not None:
        edges = np.diff(np.concatenate([[0], ent.labels, [0]]))
        for s, e in zip(np.where(edges == 1)[0], np.where(edges == -1)[0]):
            for ax in (ax0, ax1):
                ax.axvspan(s, e, color="red", alpha=0.15, lw=0)
    lo, hi = float(np.min(scores)), float(np.max(scores))
    floor = abs(threshold) / 10 if threshold else max(abs(lo), 1e-9)
    if lo > -floor and threshold > 0 and hi > 30 * threshold:  # a wide positive range: log axis
        ax1.set_yscale("symlog", linthresh=floor)
        ax1.set_ylim(min(lo, 0), hi * 2)
    else:
        top = max(hi, float(np.max(thresholds)))
        span = top - min(lo, threshold)
        ax1.set_ylim(min(lo, threshold) - 0.05 * span, top + 0.15 * span)
    flagged = scores > thresholds
    if flagged.any():
        ax1.plot(t[flagged], np.full(flagged.sum(), ax1.get_ylim()[0]), "|", color="C1", ms=8,
                 label=f"flagged ({flagged.sum()})", clip_on=False)
    ax1.set_ylabel("anomaly score")
    ax1.set_xlabel("test time point")
    ax1.legend(loc="upper right")
    ax0.set_title(f"{ent.name}: anomaly scores (shaded: labelled anomalies)")
    save_figure(fig, path)


def predicted_segments(ent: Entity, scores: np.ndarray, pred: np.ndarray, naming: np.ndarray | None,
                       named: np.ndarray | None = None) -> pd.DataFrame | None:
    """One row per run of flagged points: where, how high, and the 3 features that name it
    (scoring.top_features of Scorer.explain's weights summed over the run's named points, the
    `named` rows, with their shares of that total); None without contributions."""
    if naming is None:
        return None
    rows = []
    for s, e in segments(pred):
        at = np.arange(s, e) if named is None else named[(named >= s) & (named < e)]
        top = scoring.top_features(naming[at if len(at) else np.arange(s, e)], ent.features, 3)
        rows.append({"start": int(s), "end": int(e - 1), "start_time": ent.test_ts[s], "end_time": ent.test_ts[e - 1],
                     "max_score": float(scores[s:e].max()),
                     "top_features": ";".join(name for name, _ in top),
                     "top_shares": ";".join(f"{share:.2f}" for _, share in top)})
    return pd.DataFrame(rows, columns=["start", "end", "start_time", "end_time", "max_score", "top_features",
                                       "top_shares"])


def plot_contributions(path: Path, ent: Entity, scores: np.ndarray, thresholds: np.ndarray, contrib: np.ndarray,
                       naming: np.ndarray, segs: pd.DataFrame, max_segments: int = 6, n_features: int = 8,
                       pad: int = 30) -> None:
    """For the max_segments predicted segments with the highest scores: the score beside a heatmap
    of the features' named contributions over time (each over its usual level, scoring.named, log
    colour scale) for the n_features that name that segment (scoring.explain's weights, the
    segment table's order), pad points either side; labelled anomalies shaded."""
    top = segs.sort_values("max_score", ascending=False).head(max_segments).sort_values("start")
    fig, axes = plt.subplots(2, len(top), figsize=(4.2 * len(top), 5.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2]})
    for j, (_, seg) in enumerate(top.iterrows()):
        a, b = max(int(seg.start) - pad, 0), min(int(seg.end) + pad + 1, len(scores))
        t = np.arange(a, b)
        ax0, ax1 = axes[0, j], axes[1, j]
        ax0.plot(t, scores[a:b], color="k", lw=0.8)
        ax0.plot(t, thresholds[a:b], color="r", ls="--", lw=0.8)
        threshold = float(np.min(thresholds[a:b]))
        if np.max(scores[a:b]) > 100 * max(threshold, 1e-9):
            ax0.set_yscale("symlog", linthresh=max(threshold / 10, 1e-9))
        if ent.labels is not None:
            ax0.fill_between(t, 0, 1, where=ent.labels[a:b] > 0, color="red", alpha=0.15,
                             transform=ax0.get_xaxis_transform(), lw=0)
        ax0.set_title(f"rows {int(seg.start)}-{int(seg.end)}", fontsize=9)
        feats = np.argsort(-naming[int(seg.start):int(seg.end) + 1].sum(0), kind="stable")[:n_features]
        img = np.log10(1 + contrib[a:b, feats].T)
        ax1.imshow(img, aspect="auto", cmap="magma", interpolation="nearest", extent=(a - 0.5, b - 0.5, len(feats) - 0.5, -0.5))
        ax1.set_yticks(range(len(feats)), [ent.features[i][:22] for i in feats], fontsize=8)
        ax1.axvspan(int(seg.start) - 0.5, int(seg.end) + 0.5, fill=False, ec="cyan", lw=1)
        ax1.set_xlabel("test row", fontsize=8)
    axes[0, 0].set_ylabel("score")
    axes[1, 0].set_ylabel("log10(1 + contribution / usual)")
    fig.suptitle(f"{ent.name}: which features make each flagged segment anomalous "
                 f"({len(top)} of {len(segs)} segments, highest scores)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_metrics(path: Path, results: dict) -> None:
    mean = results["mean"]
    keys = [k for k in SHOWN_METRICS if isinstance(mean.get(k), float) and np.isfinite(mean[k])]
    fig, ax = plt.subplots(figsize=(10, 4))
    bars = ax.bar(keys, [mean[k] for k in keys], color=["C0"] * (len(keys) - 2) + ["C7", "C7"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"mean over {mean.get('n_entities', 0)} entities (grey: point-adjusted)")
    plt.setp(ax.get_xticklabels(), rotation=20)
    save_figure(fig, path)


def plot_transport(path: Path, plans: list[np.ndarray], labels: list[np.ndarray | None], n_global: int,
                   before: list[np.ndarray] | None = None, local_used: list[np.ndarray] | None = None) -> None:
    """The paper's figure 5: mean transport weight per prototype, normal vs anomalous windows.
    With `before` (adapted entities under --local_score=closer), two panels: the plan without the
    local prototypes (before adaptation) above the adapted one, whose title gives the share of
    normal and anomalous points that the local prototypes reconstruct (local_used). An entity
    without local prototypes has no weight on them."""
    lab = np.concatenate([l if l is not None else np.zeros(len(p), int) for p, l in zip(plans, labels)])
    k = max(p.shape[1] for p in plans)
    stack = lambda ps: np.concatenate([np.pad(p, ((0, 0), (0, k - p.shape[1]))) for p in ps])  # noqa: E731
    after = stack(plans)
    panels = [(after, "transport plan per prototype (g: global, l: local)")]
    if before is not None:
        title = "after adaptation: global + local prototypes"
        if local_used is not None:
            used = np.concatenate(local_used)
            title += f"; local prototypes reconstruct {used[lab == 0].mean():.0%} of normal"
            title += f", {used[lab == 1].mean():.0%} of anomalous points" if (lab == 1).any() else " points"
        panels = [(stack(before), "before adaptation: global prototypes only"), (after, title)]
    names = [f"g{i}" for i in range(n_global)] + [f"l{i}" for i in range(k - n_global)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4 * len(panels)), sharex=True, squeeze=False)
    x = np.arange(k)
    for ax, (p, title) in zip(axes[:, 0], panels):
        ax.bar(x - 0.2, p[lab == 0].mean(0), 0.4, label=f"normal ({(lab == 0).sum()})")
        if (lab == 1).any():
            ax.bar(x + 0.2, p[lab == 1].mean(0), 0.4, label=f"anomalous ({(lab == 1).sum()})")
        ax.set_xticks(x, names)
        ax.set_ylabel("mean transport weight")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parsed = cli(argv, description=__doc__, show=False, reads=READS)
    return evaluate_checkpoint(parsed.cfg, parsed.given)


def evaluate_checkpoint(cfg: Config, given: set[str] = frozenset()) -> dict:
    """Evaluate cfg.ckpt (what `python test.py` runs; meta_eval.py calls it with Config objects):
    the model fields are the checkpoint's, --data and --entities default to its training data
    unless given (puad.run_config)."""
    t0 = time.time()
    ckpt = read_checkpoint(cfg.ckpt)
    cfg = run_config(cfg, ckpt, given)
    print_config(cfg)
    set_threads(cfg.num_threads)
    model, _ = build_model(ckpt, get_device(cfg.device))
    try:  # one run per --out_dir: two would mix their files; its outputs replace the last run's together
        with output_lock(Path(cfg.out_dir) / ".test.lock"), run_outputs(cfg.out_dir, ".test") as staged:
            return evaluate_all(cfg, ckpt, model, t0, staged)
    except LockError as e:
        raise SystemExit(f"test.py: error: {e}") from None
    except OSError as e:  # a full disk: the last run's outputs stay as they were
        raise SystemExit(f"test.py: error: cannot write the outputs in {cfg.out_dir} ({e.strerror or e})") from None


def evaluate_entity(cfg: Config, ckpt: dict, model, ent: Entity, out: Path,
                    elsewhere: np.ndarray | None = None) -> tuple[dict, dict]:
    """One entity: scores, threshold, metrics (labels read only now), its outputs in `out`, its
    result line; for an entity without labelled anomalies, the preview of the alarms it would
    raise (preview_lines); a warning when the threshold is extrapolated (puad.history_warning)
    -> (its metrics, score_entity's result)."""
    r = score_entity(model, ckpt, cfg, ent)
    step = time_step([ent])
    m = evaluate(r["test_scores"], r["threshold"], ent.labels, ent.faults, step_s=step, hold=cfg.alarm_hold,
                 clear=cfg.alarm_clear, elsewhere=elsewhere)
    m.update(threshold=r["scorer"].threshold_,  # the fitted one; threshold_max: the drift guard's highest
             threshold_method="spot", local_prototypes=r["use_local"], smooth=cfg.smooth, alarm_hold=cfg.alarm_hold,
             alarm_clear=cfg.alarm_clear, calibration_rows=r["scorer"].n_rows_)
    local_used = r["rec"].local_used
    if r["use_local"]:  # which points the local prototypes reconstruct (where closer)
        m.update(local_share=float(local_used.mean()))
        if ent.labels is not None and ent.labels.any():
            m.update(local_share_anomalous=float(local_used[ent.labels.astype(bool)].mean()),
                     local_share_normal=float(local_used[~ent.labels.astype(bool)].mean()))
    if ent.interpretation is not None:  # which metrics: HitRate of what names features
        segs = interpretation_segments(ent, ent.features)
        m.update(interpretation_metrics(r["naming"], segs, weights=sample_weights(len(r["test_scores"]), segs, scoring.NAMED_PER_SEGMENT)))
    pred = (r["test_scores"] > r["threshold"]).astype(int)
    write_csv_atomic(out / f"scores_{ent.name}.csv", scores_frame(ent, r["test_scores"], r["threshold"]))
    segs = predicted_segments(ent, r["test_scores"], pred, r["naming"], r["named"])
    if segs is not None:
        write_csv_atomic(out / f"segments_{ent.name}.csv", segs)
    if cfg.plots:
        scaled = (ent.test - ent.test.min(0)) / np.maximum(np.ptp(ent.test, 0), 1e-12)  # display only
        plot_scores(out / f"anomaly_scores_{ent.name}.png", ent, scaled, r["test_scores"], r["threshold"])
        if segs is not None and len(segs):
            plot_contributions(out / f"contributions_{ent.name}.png", ent, r["test_scores"], r["threshold"],
                               r["contrib"], r["naming"], segs)
    line = f"{ent.name}: threshold {m['threshold']:.4g}, {m['n_predicted']} of {m['n_points']} points flagged"
    if "f1" in m:
        line += (f" | AUC-ROC {m['auc_roc']:.3f} AUC-PR {m['auc_pr']:.3f} F1 {m['f1']:.3f} "
                 f"best-F1(oracle) {m['best_f1_oracle']:.3f} | F1-PA {m['f1_pa']:.3f} | {alerts_text(m)}")
    print(line, flush=True)
    warning = history_warning(r["scorer"], step, cfg.val_frac)
    if warning:
        print(f"WARNING: {ent.name}: {warning}", flush=True)
    if ent.labels is None or not ent.labels.any():  # recent normal data: what it would page
        print("\n".join(preview_lines(ent, pred, segs, cfg.alarm_hold, cfg.alarm_clear, step)), flush=True)
    return m, r


def evaluate_all(cfg: Config, ckpt: dict, model, t0: float, out: Path | None = None) -> dict:
    """Score, threshold and evaluate every entity (evaluate_entity); write the outputs to `out`
    (default cfg.out_dir; evaluate_checkpoint gives utils.run_outputs' staging folder, moved to
    cfg.out_dir at the end)."""
    names = [cfg.entity] if cfg.entity else cfg.entities
    try:
        entities = load_dataset(cfg.data, names if names != "all" else "all", min_rows=cfg.seq_len)
    except DataError as e:
        raise SystemExit(f"test.py: error: {e}") from None
    out = Path(out or cfg.out_dir)
    per_entity, plans, plan_labels, plans_before, local_used_all = {}, [], [], [], []
    tested = [e for e in entities if e.test is not None]  # false alarms during another entity's fault
    elsewhere = elsewhere_masks({e.name: (e.test_ts, e.labels) for e in tested}, time_step(tested))
    for ent in entities:
        if ent.test is None:
            log.warning("%s: no test.csv; skipped", ent.name)
            continue
        try:
            ent = align_features(ent, ckpt["features"], f"{cfg.data}/{ent.name}")
        except DataError as e:
            raise SystemExit(f"test.py: error: {e}") from None
        per_entity[ent.name], r = evaluate_entity(cfg, ckpt, model, ent, out, elsewhere.get(ent.name))
        plans.append(r["rec"].plan)
        plan_labels.append(ent.labels)
        # the plan before adaptation: None for an adapted entity under --local_score=always
        plans_before.append(r["rec"].plan_global if r["use_local"] else r["rec"].plan)
        local_used_all.append(r["rec"].local_used)
    if not per_entity:
        raise SystemExit(f"test.py: error: {cfg.data}: no entity with a test.csv")
    results = summarize(per_entity)
    results.update(checkpoint=str(cfg.ckpt), data=str(cfg.data), threshold_method="spot", score_mode=cfg.score_mode,
                   spot_q=cfg.spot_q, spot_level=cfg.spot_level, seconds=round(time.time() - t0, 2),
                   config=dataclasses.asdict(cfg))
    if all(per_entity[e].get("note") for e in per_entity):
        results["note"] = "no labels: scores and predictions written; metrics need labels"
        print(results["note"])
    write_json_atomic(out / "metrics.json", results)
    if cfg.plots:
        if "auc_pr" in results["mean"]:
            plot_metrics(out / "evaluation_metrics.png", results)
        # before/after panels when some entity is adapted and every adapted one has its plan before
        adapted = any(m["local_prototypes"] for m in per_entity.values()) and all(p is not None for p in plans_before)
        plot_transport(out / "transport_plan.png", plans, plan_labels, cfg.n_global,
                       plans_before if adapted else None, local_used_all if adapted else None)
    mean = results["mean"]
    if "f1" in mean:
        print(f"mean over {len(per_entity)} entities: AUC-ROC {mean['auc_roc']:.3f} AUC-PR {mean['auc_pr']:.3f} "
              f"VUS-PR {mean.get('vus_pr', float('nan')):.3f} F1 {mean['f1']:.3f} "
              f"best-F1(oracle) {mean['best_f1_oracle']:.3f} | point-adjusted: F1-PA {mean['f1_pa']:.3f} "
              f"best-F1-PA(oracle) {mean['best_f1_pa_oracle']:.3f}")
        total = results["total"]
        print(f"alerts over {len(per_entity)} entities: {alerts_text(dict(total, n_points=sum(m['n_points'] for m in per_entity.values())))}")
    print(f"wrote {cfg.out_dir}/metrics.json in {results['seconds']:.1f}s")
    return results


if __name__ == "__main__":
    main()
