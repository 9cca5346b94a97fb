"""compare.py: two metrics.json paired by entity (fast: no data, no training)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _write(path, ents: dict) -> str:
    path.write_text(json.dumps({"entities": ents, "mean": {}}))
    return str(path)


def test_compare_pairs_entities_and_says_when_it_cannot_tell(tmp_path):
    a = {f"e{i}": {"auc_pr": 0.5 + 0.01 * i, "f1": 0.4} for i in range(8)}
    b = {f"e{i}": {"auc_pr": 0.3 + 0.01 * i, "f1": 0.4 + (0.05 if i % 2 else -0.05)} for i in range(8)}
    b["only_in_b"] = {"auc_pr": 0.0, "f1": 0.0}  # not paired, so not counted
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b" / "metrics.json", b)  # a folder holding a metrics.json is read too
    r = _run(_write(tmp_path / "a.json", a), str(tmp_path / "b"), "--metrics=auc_pr,f1,hitrate_150")
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and "metric" not in line}
    # auc_pr: A is 0.2 higher on every entity, so the interval is [+0.2, +0.2] and 8 / 0
    assert rows["auc_pr"][0] == "8" and rows["auc_pr"][3] == "+0.200"
    assert rows["auc_pr"][4] == "[+0.200, +0.200]" and rows["auc_pr"][5] == "8 / 0"
    # f1: level on average, half higher and half lower: the interval straddles 0
    lo, hi = (float(v) for v in rows["f1"][4].strip("[]").split(","))
    assert lo < 0 < hi and rows["f1"][5] == "4 / 4"
    assert rows["hitrate_150"][1] == "n/a"


def test_compare_bad_input_is_one_line_naming_the_file(tmp_path):
    good = _write(tmp_path / "good.json", {"e": {"auc_pr": 0.5}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = _write(tmp_path / "other.json", {"x": {"auc_pr": 0.5}})
    for args, words in (((str(bad), good), [str(bad), "JSON"]),
                        ((good, str(tmp_path / "missing.json")), ["missing.json", "no such file"]),
                        ((good, _write(tmp_path / "empty.json", {})), ["empty.json", "entities"]),
                        ((good, other), ["no entity in common"])):
        r = _run(*args)
        assert r.returncode == 2
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_compare_averages_runs_joined_by_commas(tmp_path):
    s0 = _write(tmp_path / "s0.json", {"e1": {"auc_pr": 0.4}, "e2": {"auc_pr": 0.6}})
    s1 = _write(tmp_path / "s1.json", {"e1": {"auc_pr": 0.6}, "e2": {"auc_pr": float("nan")}})
    b = _write(tmp_path / "b.json", {"e1": {"auc_pr": 0.5}, "e2": {"auc_pr": 0.5}})
    r = _run(f"{s0},{s1}", b, "--metrics=auc_pr")
    assert r.returncode == 0, r.stderr
    row = [c.strip() for c in r.stdout.splitlines()[-1].split("|")[1:-1]]
    # e1: mean of 0.4 and 0.6 = 0.5 (level with B); e2: 0.6 (the NaN run left out), 0.1 above B
    assert row[:5] == ["auc_pr", "2", "0.550", "0.500", "+0.050"] and row[6] == "1 / 0"


def test_results_table_sums_alerts_and_knapsacks_the_oracle_ceiling(tmp_path):
    """--table: one row per run, the alert figures summed over its entities, and the oracle
    ceiling from the entities' frontiers: two one-day entities may spend 2 false alarm events
    together, so a's (1, 2) and b's (1, 1) fit, b's (3, 2) does not."""
    ent = dict(auc_pr=0.5, f1=0.4, false_alarm_events=1, fault_events=2, faults_caught=1, days=1.0, n_points=1440,
               delay_steps=1.0, normal_flagged=0.01)
    a = dict(ent, alert_frontier_oracle=[[0, 0], [1, 2]])
    b = dict(ent, alert_frontier_oracle=[[0, 0], [1, 1], [3, 2]])
    r = _run("--table", _write(tmp_path / "run.json", {"a": a, "b": b}))
    assert r.returncode == 0, r.stderr
    head, _, row = r.stdout.strip().splitlines()
    cells = dict(zip([c.strip() for c in head.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["false alarms / entity-day"] == "1.00" and cells["faults caught"] == "2 / 4"
    assert cells["caught at 1 false alarm / entity-day (oracle)"] == "3 / 4"
    assert cells["AUC-PR"] == "0.500"


def test_table_counts_fault_kinds_and_the_resource_ceiling(tmp_path):
    """--table prints a per-kind table where the runs' labels name fault kinds: each kind's caught
    / events summed over entities, the resource kinds together (cpu_*, network_* but not exception)
    and their oracle ceiling knapsacked over the entities' resource frontiers (a's (1, 1) and b's
    (1, 1) fit two one-day entities' budget of 2, a's (4, 2) does not); no kinds, no second table."""
    ent = dict(auc_pr=0.5, f1=0.4, false_alarm_events=1, fault_events=3, faults_caught=2, days=1.0, n_points=1440,
               alert_frontier_oracle=[[0, 0], [1, 2]])
    a = dict(ent, per_fault_events={"cpu_contention": {"events": 1, "caught": 1},
                                    "network_delay": {"events": 1, "caught": 0},
                                    "exception": {"events": 1, "caught": 1}},
             alert_frontier_resource_oracle=[[0, 0], [1, 1], [4, 2]])
    b = dict(ent, per_fault_events={"network_delay": {"events": 2, "caught": 1},
                                    "exception": {"events": 1, "caught": 1}},
             alert_frontier_resource_oracle=[[0, 0], [1, 1]])
    r = _run("--table", _write(tmp_path / "run.json", {"a": a, "b": b}))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "Fault events caught per kind:" in lines
    head, row = lines[-3], lines[-1]
    cells = dict(zip([c.strip() for c in head.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["cpu_contention"] == "1/1" and cells["network_delay"] == "1/3" and cells["exception"] == "2/2"
    assert cells["resource faults"] == "2/4 (50 %)"
    assert cells["resource faults at 1 false alarm / entity-day (oracle)"] == "2/4"
    plain = {k: v for k, v in ent.items()}
    r = _run("--table", _write(tmp_path / "plain.json", {"a": plain}))
    assert r.returncode == 0 and "per kind" not in r.stdout
