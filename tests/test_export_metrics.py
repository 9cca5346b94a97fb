"""export_metrics.py against a real Prometheus (started here, scraping an exporter this file
runs) and against stand-in HTTP servers for the failure paths."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import export_metrics as em  # noqa: E402

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
needs_prometheus = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason="prometheus is not installed (apt-get install prometheus); CI installs it")

METRIC_SET = {
    "namespace": "lab",
    "services": ["catalogue", "payment"],
    "rate_window": "4s",
    "metrics": {
        "load": 'sum(lab_load{pod=~"$service-.*"})',
        "load_max": {"query": 'lab_load{pod=~"$service-.*"}', "agg": "max"},
        # one series per pod, combined by the default agg (sum)
        "requests_rate": 'rate(lab_requests_total{pod=~"$service-.*"}[$rate_window])',
    },
}
PHASE_A = {"load": {"catalogue-a": 10.0, "catalogue-b": 1.0, "payment-a": 7.0},
           "rate": {"catalogue-a": 3.0, "catalogue-b": 2.0, "payment-a": 1.0}}
PHASE_B = {"load": {"catalogue-a": 20.0, "catalogue-b": 1.0, "payment-a": 7.0},
           "rate": {"catalogue-a": 13.0, "catalogue-b": 2.0, "payment-a": 1.0}}
PHASE_SECONDS = (8, 7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workload:
    """Custom collector: gauges the test sets, counters growing at rates the test sets
    (computed at scrape time, so their rate is exact)."""

    def __init__(self, phase: dict):
        self.lock = threading.Lock()
        self.counts = {pod: 0.0 for pod in phase["rate"]}
        self.since = time.time()
        self.phase = phase

    def set_phase(self, phase: dict) -> None:
        with self.lock:
            now = time.time()
            for pod, rate in self.phase["rate"].items():
                self.counts[pod] += rate * (now - self.since)
            self.since, self.phase = now, phase

    def collect(self):
        with self.lock:
            now = time.time()
            gauge = GaugeMetricFamily("lab_load", "load set by the test", labels=["pod"])
            counter = CounterMetricFamily("lab_requests", "requests", labels=["pod"])
            for pod, value in self.phase["load"].items():
                gauge.add_metric([pod], value)
                counter.add_metric([pod], self.counts[pod] + self.phase["rate"][pod] * (now - self.since))
        yield gauge
        yield counter


def query_now(url: str, query: str) -> list:
    response = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Prometheus scraping the Workload every second through phase A then phase B ->
    dict(url, first, switch, last) with unix seconds of the first scrape, the A->B switch
    and the end of the recording."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("prometheus is not installed (apt-get install prometheus); CI installs it")
    folder = tmp_path_factory.mktemp("prometheus")
    workload = Workload(PHASE_A)
    registry = CollectorRegistry()
    registry.register(workload)
    exporter_port = free_port()
    exporter, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    port = free_port()
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "lab",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }))
    log = open(folder / "prometheus.log", "w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            assert time.time() < deadline, "Prometheus did not scrape the exporter in 30 s"
            try:
                result = query_now(url, 'lab_load{pod="catalogue-a"}')
                if result:
                    first = float(result[0]["value"][0])
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        # the first sample is at most a second old here; phase A runs PHASE_SECONDS[0] from it
        time.sleep(max(0.0, first + PHASE_SECONDS[0] - time.time()))
        switch = time.time()
        workload.set_phase(PHASE_B)
        time.sleep(PHASE_SECONDS[1])
        yield {"url": url, "first": first, "switch": switch, "last": time.time()}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        exporter.shutdown()


def read_dataset(folder: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(folder / f"{name}.csv", keep_default_na=False)
            for name in ("train", "test", "test_label") if (folder / f"{name}.csv").exists()}


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- real Prometheus

@needs_prometheus
def test_export_values_grid_and_rates(lab, tmp_path):
    start, end = math.ceil(lab["first"]), math.floor(lab["last"])
    train_end = math.ceil(lab["switch"])
    summary = em.export(lab["url"], METRIC_SET, start, end, "1s", tmp_path / "out",
                        train_end=train_end, progress=False)
    assert summary["columns"] == ["load", "load_max", "requests_rate"]
    assert no_temp_files(tmp_path)

    for service in ("catalogue", "payment"):
        data = read_dataset(tmp_path / "out" / service)
        assert list(data["train"].columns) == ["timestamp", "load", "load_max", "requests_rate"]
        assert list(data["test"].columns) == list(data["train"].columns)
        assert list(data["test_label"].columns) == ["timestamp", "label", "fault"]
        ts = np.concatenate([data["train"]["timestamp"], data["test"]["timestamp"]])
        assert ts.dtype.kind == "i"
        assert ts[0] == start and ts[-1] == end
        assert (np.diff(ts) == 1).all()  # complete step grid, nothing dropped
        assert (data["train"]["timestamp"] < train_end).all()
        assert (data["test"]["timestamp"] >= train_end).all()
        assert (data["test_label"]["timestamp"] == data["test"]["timestamp"]).all()
        assert (data["test_label"]["label"] == 0).all() and (data["test_label"]["fault"] == "").all()
        assert summary["services"][service]["dropped_rows"] == 0

    frame = pd.concat(read_dataset(tmp_path / "out" / "catalogue")[k] for k in ("train", "test"))
    t = frame["timestamp"]
    switch = lab["switch"]
    # gauges: the value last scraped at each grid time
    assert set(frame["load"]) <= {11.0, 21.0}
    assert (frame.loc[t <= switch - 0.5, "load"] == 11.0).all()
    assert (frame.loc[t >= switch + 1.5, "load"] == 21.0).all()
    assert (frame.loc[t <= switch - 0.5, "load_max"] == 10.0).all()
    assert (frame.loc[t >= switch + 1.5, "load_max"] == 20.0).all()
    # counter rates, where the whole 4 s window lies in one phase (two pods summed)
    in_a = frame[(t >= lab["first"] + 5) & (t <= switch - 0.3)]
    in_b = frame[t >= switch + 5.5]
    assert len(in_a) >= 2 and len(in_b) >= 1
    assert np.allclose(in_a["requests_rate"], 5.0, rtol=0.1)
    assert np.allclose(in_b["requests_rate"], 15.0, rtol=0.1)

    payment = pd.concat(read_dataset(tmp_path / "out" / "payment")[k] for k in ("train", "test"))
    assert (payment["load"] == 7.0).all()
    assert np.allclose(payment.loc[payment["timestamp"] >= lab["first"] + 5, "requests_rate"],
                       1.0, rtol=0.1)


@needs_prometheus
def test_fault_log_labels_through_cli(lab, tmp_path):
    start, end = math.ceil(lab["first"]), math.floor(lab["last"])
    fault_start, fault_end = math.ceil(lab["switch"]) + 1, math.ceil(lab["switch"]) + 2
    assert end >= fault_end + 4
    log = tmp_path / "faults.csv"
    em.append_fault(log, fault_start, fault_end, "cpu-stress", "catalogue", "cpu-stress-catalogue")
    em.append_fault(log, end, end + 100, "network-delay", "payment", "delay")
    metrics = tmp_path / "metrics.yaml"
    metrics.write_text(yaml.safe_dump(METRIC_SET, sort_keys=False))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "export_metrics.py"), "--prometheus", lab["url"],
         "--metrics", str(metrics), "--start", em.format_time(start), "--end", str(end),
         "--step", "1s", "--fault_log", str(log), "--label_margin", "1", "--out", str(out),
         "--no_progress"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "catalogue:" in result.stdout

    # no --train_end: train.csv ends where the first fault (widened by the margin) begins
    split = fault_start - 1
    catalogue = read_dataset(out / "catalogue")
    assert catalogue["train"]["timestamp"].max() == split - 1
    labels = catalogue["test_label"]
    assert labels["timestamp"].min() == split
    inside = (labels["timestamp"] >= fault_start - 1) & (labels["timestamp"] <= fault_end + 1)
    assert (labels["label"] == inside.astype(int)).all()
    assert (labels.loc[inside, "fault"] == "cpu-stress").all()
    assert (labels.loc[~inside, "fault"] == "").all()
    payment = read_dataset(out / "payment")["test_label"]
    assert list(payment.loc[payment["label"] == 1, "fault"].unique()) == ["network-delay"]
    assert payment.loc[payment["label"] == 1, "timestamp"].min() == end - 1

    # label_scope=all: catalogue's fault labels payment too
    em.export(lab["url"], METRIC_SET, start, end, "1s", tmp_path / "all", fault_log=log,
              label_margin=1, label_scope="all", progress=False)
    payment_all = read_dataset(tmp_path / "all" / "payment")["test_label"]
    assert set(payment_all.loc[payment_all["label"] == 1, "fault"]) == {"cpu-stress", "network-delay"}


@needs_prometheus
def test_fetch_window(lab):
    frame = em.fetch_window(lab["url"], METRIC_SET, "catalogue", "now", 5, "1s")
    assert list(frame.columns) == ["timestamp", "load", "load_max", "requests_rate"]
    assert len(frame) == 5 and (np.diff(frame["timestamp"]) == 1).all()
    assert frame["timestamp"].iloc[-1] <= time.time()
    assert (frame["load"] == 21.0).all()


@needs_prometheus
def test_empty_query_is_reported_by_column(lab, tmp_path):
    metric_set = {**METRIC_SET, "metrics": {**METRIC_SET["metrics"],
                                            "ghost": 'sum(no_such_metric{pod=~"$service-.*"})'}}
    metrics = tmp_path / "metrics.yaml"
    metrics.write_text(yaml.safe_dump(metric_set, sort_keys=False))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "export_metrics.py"), "--prometheus", lab["url"],
         "--metrics", str(metrics), "--start", str(math.ceil(lab["first"])),
         "--end", str(math.floor(lab["last"])), "--step", "1s", "--out", str(out)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "export_metrics.py: error:" in result.stderr
    assert "'ghost'" in result.stderr and "no data" in result.stderr
    assert not out.exists()


@needs_prometheus
def test_bad_query_shows_prometheus_error(lab, tmp_path):
    metric_set = {**METRIC_SET, "metrics": {"broken": "sum(rate(lab_load[4s]"}}
    with pytest.raises(em.ExportError, match=r"column 'broken'.*parse error"):
        em.export(lab["url"], metric_set, math.ceil(lab["first"]), math.floor(lab["last"]),
                  "1s", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- stand-in servers

class FakePrometheus:
    """Answers /api/v1/query_range with respond(params) -> (status, body); records params."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def handle_request(self, params):
                fake.requests.append(params)
                status, body = fake.respond(params)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length).decode()
                params = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
                params["authorization"] = self.headers.get("Authorization")
                self.handle_request(params)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def matrix(*series) -> dict:
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"pod": f"p{i}"}, "values": [[t, str(v)] for t, v in s]}
        for i, s in enumerate(series)]}}


def points(params, value, skip=()) -> list:
    start, end, step = int(float(params["start"])), int(float(params["end"])), int(float(params["step"]))
    return [(t, value(t)) for t in range(start, end + step, step) if t not in skip]


def test_retries_server_errors_then_succeeds(tmp_path):
    answers = iter([(500, {"status": "error", "error": "boom"}),
                    (503, {"status": "error", "error": "overloaded"})])

    def respond(params):
        return next(answers, None) or (200, matrix(points(params, lambda t: t % 7)))
    fake = FakePrometheus(respond)
    try:
        metric_set = {"services": ["svc"], "metrics": {"x": "x"}}
        summary = em.export(fake.url, metric_set, 1000, 1100, "10s", tmp_path / "out",
                            backoff=0.01, progress=False, session=em.make_session(token="secret"))
    finally:
        fake.close()
    assert len(fake.requests) == 3
    assert fake.requests[0]["authorization"] == "Bearer secret"
    train = pd.read_csv(tmp_path / "out" / "svc" / "train.csv")
    assert list(train["timestamp"]) == list(range(1000, 1110, 10))
    assert list(train["x"]) == [t % 7 for t in range(1000, 1110, 10)]
    assert summary["services"]["svc"]["train_rows"] == 11
    assert not (tmp_path / "out" / "svc" / "test.csv").exists()


def test_gives_up_after_retries(tmp_path):
    fake = FakePrometheus(lambda params: (500, {"status": "error", "error": "still broken"}))
    try:
        with pytest.raises(em.ExportError, match=r"HTTP 500.*still broken.*after 3 tries"):
            em.export(fake.url, {"services": ["svc"], "metrics": {"x": "x"}}, 1000, 1100, "10s",
                      tmp_path / "out", retries=2, backoff=0.01, progress=False)
    finally:
        fake.close()
    assert len(fake.requests) == 3
    assert not (tmp_path / "out").exists()


def test_unreachable_prometheus_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "export_metrics.py"), "--prometheus",
         f"http://127.0.0.1:{free_port()}", "--start", "2026-11-24T03:00:00Z",
         "--end", "2026-11-24T05:00:00+01:00", "--retries", "1", "--backoff", "0.05",
         "--out", str(out)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export_metrics.py: error: cannot reach Prometheus at http://127.0.0.1:")
    assert "connection refused" in last and "2 tries" in last
    assert not out.exists()


def test_chunks_multi_series_gaps_and_all_or_nothing(tmp_path):
    start, step, n = 1_000_000, 1, 22_500
    end = start + (n - 1) * step
    short_gap = set(range(start + 100, start + 102))          # 2 steps: interpolated
    long_gap = set(range(start + 20_000, start + 20_010))     # 10 steps: rows dropped
    fail_payment = {"on": False}

    def respond(params):
        query = params["query"]
        if "payment" in query and fail_payment["on"]:
            return 200, matrix()
        if query.startswith("pods"):
            return 200, matrix(points(params, lambda t: 1.0), points(params, lambda t: 2.0),
                               points(params, lambda t: 4.0, skip=range(start, start + 5)))
        return 200, matrix(points(params, lambda t: float(t - start), skip=short_gap | long_gap))
    fake = FakePrometheus(respond)
    metric_set = {"services": ["catalogue", "payment"], "metrics": {
        "summed": 'pods{s="$service"}',
        "maxed": {"query": 'pods{s="$service",copy="1"}', "agg": "max"},
        "ramp": 'ramp{s="$service"}'}}
    try:
        summary = em.export(fake.url, metric_set, start, end, step, tmp_path / "out",
                            train_end=start + 21_000, max_gap=3, progress=False)
        requests_made = list(fake.requests)
        fail_payment["on"] = True
        fake.requests.clear()
        with pytest.raises(em.ExportError, match=r"column 'summed' \(service payment\)"):
            em.export(fake.url, metric_set, start, end, step, tmp_path / "second", progress=False)
    finally:
        fake.close()

    # every request within Prometheus' 11,000-point limit, together covering the grid once
    per_column = {}
    for r in requests_made:
        size = (int(float(r["end"])) - int(float(r["start"]))) // int(float(r["step"])) + 1
        assert size <= em.MAX_POINTS
        per_column.setdefault(r["query"], []).append((int(float(r["start"])), int(float(r["end"]))))
    assert len(per_column) == 6  # three columns, two services
    for ranges in per_column.values():
        assert len(ranges) == 3 and ranges[0][0] == start and ranges[-1][1] == end
        assert all(b[0] == a[1] + step for a, b in zip(ranges, ranges[1:]))

    data = read_dataset(tmp_path / "out" / "catalogue")
    frame = pd.concat([data["train"], data["test"]])
    assert len(frame) == n - len(long_gap)
    assert not frame["timestamp"].isin(list(long_gap)).any()
    assert summary["services"]["catalogue"]["dropped_rows"] == len(long_gap)
    assert any("catalogue/ramp" in w and "10 steps" in w for w in summary["warnings"])
    # series missing at some points are combined from those present
    head = frame.set_index("timestamp")
    assert head.loc[start, "summed"] == 3.0 and head.loc[start + 10, "summed"] == 7.0
    assert head.loc[start, "maxed"] == 2.0 and head.loc[start + 10, "maxed"] == 4.0
    # the 2-step gap is interpolated
    assert np.allclose(head.loc[sorted(short_gap), "ramp"], [100.0, 101.0])
    assert (data["train"]["timestamp"] < start + 21_000).all()

    # the failing second export wrote nothing, not even the services that succeeded
    assert not (tmp_path / "second").exists()
    assert no_temp_files(tmp_path)


# ---------------------------------------------------------------- fault log and helpers

def test_fault_log_round_trip(tmp_path):
    log = tmp_path / "faults.csv"
    em.append_fault(log, "2026-11-24T03:20:00Z", "2026-11-24T04:25:30+01:00", "cpu-stress",
                    "catalogue", "cpu-stress-catalogue")
    log.write_text(log.read_text().rstrip("\n"))  # as if edited by hand
    em.append_fault(log, 1795490400.7, 1795490500, "pod-failure", "payment", "a, b")
    assert log.read_text().splitlines() == [
        "start,end,kind,target,name",
        "2026-11-24T03:20:00Z,2026-11-24T03:25:30Z,cpu-stress,catalogue,cpu-stress-catalogue",
        '2026-11-24T03:20:00Z,2026-11-24T03:21:40Z,pod-failure,payment,"a, b"']
    rows = em.read_fault_log(log)
    assert rows[0] == {"start": 1795490400, "end": 1795490730, "kind": "cpu-stress",
                       "target": "catalogue", "name": "cpu-stress-catalogue"}
    assert rows[1]["name"] == "a, b"
    with pytest.raises(em.ExportError, match="unknown fault kind"):
        em.append_fault(log, 0, 1, "disk-fill", "catalogue", "x")


@pytest.mark.parametrize("text,message", [
    ("begin,end,kind,target,name\n", "header"),
    ("start,end,kind,target,name\n2026-11-24T03:20:00Z,2026-11-24T03:25:00Z,cpu-burn,catalogue,x\n",
     r":2: unknown kind"),
    ("start,end,kind,target,name\n2026-11-24T03:20:00,2026-11-24T03:25:00Z,cpu-stress,catalogue,x\n",
     r":2: time .* has no timezone"),
    ("start,end,kind,target,name\n2026-11-24T03:20:00Z,2026-11-24T03:10:00Z,cpu-stress,catalogue,x\n",
     r":2: end .* before start"),
])
def test_bad_fault_log_is_refused(tmp_path, text, message):
    log = tmp_path / "faults.csv"
    log.write_text(text)
    with pytest.raises(em.ExportError, match=message):
        em.read_fault_log(log)


def test_labels_widen_and_join_overlapping_faults():
    faults = [{"start": 110, "end": 120, "kind": "cpu-stress", "target": "a", "name": "x"},
              {"start": 120, "end": 130, "kind": "network-delay", "target": "a", "name": "y"},
              {"start": 100, "end": 200, "kind": "pod-failure", "target": "b", "name": "z"}]
    labels = em.make_labels(np.arange(100, 145, 5), faults, "a", label_margin=5)
    assert list(labels["label"]) == [0, 1, 1, 1, 1, 1, 1, 1, 0]
    both = "cpu-stress+network-delay"
    assert list(labels["fault"]) == ["", "cpu-stress", "cpu-stress", both, both, both,
                                     "network-delay", "network-delay", ""]
    every = em.make_labels(np.arange(100, 145, 5), faults, "a", label_scope="all")
    assert every["label"].all() and every["fault"].iloc[0] == "pod-failure"


def test_times_and_steps():
    assert em.parse_time("2026-11-24T03:20:00Z") == em.parse_time("2026-11-24T11:20:00+08:00")
    assert em.parse_time("1795490400") == 1795490400.0
    assert em.format_time(1795490400.9) == "2026-11-24T03:20:00Z"
    with pytest.raises(em.ExportError, match="no timezone"):
        em.parse_time("2026-11-24T03:20:00")
    assert em.parse_step("15s") == 15 and em.parse_step("1m") == 60 and em.parse_step(30) == 30
    with pytest.raises(em.ExportError):
        em.parse_step("0.5s")
    assert list(em.grid(1001, 1059, 15)) == [1005, 1020, 1035, 1050]


def test_default_metric_set_loads():
    metric_set = em.load_metric_set(em.DEFAULT_METRIC_SET)
    assert metric_set["namespace"] == "sock-shop" and metric_set["services"] == ["catalogue", "payment"]
    columns = [m["column"] for m in metric_set["metrics"]]
    for wanted in ("cpu_rate", "memory_usage", "net_rx_rate", "net_tx_rate", "threads",
                   "restarts", "node_load1", "request_rate", "error_rate", "latency_p99"):
        assert wanted in columns
    for metric in metric_set["metrics"]:
        query = em.render_query(metric, metric_set, "catalogue")
        assert "$" not in query
        assert "_total" not in query or "rate(" in query or "increase(" in query
    with pytest.raises(em.ExportError, match="bad placeholder"):
        em.load_metric_set({"services": ["a"], "metrics": {"x": "up{pod=\"$servce\"}"}})


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_default_queries_are_valid_promql(tmp_path):
    metric_set = em.load_metric_set(em.DEFAULT_METRIC_SET)
    rules = {"groups": [{"name": "metric-set", "rules": [
        {"record": f"check:{m['column']}", "expr": em.render_query(m, metric_set, "catalogue")}
        for m in metric_set["metrics"]]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- reliability: no lost data, one-line errors

def test_existing_dataset_is_refused_then_replaced_whole(tmp_path, capsys):
    out = tmp_path / "ds"
    for name, text in (("svc/train.csv", "timestamp,x\n" + "1,2\n" * 50), ("svc/test.csv", "timestamp,x\n9,9\n"),
                       ("svc/test_label.csv", "timestamp,label\n9,0\n"), ("old/train.csv", "timestamp,x\n1,1\n")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fake = FakePrometheus(lambda params: (200, matrix(points(params, lambda t: t % 7))))
    metric_set = {"services": ["svc"], "metrics": {"x": "x"}}
    try:
        with pytest.raises(em.ExportError, match=r"ds: not empty.*--overwrite"):
            em.export(fake.url, metric_set, 1000, 1100, "10s", out, progress=False)
        assert not fake.requests  # refused before any query
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        # the CLI says it in one line, exit 1
        ms = tmp_path / "set.yaml"
        ms.write_text(yaml.safe_dump(metric_set))
        assert em.main(["--prometheus", fake.url, "--metrics", str(ms), "--start", "1000", "--end", "1100",
                        "--step", "10s", "--out", str(out), "--no_progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("export_metrics.py: error: --out ")
        summary = em.export(fake.url, metric_set, 1000, 1100, "10s", out, progress=False, overwrite=True)
    finally:
        fake.close()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["svc", "svc/train.csv"]  # replaced whole
    assert len(pd.read_csv(out / "svc" / "train.csv")) == 11
    assert summary["services"]["svc"]["files"] == [str(out / "svc" / "train.csv")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old folder left


def test_millisecond_times_are_refused_with_a_hint():
    with pytest.raises(em.ExportError, match=r"1764000000000 looks like milliseconds.*e\.g\. 1764000000"):
        em.parse_time(1764000000000)
    with pytest.raises(em.ExportError, match="milliseconds"):
        em.parse_time("1764000000000")
    assert em.parse_time("1764000000") == 1764000000.0


def test_huge_grid_is_refused_before_allocating():
    start = 1_699_999_200  # a multiple of 3600
    with pytest.raises(em.ExportError, match=r"94,608,001 grid points.*larger --step \(>= 19s\)"):
        em.grid(start, start + 3 * 365 * 86400, 1)
    assert len(em.grid(start, start + 3 * 365 * 86400, 3600)) == 3 * 365 * 24 + 1


def test_binary_fault_log_is_one_line(tmp_path):
    log = tmp_path / "faults.csv"
    log.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    with pytest.raises(em.ExportError, match=r"faults.csv: not a fault log"):
        em.read_fault_log(log)
    with pytest.raises(em.ExportError, match=r"faults.csv is not a fault log"):
        em.append_fault(log, "2026-11-24T03:20:00Z", "2026-11-24T03:25:00Z", "cpu-stress", "catalogue", "x")


def test_lab_refuses_a_non_empty_out_before_starting(tmp_path):
    import lab
    (tmp_path / "ds" / "svc").mkdir(parents=True)
    (tmp_path / "ds" / "svc" / "train.csv").write_text("timestamp,x\n1,2\n")
    with pytest.raises(em.ExportError, match=r"ds: not empty.*--overwrite"):
        lab.run(["--ci", f"--out={tmp_path / 'ds'}", f"--run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
    assert lab.parse_args(["--overwrite"]).overwrite


# ---------------------------------------------------------------- interpretation labels

@pytest.mark.parametrize("mapping,message", [
    ({"disk-fill": ["x"]}, r"interpretation: unknown fault kind 'disk-fill'"),
    ({"cpu-stress": ["x", "cpu"]}, r"interpretation: cpu-stress: unknown column\(s\) \['cpu'\]"),
    ({"cpu-stress": "x"}, r"cpu-stress needs a non-empty list of columns"),
    ({"cpu-stress": []}, r"cpu-stress needs a non-empty list of columns"),
    (["cpu-stress"], r"'interpretation' must map fault kind"),
])
def test_interpretation_mapping_is_validated(mapping, message):
    with pytest.raises(em.ExportError, match=message):
        em.load_metric_set({"services": ["a"], "metrics": {"x": "x", "y": "y"},
                            "interpretation": mapping})
    assert em.load_metric_set({"services": ["a"], "metrics": {"x": "x"}})["interpretation"] == {}


def test_shipped_metric_sets_declare_every_fault_kind():
    for path in (em.DEFAULT_METRIC_SET, REPO / "labshop" / "metrics-lab.yaml"):
        assert set(em.load_metric_set(path)["interpretation"]) == set(em.FAULT_KINDS), path


def test_export_writes_interpretation_on_labelled_rows(tmp_path):
    start, end = 1000, 1299
    fake = FakePrometheus(lambda params: (200, matrix(points(params, lambda t: t % 5))))
    faults = [{"start": 1100, "end": 1120, "kind": "cpu-stress", "target": "a", "name": "c"},
              {"start": 1200, "end": 1230, "kind": "network-delay", "target": "a", "name": "n"},
              {"start": 1250, "end": 1260, "kind": "memory-stress", "target": "b", "name": "m"}]
    metric_set = {"services": ["a", "b", "c"], "metrics": {"x": "x", "y": "y", "z": "z"},
                  "interpretation": {"cpu-stress": ["y", "x"], "network-delay": ["z"]}}
    out = tmp_path / "out"
    (out / "c").mkdir(parents=True)
    (out / "c" / "interpretation.csv").write_text("start,end,features\n0,0,x\n")  # stale
    try:  # an old dataset there: --overwrite replaces it whole, its stale file included
        summary = em.export(fake.url, metric_set, start, end, "1s", out, train_end=1050,
                            fault_log=faults, label_margin=2, label_scope="all", progress=False,
                            overwrite=True)
    finally:
        fake.close()
    interp = pd.read_csv(out / "a" / "interpretation.csv")
    assert list(interp.columns) == ["start", "end", "features"]
    assert interp.values.tolist() == [[48, 72, "y;x"], [148, 182, "z"]]  # row 0 = t 1050, margin 2
    labels = pd.read_csv(out / "a" / "test_label.csv", keep_default_na=False)
    for s, e, _ in interp.values:
        assert labels["label"].iloc[s:e + 1].all()
        assert labels["label"].iloc[s - 1] == 0 and labels["label"].iloc[e + 1] == 0
    # b's memory-stress has no declared columns; c is labelled (scope all) but is no target
    assert not (out / "b" / "interpretation.csv").exists()
    assert not (out / "c" / "interpretation.csv").exists()
    assert summary["services"]["a"]["interpretation_rows"] == 2
    assert no_temp_files(tmp_path)

    # the one-off command rebuilds the same file from test_label.csv and the fault log
    log = tmp_path / "faults.csv"
    for f in faults:
        em.append_fault(log, f["start"], f["end"], f["kind"], f["target"], f["name"])
    (out / "a" / "interpretation.csv").unlink()
    metric_path = tmp_path / "metrics.yaml"
    metric_path.write_text(yaml.safe_dump(metric_set))
    assert em.main(["--interpretation_only", f"--out={out}", f"--fault_log={log}",
                    f"--metrics={metric_path}", "--label_margin=2"]) == 0
    assert pd.read_csv(out / "a" / "interpretation.csv").values.tolist() == interp.values.tolist()
    # a margin other than the export's puts rows off the labels
    with pytest.raises(em.ExportError, match=r"a/test_label.csv: rows .* are not all labelled"):
        em.write_interpretation(out, metric_set, log, label_margin=5)


def test_widened_label_faults_get_no_interpretation(tmp_path):
    """lab.py's target+front-end scope: the front-end copies of faults label it but name no
    columns of it."""
    fake = FakePrometheus(lambda params: (200, matrix(points(params, lambda t: 1.0))))
    fault = {"start": 1100, "end": 1120, "kind": "cpu-stress", "target": "a", "name": "c"}
    metric_set = {"services": ["a", "front"], "metrics": {"x": "x"},
                  "interpretation": {"cpu-stress": ["x"]}}
    try:
        em.export(fake.url, metric_set, 1000, 1199, "1s", tmp_path, train_end=1050,
                  fault_log=[fault, {**fault, "target": "front"}], interpretation_faults=[fault],
                  progress=False)
    finally:
        fake.close()
    assert pd.read_csv(tmp_path / "front" / "test_label.csv")["label"].sum() == 21
    assert not (tmp_path / "front" / "interpretation.csv").exists()
    assert pd.read_csv(tmp_path / "a" / "interpretation.csv").values.tolist() == [[50, 70, "x"]]
