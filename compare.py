"""Is one run better than another, or level with it within chance? Two metrics.json, paired by entity.
With --table, the results table of any number of runs instead (docs/results.md's tables).

    python compare.py res_hr/metrics.json res_hr/baselines/ASD/pca/metrics.json
                      [--metrics=auc_pr,f1,vus_pr,f1_pa,hitrate_150] [--boot=10000] [--seed=0]
    python compare.py runs/s0/metrics.json,runs/s1/metrics.json,runs/s2/metrics.json res_hr/baselines/ASD/pca
    python compare.py --table res_hr/nezha res_hr/baselines/nezha_ob/pca res_hr/baselines/nezha_ob/ae

Each argument is a metrics.json written by test.py, baselines.py or meta_eval.py (or the folder
holding one), or several of them joined by commas (runs of one method with different seeds:
each entity's value is then the mean over those runs). For every metric, over the entities both
sides scored: the two means, the mean difference A - B, its 95 % interval from resampling the
entities (metrics.paired_difference), and on how many entities A is higher / lower. An interval
that contains 0 means the data set cannot tell the two apart (on ASD's 12 servers an AUC-PR gap's
interval is about +-0.015 wide: docs/results.md). Prints a markdown table; it reads only the
metrics the runs computed, never labels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from config import cli_error
from metrics import alert_totals, is_num, nanmean_dicts, paired_difference

DEFAULT_METRICS = "auc_pr,f1,vus_pr,f1_pa,auc_roc,hitrate_150"


def read_run(path: str) -> dict[str, dict]:
    """The per-entity metrics of a metrics.json (or of the one in a folder); a one-line error
    naming the file if it is not one."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        cli_error(f"{p}: no such file")
    except (OSError, ValueError) as e:
        cli_error(f"{p}: not a readable JSON file ({e.__class__.__name__})")
    ents = data.get("entities") if isinstance(data, dict) else None
    if not isinstance(ents, dict) or not ents:
        cli_error(f"{p}: no per-entity metrics (an 'entities' object), not a metrics.json of test.py or baselines.py")
    return ents


def read_side(paths: str) -> dict[str, dict]:
    """One side of the comparison: a metrics.json, or several joined by commas, whose per-entity
    numbers are averaged run by run (each entity over the runs that scored it)."""
    runs = [read_run(p) for p in paths.split(",") if p]
    if not runs:
        cli_error(f"no metrics.json given in {paths!r}")
    if len(runs) == 1:
        return runs[0]
    entities = dict.fromkeys(e for r in runs for e in r)
    return {e: nanmean_dicts([r[e] for r in runs if e in r]) for e in entities}


def value(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if is_num(v) else float("nan")


def compare(a: dict[str, dict], b: dict[str, dict], keys: list[str], n_boot: int = 10000,
            seed: int = 0) -> list[dict]:
    """One row per metric: {"metric", **paired_difference} over the common entities ("a" and
    "b": the two means over the entities where both have a value)."""
    common = [e for e in a if e in b]
    return [{"metric": k, **paired_difference([value(a[e], k) for e in common],
                                              [value(b[e], k) for e in common], n_boot, seed)}
            for k in keys]


def table(rows: list[dict], name_a: str, name_b: str) -> str:
    out = [f"A = {name_a}", f"B = {name_b}", "",
           "| metric | entities | A | B | A - B | 95 % interval | A higher / lower |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["n"] == 0:
            out.append(f"| {r['metric']} | 0 | n/a | n/a | n/a | n/a | n/a |")
            continue
        out.append(f"| {r['metric']} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {r['mean']:+.3f} | "
                   f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['higher']} / {r['lower']} |")
    return "\n".join(out)


TABLE = [("auc_roc", "AUC-ROC"), ("auc_pr", "AUC-PR"), ("vus_pr", "VUS-PR"), ("f1", "F1 (label-free)"),
         ("best_f1_oracle", "best F1 (oracle)"), ("f1_pa", "F1-PA"), ("hitrate_150", "HitRate@150%")]


def results_table(paths: list[str]) -> str:
    """One row per run: the means over entities of TABLE's metrics, then the alert figures summed
    over the entities (metrics.alert_totals): false alarm events per entity-day (per 1,000 points
    where the timestamps are row numbers), the share of fault events caught, the median detection
    delay in steps, the share of normal points flagged (means over entities), and the ORACLE
    ceiling: the most fault events caught at 1 false alarm event per entity-day, each entity's
    threshold chosen on its labels (metrics.ceiling_oracle)."""
    out = ["| run | " + " | ".join(name for _, name in TABLE) + " | false alarms / entity-day | faults caught | "
           "delay (steps) | normal flagged | caught at 1 false alarm / entity-day (oracle) |", "|---" * (len(TABLE) + 6) + "|"]
    for path in paths:
        ents = list(read_side(path).values())
        mean = nanmean_dicts(ents)
        tot = alert_totals(ents)
        cells = [f"{mean[k]:.3f}" if is_num(mean.get(k)) and mean[k] == mean[k] else "" for k, _ in TABLE]
        fa = tot.get("false_alarms_per_day", float("nan"))
        if fa == fa:
            fa_text = f"{fa:.2f}"
        elif tot:
            fa_text = f"{1000 * tot['false_alarm_events'] / sum(e.get('n_points', 0) for e in ents):.2f} per 1k points"
        else:
            fa_text = ""
        caught = f"{tot['faults_caught']:.0f} / {tot['fault_events']:.0f}" if tot.get("fault_events") else ""
        delay = f"{mean['delay_steps']:.1f}" if is_num(mean.get("delay_steps")) else ""
        flagged = f"{100 * mean['normal_flagged']:.1f} %" if is_num(mean.get("normal_flagged")) else ""
        ceiling = f"{tot['caught_at_budget_oracle']:.0f} / {tot['fault_events']:.0f}" if "caught_at_budget_oracle" in tot else ""
        out.append(f"| {path} | " + " | ".join(cells) + f" | {fa_text} | {caught} | {delay} | {flagged} | {ceiling} |")
    return "\n".join(out)


def kinds_table(paths: list[str]) -> str:
    """One row per run with fault kinds in its labels: the fault events caught of each kind, the
    resource faults together (metrics.is_resource_fault) and the ORACLE ceiling for them alone
    (the most caught at 1 false alarm event per entity-day, each entity's threshold chosen on its
    labels for the resource faults) -> '' where no run has kinds."""
    totals = {path: alert_totals(list(read_side(path).values())) for path in paths}
    kinds = sorted({k for t in totals.values() for k in t.get("per_fault_events", {})})
    if not kinds:
        return ""
    out = ["| run | " + " | ".join(kinds) + " | resource faults | resource faults at 1 false alarm / entity-day "
           "(oracle) |", "|---" * (len(kinds) + 3) + "|"]
    for path, tot in totals.items():
        per = tot.get("per_fault_events", {})
        cells = [f"{per[k]['caught']}/{per[k]['events']}" if k in per else "" for k in kinds]
        res = tot.get("resource_faults")
        cells.append(f"{res['caught']}/{res['events']} ({100 * res['caught_share']:.0f} %)" if res else "")
        cells.append(f"{tot['resource_caught_at_budget_oracle']:.0f}/{res['events']}"
                     if res and "resource_caught_at_budget_oracle" in tot else "")
        out.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0],
                                 epilog="--table RUN [RUN ...]: the results table of any number of runs instead "
                                        "(metrics.json or their folders; no other option)")
    ap.add_argument("a", help="metrics.json of run A (or its folder; several joined by commas: their mean)")
    ap.add_argument("b", help="metrics.json of run B (the same forms)")
    ap.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated keys (default {DEFAULT_METRICS})")
    ap.add_argument("--boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    if argv is None:
        import sys
        argv = sys.argv[1:]
    if "--table" in argv:
        runs = [a for a in argv if a != "--table"]
        if not runs or any(a.startswith("--") for a in runs):
            cli_error("--table takes one or more metrics.json (or folders), and no other option")
        print(results_table(runs))
        kinds = kinds_table(runs)
        if kinds:
            print("\nFault events caught per kind:\n\n" + kinds)
        return
    args = ap.parse_args(argv)
    if args.boot < 100:
        cli_error(f"--boot must be at least 100, not {args.boot}")
    a, b = read_side(args.a), read_side(args.b)
    if not any(e in b for e in a):
        cli_error(f"{args.a} and {args.b} have no entity in common")
    keys = [k for k in args.metrics.split(",") if k]
    print(table(compare(a, b, keys, args.boot, args.seed), args.a, args.b))


if __name__ == "__main__":
    main()
