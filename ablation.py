"""Score and threshold ablation: one trained checkpoint, each scoring variant changes one thing.

    python ablation.py --ckpt=checkpoints/asd/puad.ckpt --data=../shared/datasets/ASD

Reconstructs every entity's calibration rows and test split once (puad.calibration_input,
puad.score_series, as test.py), then scores them under each variant of VARIANTS through the
one calibration (scoring.calibrate / scoring.apply) and prints a markdown table of the means
over entities: AUC-PR, F1 at the label-free threshold, VUS-PR, point-adjusted F1, and the
share of test points flagged. Labels are used only for the metrics. Scorer options given on the
command line (e.g. --score_floor=0.2) apply to every row, and the first row is then named for
them instead of "default". Writes the table to <out_dir>/ablation.md and every number to
<out_dir>/ablation.json.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

import scoring
from config import Config, cli, print_config
from metrics import evaluate, summarize
from puad import build_model, read_checkpoint, reconstruct_entity, run_config
from utils import (DataError, align_features, atomic_write, get_device, load_dataset, log, set_threads,
                   time_step, write_json_atomic)

# name -> Config overrides; the first row is the default, each other row changes one thing
VARIANTS: dict[str, dict] = {
    "default (norm, latent term 0.5, smooth 5, floor 0.1, constant-feature floor 0.01, SPOT q=1e-2 level 0.98, drift guard 1000)": {},
    "no latent term (the reconstruction alone, the previous default)": dict(latent_weight=0.0),
    "latent term 0.25": dict(latent_weight=0.25),
    "latent term 1": dict(latent_weight=1.0),
    "latent term: the nearest normal window (k=1)": dict(latent_k=1),
    "latent term: the 20 nearest normal windows": dict(latent_k=20),
    "paper's score: NLL with learned sigma, no smoothing": dict(score="nll", smooth=1),
    "fixed-variance squared error (authors' code), no smoothing": dict(score="se", smooth=1),
    "squared error, smooth 5": dict(score="se"),
    "norm, no smoothing": dict(smooth=1),
    "norm, smooth 3": dict(smooth=3),
    "norm, smooth 10": dict(smooth=10),
    "floor 0.05": dict(score_floor=0.05),
    "floor 0.2": dict(score_floor=0.2),
    "no constant-feature floor (0.1 for all)": dict(const_floor=0.1),
    "SPOT q=1e-3, level 0.99 (the previous default)": dict(spot_q=1e-3, spot_level=0.99),
    "percentile 99 of the calibration scores": dict(threshold="percentile", percentile=99.0),
    "no drift guard (the fitted threshold at every point)": dict(drift_window=0),
    "drift guard over 300 points": dict(drift_window=300),
    "drift guard over 3000 points": dict(drift_window=3000),
}
KEYS = ("auc_pr", "f1", "vus_pr", "f1_pa", "auc_roc", "best_f1_oracle")
SCORER_FIELDS = ("score", "latent_weight", "latent_k", "score_floor", "const_floor", "smooth", "threshold",
                 "spot_q", "spot_level", "percentile", "drift_window")


def variants(cfg: Config) -> dict[str, dict]:
    """VARIANTS for a run; the first row is named for the run's scorer options where the command
    line changed any (each other row then changes one thing from those)."""
    default = Config()
    changed = [f"{k}={getattr(cfg, k)}" for k in SCORER_FIELDS if getattr(cfg, k) != getattr(default, k)]
    rows = list(VARIANTS.items())
    if changed:
        rows[0] = (f"this run's scorer ({', '.join(changed)})", {})
    return dict(rows)


def main(argv: list[str] | None = None) -> dict:
    t0 = time.time()
    parsed = cli(argv, defaults=dict(out_dir="res_hr/ablation"), description=__doc__, show=False)
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
    flagged: dict[str, list[float]] = {name: [] for name in run_variants}
    for ent in entities:
        if ent.labels is None:
            log.warning("%s: no labels; skipped", ent.name)
            continue
        try:
            ent = align_features(ent, list(ckpt["features"]), f"{cfg.data}/{ent.name}")
        except DataError as e:
            raise SystemExit(f"ablation.py: error: {e}") from None
        r = reconstruct_entity(model, ckpt, cfg, ent)
        calib, test = r["calib"], r["test"]
        for name, overrides in run_variants.items():
            vcfg = dataclasses.replace(cfg, **overrides)
            cal = scoring.calibrate(calib, vcfg, step_s=time_step([ent]))
            scores, _ = scoring.apply(cal, test)
            thr = scoring.thresholds(cal, scores)
            per_variant[name][ent.name] = evaluate(scores, thr, ent.labels, ent.faults, step_s=time_step([ent]))
            flagged[name].append(float(np.mean(scores > thr)))
        print(f"{ent.name} done ({time.time() - t0:.0f}s)", flush=True)
    rows, results = [], {}
    for name in run_variants:
        mean = summarize(per_variant[name])["mean"]
        results[name] = dict(mean=mean, entities=per_variant[name], flagged=float(np.mean(flagged[name])))
        rows.append(f"| {name} | " + " | ".join(f"{mean[k]:.3f}" for k in KEYS)
                    + f" | {100 * results[name]['flagged']:.1f} % |")
    table = ("| variant | AUC-PR | F1 (label-free threshold) | VUS-PR | F1-PA | AUC-ROC | best F1 (oracle) | flagged |\n"
             "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    head = (f"{cfg.data}, checkpoint {cfg.ckpt} (best epoch {ckpt.get('epoch', '?')} of {ckpt.get('config', {}).get('epochs', '?')}), "
            f"means over {len(per_variant[next(iter(run_variants))])} entities\n\n")
    print("\n" + head + table)
    out = Path(cfg.out_dir)
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text(head + table))
    write_json_atomic(out / "ablation.json", dict(data=cfg.data, checkpoint=str(cfg.ckpt), variants=results,
                                                  seconds=round(time.time() - t0, 1)))
    return results


if __name__ == "__main__":
    main()
