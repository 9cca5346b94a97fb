"""The local chaos lab (lab.py): a short real run, and the committed dataset Dataset/lab."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from faultlog import read_fault_log
from prometheus import parse_step
from utils import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "Dataset" / "lab"
SERVICES = ["front-end", "catalogue", "payment"]
MISSING = [b for b in ("prometheus", "prometheus-node-exporter", "stress-ng") if shutil.which(b) is None]


def expected_labels(timestamps, faults, entity, scope, margin=0.0):
    """Labels the lab's export must give one entity: 1 inside [start - margin, end + margin]
    of every fault in the entity's scope."""
    labels = np.zeros(len(timestamps), dtype=int)
    for f in faults:
        if scope == "all" or f["target"] == entity or (scope == "target+front-end" and entity == "front-end"):
            labels |= (timestamps >= f["start"] - margin) & (timestamps <= f["end"] + margin)
    return labels


def check_labels(folder, faults, scope, margin=0.0):
    """Labels = fault log within scope; every logged fault window has labelled points in each
    entity it scopes."""
    for entity in SERVICES:
        lab = pd.read_csv(folder / entity / "test_label.csv")
        ts = lab["timestamp"].to_numpy()
        want = expected_labels(ts, faults, entity, scope, margin)
        bad = ts[want != lab["label"].to_numpy()]
        assert len(bad) == 0, f"{entity}: labels disagree with the fault log at {bad[:5]}"
        for f in faults:
            if expected_labels(np.array([f["start"]]), [f], entity, scope).any():
                inside = (ts >= f["start"]) & (ts <= f["end"])
                assert lab["label"].to_numpy()[inside].sum() > 0, f"{entity}: no labels for {f['name']}"
                assert all(f["kind"] in str(k) for k in lab["fault"].to_numpy()[inside])


def window(frame, fault, after=0, tail=0):
    return frame[(frame["timestamp"] >= fault["start"] + after) & (frame["timestamp"] <= fault["end"] + tail)]


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (apt-get install prometheus "
                    "prometheus-node-exporter stress-ng)")
def test_short_lab_run(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    command = [sys.executable, str(ROOT / "lab.py"), "--ci", f"--out={out}", f"--run_dir={run_dir}",
               "--no_progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # lab.py stops its processes on SIGTERM
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"lab.py --ci took longer than 240 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((out / "lab_run.json").read_text())

    # every process the lab started is gone (by pid, and nothing left in their process groups)
    assert summary["stopped"] and len(summary["pids"]) >= 7  # 3 services, loadgen, node_exporter, prometheus, stress-ng
    for pid in summary["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    left = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[2]) in summary["pids"]:
            left.append(name)
    assert not left, f"processes left in the lab's process groups: {left}"

    # every target was scraped before the faults
    assert all(summary["up_before_faults"].get(name) == 1 for name in SERVICES + ["node"]), summary["up_before_faults"]

    # the fault log: one CPU fault and one pause, on catalogue, inside the test period
    faults = read_fault_log(out / "faults.csv")
    assert [(f["kind"], f["target"]) for f in faults] == [("cpu-stress", "catalogue"), ("pod-failure", "catalogue")]
    times = summary["times"]
    assert all(times["train_end"] <= f["start"] <= f["end"] <= times["end"] for f in faults)

    # the project's loader reads it; one entity per service, same columns
    entities = {e.name: e for e in load_dataset(out)}
    assert sorted(entities) == sorted(SERVICES)
    assert all(len(e.train) >= 15 and len(e.test) >= 25 for e in entities.values())

    cpu_fault, pause = faults
    rate_window = parse_step(summary["rate_window"])
    catalogue = pd.read_csv(out / "catalogue" / "test.csv")
    catalogue_train = pd.read_csv(out / "catalogue" / "train.csv")
    front = pd.read_csv(out / "front-end" / "test.csv")
    front_train = pd.read_csv(out / "front-end" / "train.csv")

    # CPU fault: the catalogue pod's CPU rate rises (stress-ng shares its core and its pod)
    during = window(catalogue, cpu_fault, after=2)["cpu_rate"]
    baseline = catalogue_train["cpu_rate"].median()
    assert during.max() > baseline + 0.2, f"cpu_rate {during.max():.3f} vs train median {baseline:.3f}"

    # pause: missed scrapes of catalogue, and the front end sees errors or slow answers
    assert (window(catalogue, pause)["up"] == 0).any(), "no failed scrape of the paused catalogue"
    front_pause = window(front, pause, tail=rate_window)
    assert (front_pause["error_rate"].max() > front_train["error_rate"].max() + 0.1
            or front_pause["latency_p99"].max() > 2 * front_train["latency_p99"].max()), \
        "the front end shows no sign of the paused catalogue"

    # labels line up with the fault log (front-end is labelled by faults on catalogue too)
    check_labels(out, faults, summary["args"]["label_scope"], summary["args"]["label_margin"])
    payment = pd.read_csv(out / "payment" / "test_label.csv")
    assert payment["label"].sum() == 0


@pytest.mark.skipif(not (DATASET / "faults.csv").is_file(), reason="Dataset/lab has not been recorded")
def test_committed_dataset_matches_its_fault_log():
    entities = load_dataset(DATASET)
    assert sorted(e.name for e in entities) == sorted(SERVICES)
    run = json.loads((DATASET / "lab_run.json").read_text())
    faults = read_fault_log(DATASET / "faults.csv")
    assert {f["kind"] for f in faults} == {"cpu-stress", "memory-stress", "pod-failure", "network-delay"}
    assert {f["target"] for f in faults} == {"catalogue", "payment"}
    for e in entities:
        assert len(e.train) + len(e.test) >= 1000 and e.labels.sum() > 0
        assert e.train_ts.max() < e.test_ts.min() <= min(f["start"] for f in faults)
    check_labels(DATASET, faults, run["args"]["label_scope"], run["args"]["label_margin"])


@pytest.mark.skipif(not (DATASET / "faults.csv").is_file(), reason="Dataset/lab has not been recorded")
def test_committed_interpretation_labels(tmp_path):
    """Dataset/lab/<target>/interpretation.csv: loads through utils, names only dataset
    columns, lies on rows labelled with its fault's kind, and is what
    `export_metrics.py --interpretation_only` makes from faults.csv and labshop/metrics-lab.yaml."""
    from export_metrics import write_interpretation
    from utils import interpretation_segments
    faults = read_fault_log(DATASET / "faults.csv")
    by_name = {e.name: e for e in load_dataset(DATASET)}
    assert by_name["front-end"].interpretation is None  # labelled by scope only
    for name in ("catalogue", "payment"):
        ent = by_name[name]
        assert len(ent.interpretation) == sum(f["target"] == name for f in faults)
        assert len(interpretation_segments(ent)) == len(ent.interpretation)
        for start, end, features in ent.interpretation:
            assert set(features) <= set(ent.features)
            assert ent.labels[start:end + 1].all()
            assert len(set(ent.faults[start:end + 1])) == 1
        for entity in SERVICES:
            (tmp_path / entity).mkdir(exist_ok=True)
            shutil.copy(DATASET / entity / "test_label.csv", tmp_path / entity)
    write_interpretation(tmp_path, ROOT / "labshop" / "metrics-lab.yaml", DATASET / "faults.csv")
    for name in ("catalogue", "payment"):
        assert (tmp_path / name / "interpretation.csv").read_text() == \
            (DATASET / name / "interpretation.csv").read_text()
