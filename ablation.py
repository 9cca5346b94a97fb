"""Score and threshold ablation: one trained checkpoint, each scoring variant changes one thing.

    python ablation.py --ckpt=checkpoints/asd/puad.ckpt --data=../shared/datasets/ASD

Reconstructs every entity's calibration rows and test split once (puad.calibration_input,
puad.score_series, as test.py), then scores them under each variant of VARIANTS through the
one calibration (scoring.Scorer) and prints a markdown table of the means
over entities: AUC-PR, F1 at the label-free threshold, VUS-PR, point-adjusted F1, and the
share of test points flagged, and the alert figures (alarm events held --alarm_hold points and
cleared after --alarm_clear, as test.py counts them; the default's also under other holds and
clears). Labels are used only for the metrics. Scorer options given on the command line (e.g.
--score_floor=0.2) apply to every row, and the first row is then named for them instead of
"default". Closes with what carries the first row's score over each entity's normal test points
(normal_load: the drift behind false alarms). Writes the table to <out_dir>/ablation.md and every
number to <out_dir>/ablation.json.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

import scoring
from config import SCORES, Config, cli, print_config
from metrics import evaluate, oracle_alert_ceiling, percentile_threshold, spot_threshold, summarize
from puad import CalibrationData, build_model, entity_state, fit_scorer, read_checkpoint, reconstruct_entity, run_config
from utils import (DataError, Scaler, align_features, atomic_write, get_device, load_dataset, log, set_threads,
                   time_step, write_json_atomic)

# name -> Config overrides, or an experiment (a function of the calibration input, the test
# reconstruction, the Config and the step: scores and per-point thresholds) for a variant that is
# not an option of the scorer (measured and not kept: docs/decisions.md); the first row is the
# default, each other row changes one thing
Experiment = Callable[..., "tuple[np.ndarray, np.ndarray]"]
VARIANTS: dict[str, dict | Experiment] = {}  # filled below, after the experiments
KEYS = ("auc_pr", "f1", "vus_pr", "f1_pa", "auc_roc", "best_f1_oracle")
SCORER_FIELDS = ("latent_weight", "score_floor", "smooth", "spot_q", "spot_level", "drift_window", "alarm_budget")


def _rescored(scorer: scoring.Scorer, raw_calib: np.ndarray, raw_test: np.ndarray, step_s: float | None,
              smoother) -> tuple[np.ndarray, np.ndarray]:
    """Scores and thresholds of raw point scores under another smoother(raw), the threshold and
    drift guard refitted on the calibration rows' smoothed scores as Scorer.fit does."""
    s_cal, s_test = smoother(raw_calib), smoother(raw_test)
    fitted = copy.copy(scorer)
    fitted.threshold_ = float(spot_threshold(s_cal, scoring.spot_risk(scorer.alarm_budget, scorer.spot_q, step_s),
                                             scorer.spot_level))
    fitted.median_, fitted.recent_ = float(np.median(s_cal)), s_cal[-scorer.drift_window:] if scorer.drift_window else s_cal[:0]
    return s_test, fitted.thresholds(s_test)


def uncapped(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The causal mean without the cap (the default until this change)."""
    scorer = fit_scorer(cfg, calib, step_s)
    return _rescored(scorer, scorer.raw_scores(calib.rows), scorer.raw_scores(test), step_s,
                     lambda r: scoring.smooth(r, cfg.smooth))


def _past_median(history: np.ndarray, a: np.ndarray, window: int) -> np.ndarray:
    """Per column, the median of the `window` rows before each row of `a` (n, V), `history`'s
    rows first (causal; no history: 0 before the first row)."""
    if len(history) == 0:
        history = np.zeros((1, a.shape[1]))
    past = np.concatenate([history, a])
    med = pd.DataFrame(past).rolling(window, min_periods=1).median().to_numpy()
    return med[len(history) - 1:len(past) - 1]


def recentred(window: int) -> Experiment:
    """Each feature's residual centred on its median over the previous `window` points (the
    calibration rows' first) instead of the calibration median: a per-feature drift guard."""
    def run(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
        scorer = fit_scorer(cfg, calib, step_s)
        moved = copy.copy(scorer)
        moved.center_ = _past_median((np.asarray(calib.rows.x, np.float64) - calib.rows.mu)[-window:],
                                     np.asarray(test.x, np.float64) - test.mu, window)
        s = moved.score(test)
        return s, scorer.thresholds(s)
    return run


def percentile99(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The threshold at the 99th percentile of the calibration scores instead of SPOT."""
    scorer = fit_scorer(cfg, calib, step_s)
    s_cal, s = scorer.score(calib.rows), scorer.score(test)
    fitted = copy.copy(scorer)
    fitted.threshold_ = percentile_threshold(s_cal, 99.0)
    return s, fitted.thresholds(s)


def no_const_floor(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """A feature constant over the train series scaled like any other (floor 0.1, not 0.01)."""
    return fit_scorer(cfg, CalibrationData(calib.rows, np.zeros_like(calib.constant), calib.memory, calib.host),
                      step_s), test


def host_scored(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The host-level columns (the checkpoint's host) scored like any other (the default before them)."""
    return fit_scorer(cfg, dataclasses.replace(calib, host=None), step_s), test


def _scored(make):
    def run(calib, test, cfg, step_s):
        scorer, rec = make(calib, test, cfg, step_s)
        s = scorer.score(rec)
        return s, scorer.thresholds(s)
    run.__doc__ = make.__doc__
    return run


def level_floor(rel: float) -> Experiment:
    """Each non-constant feature's residual scale at least `rel` x its level (|median| over the
    train rows, in scaled units: `level`), so a gauge that barely moved in training (memory) is
    not scaled up by its tiny range."""
    def run(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None, level=None):
        scorer = fit_scorer(cfg, calib, step_s)
        floored = copy.copy(scorer)
        floored.scale_ = np.where(calib.constant, scorer.scale_, np.maximum(scorer.scale_, rel * level))
        raw_c = floored.raw_scores(calib.rows)
        return _rescored(floored, raw_c, floored.raw_scores(test), step_s,
                         lambda r: scoring.smooth_scores(r, cfg.smooth, float(raw_c.max()) if len(raw_c) else np.inf))
    run.needs_level = True
    return run


def two_scales(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The larger of the capped mean and the raw point score, each over its median on the
    calibration rows: a short fault's first points keep their own score, a long anomaly the
    mean's; the threshold and drift guard fitted on that score."""
    scorer = fit_scorer(cfg, calib, step_s)
    raw_c = scorer.raw_scores(calib.rows)
    m_mean = max(float(np.median(scoring.smooth_scores(raw_c, cfg.smooth, scorer.cap_))), 1e-12)
    m_raw = max(float(np.median(raw_c)), 1e-12)
    return _rescored(scorer, raw_c, scorer.raw_scores(test), step_s,
                     lambda r: np.maximum(scoring.smooth_scores(r, cfg.smooth, scorer.cap_) / m_mean, r / m_raw))


def two_thresholds(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The capped mean over its threshold or the raw point score over its own (SPOT and the
    drift guard fitted the same way on the calibration rows' raw scores), whichever is larger;
    alarm above 1: every point the default flags is still flagged."""
    scorer = fit_scorer(cfg, calib, step_s)
    s_mean = scorer.score(test)
    raw, thr_raw = _rescored(scorer, scorer.raw_scores(calib.rows), scorer.raw_scores(test), step_s, lambda r: r)
    s = np.maximum(s_mean / scorer.thresholds(s_mean), raw / np.maximum(thr_raw, 1e-12))
    return s, np.ones_like(s)


def feature_guard(window: int) -> Experiment:
    """A drift guard per feature: each feature's normalised residual z divided by max(1, its
    median |z| over the previous `window` points, the calibration rows' first), so a feature
    that has sat far from its calibration level for most of the window no longer drowns the
    others; the latent term as it is."""
    def run(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
        scorer = fit_scorer(cfg, calib, step_s)
        z = lambda rec: (np.asarray(rec.x, np.float64) - rec.mu - scorer.center_) / scorer.scale_  # noqa: E731
        z_test = z(test)
        level = _past_median(np.abs(z(calib.rows))[-window:], np.abs(z_test), window)
        c = np.minimum((z_test / np.maximum(level, 1.0)) ** 2, scoring.MAX_CONTRIBUTION)
        s = scoring.smooth_scores(c.mean(-1) + scorer.latent_term(test.theta0), cfg.smooth, scorer.cap_)
        return s, scorer.thresholds(s)
    return run


def spread_guard(calib: CalibrationData, test: scoring.Reconstruction, cfg: Config, step_s: float | None):
    """The drift guard that also follows the scores' spread: the threshold's margin over the
    calibration median grows with the median absolute deviation of the previous drift_window
    scores over the calibration rows' (never shrinks)."""
    scorer = fit_scorer(cfg, calib, step_s)
    s = scorer.score(test)
    w = cfg.drift_window
    if w <= 0 or len(scorer.recent_) == 0:
        return s, scorer.thresholds(s)
    mad = lambda a: float(np.median(np.abs(a - np.median(a))))  # noqa: E731
    past = pd.Series(np.concatenate([scorer.recent_, s]))
    mads = past.rolling(w, min_periods=1).apply(mad, raw=True).to_numpy()[len(scorer.recent_) - 1:len(past) - 1]
    grow = np.maximum(mads / max(mad(scorer.recent_), 1e-12) - 1.0, 0.0)
    return s, scorer.thresholds(s) + (scorer.threshold_ - scorer.median_) * grow


VARIANTS.update({
    "default (norm, latent term 0.5, smooth 5 capped, floor 0.1, constant-feature floor 0.01, host-level columns not scored, "
    "SPOT at the alarm budget "
    "(1 a day) or q=1e-2, level 0.98, drift guard 1000)": {},
    "smooth 5 without the cap (the previous default)": uncapped,
    "no smoothing": dict(smooth=1),
    "smooth 3": dict(smooth=3),
    "smooth 10": dict(smooth=10),
    "no latent term": dict(latent_weight=0.0),
    "latent term 1": dict(latent_weight=1.0),
    "floor 0.05": dict(score_floor=0.05),
    "floor 0.2": dict(score_floor=0.2),
    "no constant-feature floor (0.1 for all)": _scored(no_const_floor),
    "host-level columns scored (the previous default)": _scored(host_scored),
    "no alarm budget (SPOT q=1e-2)": dict(alarm_budget=0.0),
    "alarm budget 0.5 a day": dict(alarm_budget=0.5),
    "percentile 99 of the calibration scores": percentile99,
    "no drift guard (the fitted threshold at every point)": dict(drift_window=0),
    "drift guard over 300 points": dict(drift_window=300),
    "each feature's residual centred on its median over the last 300 points": recentred(300),
    "each feature's residual centred on its median over the last 1000 points": recentred(1000),
    "residual scale at least 2 % of the feature's level": level_floor(0.02),
    "residual scale at least 5 % of the feature's level": level_floor(0.05),
    "two time scales: max(capped mean, raw score), each over its calibration median": two_scales,
    "two thresholds: capped mean over its threshold or raw score over its own, the larger": two_thresholds,
    "per-feature drift guard over 100 points (z over its recent median absolute z)": feature_guard(100),
    "per-feature drift guard over 1000 points": feature_guard(1000),
    "drift guard that also follows the scores' spread (MAD)": spread_guard,
})
ALARMS = ((1, 5), (3, 5), (2, 1), (2, 3))  # the default's alert figures under these (hold, clear) (metrics.held_alarms)


def variants(cfg: Config) -> dict[str, dict]:
    """VARIANTS for a run; the first row is named for the run's scorer options where the command
    line changed any (each other row then changes one thing from those)."""
    default = Config()
    changed = [f"{k}={getattr(cfg, k)}" for k in SCORER_FIELDS if getattr(cfg, k) != getattr(default, k)]
    rows = list(VARIANTS.items())
    if changed:
        rows[0] = (f"this run's scorer ({', '.join(changed)})", {})
    return dict(rows)


def normal_load(scorer: scoring.Scorer, calib: CalibrationData, test: scoring.Reconstruction, labels: np.ndarray,
                features: list[str], top: int = 3) -> list[dict]:
    """What carries the test split's score where nothing is labelled: the `top` features by mean
    contribution to the raw point score (c_tv / V) over the test's normal points, each beside its
    mean over the calibration rows, and the latent term the same way (a diagnosis of drift; the
    labels only pick the normal points)."""
    normal = np.asarray(labels) == 0
    c_test, c_cal = scorer.contributions(test)[normal], scorer.contributions(calib.rows)
    v = c_test.shape[1]
    rows = [dict(feature=features[k], test_normal=float(c_test[:, k].mean() / v), calibration=float(c_cal[:, k].mean() / v))
            for k in np.argsort(-c_test.mean(0))[:top]]
    if scorer.latent_ > 0:
        rows.append(dict(feature="(latent term)", test_normal=float(np.mean(scorer.latent_term(test.theta0)[normal])),
                         calibration=float(np.mean(scorer.latent_term(calib.rows.theta0)))))
    return rows


def main(argv: list[str] | None = None) -> dict:
    t0 = time.time()
    parsed = cli(argv, defaults=dict(out_dir="res_hr/ablation"), description=__doc__, show=False,
                 reads=SCORES)
    ckpt = read_checkpoint(parsed.cfg.ckpt)
    cfg = run_config(parsed.cfg, ckpt, parsed.given)  # the model fields are the checkpoint's
    print_config(cfg)
    set_threads(cfg.num_threads)
    model, _ = build_model(ckpt, get_device(cfg.device))
    try:
        entities = load_dataset(cfg.data, cfg.entities, min_rows=cfg.seq_len)
    except DataError as e:
        raise SystemExit(f"ablation.py: error: {e}") from None
    run_variants = variants(cfg)
    per_variant: dict[str, dict] = {name: {} for name in run_variants}
    held: dict[tuple[int, int], dict] = {a: {} for a in ALARMS}
    series, load = [], {}
    for ent in entities:
        if ent.labels is None:
            log.warning("%s: no labels; skipped", ent.name)
            continue
        try:
            ent = align_features(ent, list(ckpt["features"]), f"{cfg.data}/{ent.name}")
        except DataError as e:
            raise SystemExit(f"ablation.py: error: {e}") from None
        r = reconstruct_entity(model, ckpt, cfg, ent)
        calib, test, step = r.calib, r.test, time_step([ent])
        scaler = entity_state(ckpt, cfg.ckpt, ent.name)[1] or Scaler().fit(ent.train)
        level = np.abs(np.median(ent.train, 0)) / scaler.scale
        for name, variant in run_variants.items():
            if callable(variant):
                scores, thr = (variant(calib, test, cfg, step, level=level) if getattr(variant, "needs_level", False)
                               else variant(calib, test, cfg, step))
            else:
                scorer = fit_scorer(dataclasses.replace(cfg, **variant), calib, step)
                scores = scorer.score(test)
                thr = scorer.thresholds(scores)
            per_variant[name][ent.name] = evaluate(scores, thr, ent.labels, ent.faults, step_s=step, hold=cfg.alarm_hold,
                                                   clear=cfg.alarm_clear)
            if name == next(iter(run_variants)):  # the first row: a scorer option set, never an experiment
                series.append((scores, ent.labels, ent.faults, step))
                if calib.rows.mu is not None:
                    load[ent.name] = normal_load(scorer, calib, test, ent.labels, list(ckpt["features"]))
                for h, c in ALARMS:
                    held[h, c][ent.name] = evaluate(scores, thr, ent.labels, ent.faults, step_s=step, hold=h, clear=c)
        print(f"{ent.name} done ({time.time() - t0:.0f}s)", flush=True)
    return write_report(cfg, ckpt, list(run_variants), per_variant, held, series, t0, load)


def write_report(cfg: Config, ckpt: dict, names: list[str], per_variant: dict[str, dict], held: dict[tuple[int, int], dict],
                 series: list, t0: float, load: dict[str, list[dict]] | None = None) -> dict:
    """The variants' and holds' summaries, each variant's oracle alert ceiling (its total's
    caught_at_budget_oracle; the first row's per fault kind too, from its `series`), and the
    table: printed, and written to <out_dir>/ablation.md and ablation.json -> the results."""
    rows, results = [], {}
    for name in names:
        summary = summarize(per_variant[name])
        ceiling = (int(summary["total"]["caught_at_budget_oracle"]), int(summary["total"]["fault_events"]))
        results[name] = dict(mean=summary["mean"], total=summary["total"], entities=per_variant[name],
                             oracle_alert_ceiling=dict(caught=ceiling[0], fault_events=ceiling[1]))
        rows.append(f"| {name} | " + _cells(summary) + f" {ceiling[0]} / {ceiling[1]} |")
    for h, c in ALARMS:
        summary = summarize(held[h, c])
        results[f"default, alarms held {h} steps, cleared after {c}"] = dict(mean=summary["mean"], total=summary["total"])
        rows.append(f"| default, alarms held {h} steps, cleared after {c} (metrics.held_alarms) | " + _cells(summary) + " |")
    caught, total = (results[names[0]]["oracle_alert_ceiling"][k] for k in ("caught", "fault_events"))
    kinds = sorted({str(k) for _, _, faults, _ in series if faults is not None for k in faults if k})
    per_kind = {k: oracle_alert_ceiling(series, kind=k) for k in kinds}
    results["oracle_alert_ceiling"] = dict(caught=caught, fault_events=total,
                                           per_kind={k: dict(caught=c, fault_events=n) for k, (c, n) in per_kind.items()})
    table = ("| variant | AUC-PR | F1 (label-free threshold) | VUS-PR | F1-PA | AUC-ROC | best F1 (oracle) | "
             "normal flagged | false alarms / entity-day | faults caught | caught at 1 false alarm / entity-day (oracle) |\n|"
             + "---|" * 11 + "\n" + "\n".join(rows) + "\n"
             f"\nORACLE: the default's scores catch at most {caught} of {total} fault events at 1 false alarm "
             "event per entity-day, each entity's threshold chosen with the labels (metrics.oracle_alert_ceiling)"
             + ("; each fault kind alone, its thresholds chosen for it: " + ", ".join(
                 f"{k} {c} / {n}" for k, (c, n) in per_kind.items()) if per_kind else "") + ".\n")
    head = (f"{cfg.data}, checkpoint {cfg.ckpt} (best epoch {ckpt.get('epoch', '?')} of {ckpt.get('config', {}).get('epochs', '?')}), "
            f"means over {len(per_variant[names[0]])} entities (alert figures summed over them)\n\n")
    if load:
        table += ("\nWhat carries the first row's raw score over the test's normal points (ablation.normal_load: mean "
                  "contribution, calibration rows' in brackets):\n\n" + "\n".join(
                      f"- {entity}: " + ", ".join(f"{r['feature']} {r['test_normal']:.3g} ({r['calibration']:.3g})" for r in top)
                      for entity, top in load.items()) + "\n")
    print("\n" + head + table)
    out = Path(cfg.out_dir)
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text(head + table))
    write_json_atomic(out / "ablation.json", dict(data=cfg.data, checkpoint=str(cfg.ckpt), variants=results,
                                                  normal_load=load or {}, seconds=round(time.time() - t0, 1)))
    return results


def _cells(summary: dict) -> str:
    mean, tot = summary["mean"], summary["total"]
    fa = tot.get("false_alarms_per_day", float("nan"))
    fa_text = f"{fa:.2f}" if fa == fa else f"{1000 * tot['false_alarm_events'] / max(1, sum(e['n_points'] for e in summary['entities'].values())):.2f} per 1k points"
    return (" | ".join(f"{mean[k]:.3f}" for k in KEYS) + f" | {100 * mean['normal_flagged']:.1f} % | {fa_text} | "
            f"{tot['faults_caught']:.0f} / {tot['fault_events']:.0f} |")


if __name__ == "__main__":
    main()
