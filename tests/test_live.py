"""Live detection (detect_live.py) against real Prometheus servers on loopback.

- a checkpoint whose features the metric set lacks is refused (one line, exit 1);
- chaos/alert-rules.yaml passes `promtool check rules` and behaves (`promtool test rules`);
- the lab's shop (labshop/shop.py) + Prometheus at 1 s scrapes under a steady load: RECORD_S s of
  normal data recorded, a tiny model trained on catalogue + payment; the threshold detect_live
  computes is test.py's; detect_live.py (subprocess, both entities): a normal stretch raises no
  alarm, a CPU fault on catalogue (the lab's injector: stress-ng attached to its pod) raises one
  within 10 steps and it clears after the fault, with a JSON event line each and an
  Alertmanager-shaped POST each (the first answered 500: counted, not fatal); then Prometheus
  is stopped (the detector keeps serving, counts errors, marks staleness, raises no alarm) and
  started again on the same port and storage (it recovers); SIGTERM: exit 0, port closed;
- the step guard: the checkpoint records its training step (step_s); another --live_step is
  refused (one line, exit 1); a checkpoint without step_s is run with a warning;
- deploy/k8s/detector.yaml's init and detector commands, run as the StatefulSet runs them (its
  args through /bin/sh -c, $HOSTNAME and $SHARDS set, the paths moved to a temporary folder,
  the model bundle laid out by deploy/Dockerfile.model's COPY lines) against this Prometheus: a
  shard with a service serves its score, an empty shard serves /metrics and exits 0 on SIGTERM;
- a real Alertmanager (Debian's prometheus-alertmanager): the alerts a detector raised are
  resolved when it stops (SIGTERM or the end of --max_polls), none stays active.
Every process a test starts is stopped at its end (lab.Processes, by process group).
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fleetsim import ALERTMANAGER, active_alerts, alerts_received, start_alertmanager  # noqa: E402
MISSING = [b for b in ("prometheus", "stress-ng") if shutil.which(b) is None]
needs_binaries = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} "
                                    "(apt-get install prometheus stress-ng)")

SEQ_LEN = 5
RATE_WINDOW = 5  # seconds; the lab's default is 5 x the scrape interval
# the services' own columns of the lab metric set (node_* and memory drift with the machine)
# (latency too: on this loaded 2-core machine the test's own training and start-ups move it)
COLUMNS = ["up", "request_rate", "error_rate", "cpu_rate", "process_cpu_rate"]
ENTITIES = ["catalogue", "payment"]
RECORD_S = 25   # seconds of normal data the test trains on
MARGIN = 0.4    # the test's explicit threshold = MARGIN x the SPOT threshold (see the E2E test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp: Path, data: Path, *extra: str) -> Path:
    import train_safe
    ckpt = tmp / "puad.ckpt"
    train_safe.main([f"--data={data}", "--preset=test", f"--ckpt={ckpt}", f"--loss_csv={tmp}/loss.csv",
                     f"--seq_len={SEQ_LEN}", "--stage=global", "--epochs=3", "--lr=3e-3",
                     "--num_threads=1", *extra])
    return ckpt


def scrape(port: int) -> dict:
    """The detector's /metrics -> {'name{labels}': value}."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class Webhook:
    """A fake Alertmanager /api/v2/alerts: records every POSTed body; answers 500 to the first
    one (the detector must log it, count it and go on), 200 after."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, body))
                self.send_response(500 if len(received) == 1 else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v2/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def wait_for(predicate, timeout: float, what: str, port: int, process):
    deadline = time.monotonic() + timeout
    last = {}
    while time.monotonic() < deadline:
        assert process.poll() is None, f"detect_live.py exited with {process.returncode}"
        try:
            last = scrape(port)
            if predicate(last):
                return last
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last /metrics: "
                         + json.dumps({k: v for k, v in last.items() if k.startswith("puad")}))


def test_mismatched_checkpoint_is_refused(tmp_path):
    """Refused before any model is built: a checkpoint dict with config and features is enough."""
    import dataclasses
    import torch
    from config import PRESETS, Config
    ckpt = tmp_path / "puad.ckpt"
    torch.save({"config": dataclasses.asdict(Config(**PRESETS["test"])), "features": ["up", "cpu_rate", "mystery"],
                "n_features": 3, "scalers": {}, "entities": ["catalogue"]}, ckpt)
    result = subprocess.run([sys.executable, str(ROOT / "detect_live.py"), f"--ckpt={ckpt}",
                             f"--metrics_file={ROOT / 'labshop' / 'metrics-lab.yaml'}", "--fixed_threshold=1.0",
                             f"--port={free_port()}", "--num_threads=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("detect_live.py: error:"), result.stderr
    assert "missing from the metric set: ['mystery']" in errors[0], errors


PROMTOOL = shutil.which("promtool")
RULES = ROOT / "chaos" / "alert-rules.yaml"


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (apt-get install prometheus)")
def test_alert_rules(tmp_path):
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # the rules' behaviour: the detector's alert (puad_alert, already held --alarm_hold polls) fires
    # PUADAnomaly at once (for: 0s) and resolves with it; a stale detector fires PUADDetectorStale
    # and mutes PUADAnomaly (an old 1 is not a fresh alarm)
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            {"series": 'puad_alert{entity="catalogue",instance="d:9109",job="puad"}', "values": "0x3 1x8 0x7"},
            {"series": 'puad_anomaly_score{entity="catalogue",instance="d:9109",job="puad"}', "values": "1x3 50x16"},
            {"series": 'puad_stale{entity="catalogue",instance="d:9109",job="puad"}', "values": "0x19"},
            {"series": 'puad_alert{entity="payment",instance="d:9109",job="puad"}', "values": "1x19"},
            {"series": 'puad_stale{entity="payment",instance="d:9109",job="puad"}', "values": "1x19"},
            {"series": 'up{job="puad",instance="d:9109"}', "values": "1x19"},
        ],
        "alert_rule_test": [
            {"eval_time": "30s", "alertname": "PUADAnomaly", "exp_alerts": []},
            {"eval_time": "1m", "alertname": "PUADAnomaly", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "entity": "catalogue", "instance": "d:9109", "job": "puad"},
                "exp_annotations": {
                    "summary": "PUAD: anomalous metrics on catalogue",
                    "description": "The PUAD score of catalogue has been above its threshold for --alarm_hold "
                                   "polls in a row (last score 50). Check the service's dashboards and recent "
                                   "deploys; the detector's event log has the exact windows and the metrics "
                                   "behind them."}}]},
            {"eval_time": "4m", "alertname": "PUADAnomaly", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "PUADDetectorStale", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "entity": "payment", "instance": "d:9109"},
                "exp_annotations": {
                    "summary": "PUAD detector has no fresh score for payment",
                    "description": "detect_live.py on d:9109 has scored no window of payment for over "
                                   "--stale_steps steps: Prometheus unreachable (puad_query_errors_total rising) "
                                   "or missing data (puad_skipped_windows_total). PUADAnomaly is muted for this "
                                   "entity meanwhile."}}]},
            {"eval_time": "4m", "alertname": "PUADDetectorDown", "exp_alerts": []},
        ]}]}
    (tmp_path / "rules-test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "rules-test.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def prometheus_config(scrape_targets: dict[str, int]) -> str:
    return yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "shop", "static_configs": [
            {"targets": [f"127.0.0.1:{p}"], "labels": {"service": n}} for n, p in scrape_targets.items()]}],
    })


@pytest.fixture(scope="module")
def live_lab(tmp_path_factory):
    """Shop + Prometheus at 1 s scrapes under a steady load, RECORD_S seconds of normal data of
    catalogue and payment exported, and a tiny model trained on them (one shared model)."""
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}")
    import export_metrics
    import lab

    tmp = tmp_path_factory.mktemp("live")
    (tmp / "logs").mkdir()
    procs = lab.Processes(tmp / "logs")
    try:
        ports = {name: free_port() for name in lab.SERVICES}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        core = sorted(os.sched_getaffinity(0))[-1]
        shop = [sys.executable, str(ROOT / "labshop" / "shop.py")]
        pids = {}
        for name in ("catalogue", "payment", "front-end"):
            command = shop + [name, "--port", str(ports[name]), "--seed", "0"]
            if name == "catalogue":
                command += ["--db", str(tmp / "catalogue.sqlite"), "--cpu", str(core)]
            if name == "front-end":
                command += ["--catalogue", urls["catalogue"], "--payment", urls["payment"]]
            pids[name] = procs.spawn(command, name).pid
        for name in ports:
            lab.wait_http(urls[name] + "/health", 30, name, procs)
        prom_port = free_port()
        (tmp / "prometheus.yml").write_text(prometheus_config(ports))
        prom_cmd = ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1d"]
        procs.spawn(prom_cmd, "prometheus")
        prometheus = f"http://127.0.0.1:{prom_port}"
        lab.wait_http(f"{prometheus}/-/ready", 60, "prometheus", procs)
        procs.spawn(shop + ["loadgen", "--target", urls["front-end"], "--rate", "10", "--period", "1e7",
                            "--seed", "0"], "loadgen")
        metric_set = yaml.safe_load((ROOT / "labshop" / "metrics-lab.yaml").read_text())
        metric_set["metrics"] = {c: metric_set["metrics"][c] for c in COLUMNS}
        metric_set.pop("interpretation", None)  # it names columns left out here
        metric_set["rate_window"] = f"{RATE_WINDOW}s"
        metric_set["services"] = ENTITIES
        metrics_file = tmp / "metrics-live.yaml"
        metrics_file.write_text(yaml.safe_dump(metric_set, sort_keys=False))
        start = time.time() + RATE_WINDOW + 3  # rates settle
        time.sleep(start + RECORD_S - time.time())
        export_metrics.export(prometheus, metrics_file, start, time.time() - 1, step=1, out=tmp / "data",
                              services=ENTITIES, progress=False)
        ckpt = train(tmp, tmp / "data", "--epochs=6", "--val_frac=0.3")
        yield dict(tmp=tmp, procs=procs, prometheus=prometheus, prom_cmd=prom_cmd, ckpt=ckpt,
                   metrics_file=metrics_file, services={n: {"pid": pids[n], "url": urls[n],
                                                            "cpu": core if n == "catalogue" else None}
                                                        for n in ports})
    finally:
        procs.stop_all()


@needs_binaries
def test_threshold_is_test_py_s(live_lab):
    """detect_live computes the threshold exactly as test.py does (SPOT on the validation tail),
    and scores a window as the offline scorer scores its last point, the level gauges' recent
    level from the rows before it too."""
    import detect_live
    import test as evaluate_script
    from puad import build_model, read_checkpoint
    from utils import load_dataset
    tmp = live_lab["tmp"]
    det = detect_live.setup([f"--ckpt={live_lab['ckpt']}", f"--metrics_file={live_lab['metrics_file']}",
                             f"--data={tmp / 'data'}", f"--entities={','.join(ENTITIES)}", f"--live_log={tmp / 'x.jsonl'}"])
    ckpt = read_checkpoint(live_lab["ckpt"])
    model, _ = build_model(ckpt)
    cfg = det.cfg
    k = cfg.seq_len + cfg.smooth - 1  # a live poll scores the last `smooth` windows
    for ent in load_dataset(tmp / "data"):
        ent.test = ent.train  # score_entity also scores a test split
        r = evaluate_script.score_entity(model, ckpt, cfg, ent)
        assert det.scoring.thresholds[ent.name] == pytest.approx(r["scorer"].threshold_, rel=1e-6)
        cal = det.scoring.scorers[ent.name]  # one calibration: normaliser, threshold and drift guard alike
        np.testing.assert_allclose(cal.recent_, r["scorer"].recent_, rtol=1e-6)
        assert cal.median_ == pytest.approx(r["scorer"].median_, rel=1e-6)
        np.testing.assert_allclose(cal.center_, r["scorer"].center_, rtol=1e-6)
        np.testing.assert_allclose(cal.scale_, r["scorer"].scale_, rtol=1e-6)
        # a live window's score is the offline (smoothed) score of its last point
        x = ent.train[:, [ent.features.index(f) for f in ckpt["features"]]]
        for i in (k - 1, len(x) - 1):  # the rows before the window (train, as the test split's history) too
            before = np.concatenate([x, x[:i - k + 1]])
            got = det.scoring.score({ent.name: x[i - k + 1:i + 1]}, {ent.name: before})[ent.name]
            assert got == pytest.approx(r["test_scores"][i], rel=1e-4, abs=1e-4)
    live_lab["spot"] = det.scoring.thresholds


@needs_binaries
def test_live_detection_fault_outage_and_sigterm(live_lab):
    """The detector runs with an explicit threshold of MARGIN x the SPOT threshold: with the
    RECORD_S seconds of data a test can afford, the validation tail holds a handful of windows.
    Before SPOT took the tail's scale at its upper bound (metrics.exponential_scale_bound) its
    threshold sat at the top of the normal noise and the test used 6 x; now it lies far above the
    normal scores (89 to 104 in four runs, against up to 13). How far the CPU fault lifts the score
    depends on the machine: 207 here, 90 on a CI machine, where 1 x SPOT (104) missed it. 0.4 x
    SPOT keeps a margin of about 3 x over the normal stretch and 2 x under the weaker fault."""
    import detect_live
    import lab
    tmp, procs = live_lab["tmp"], live_lab["procs"]
    if "spot" not in live_lab:
        det = detect_live.setup([f"--ckpt={live_lab['ckpt']}", f"--metrics_file={live_lab['metrics_file']}",
                                 f"--data={tmp / 'data'}", "--entities=catalogue", f"--live_log={tmp / 'x.jsonl'}"])
        live_lab["spot"] = det.scoring.thresholds
    threshold = MARGIN * live_lab["spot"]["catalogue"]
    port = free_port()
    events = tmp / "events.jsonl"
    command = [sys.executable, str(ROOT / "detect_live.py"), f"--ckpt={live_lab['ckpt']}",
               f"--entities={','.join(ENTITIES)}", f"--fixed_threshold={threshold}",
               f"--prometheus={live_lab['prometheus']}", f"--metrics_file={live_lab['metrics_file']}",
               "--live_step=1", f"--port={port}", f"--live_log={events}",
               "--stale_steps=3", "--max_backoff=2", "--query_timeout=2", "--num_threads=1"]
    webhook = Webhook()
    command.append(f"--webhook={webhook.url}")
    log = open(tmp / "logs" / "detect_live.log", "w")
    detector = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        m = wait_for(lambda m: all(m.get(f'puad_windows_scored_total{{entity="{e}"}}', 0) >= 1 for e in ENTITIES),
                     40, "a first scored window of every entity", port, detector)
        assert m['puad_threshold{entity="catalogue"}'] == pytest.approx(threshold)

        def series(seconds):
            """(anomaly, score) once a second for `seconds` seconds."""
            out = []
            for _ in range(seconds):
                m = scrape(port)
                out.append((m['puad_anomaly{entity="catalogue"}'], m['puad_anomaly_score{entity="catalogue"}']))
                time.sleep(1)
            return out

        # the windows right after start-up can still hold the CPU contention of the training and
        # of the detector's own start (a real anomaly on a 2-core machine): let them pass first
        settled = 0
        for _ in range(30):
            settled = settled + 1 if scrape(port)['puad_anomaly{entity="catalogue"}'] == 0 else 0
            if settled >= 5:
                break
            time.sleep(1)
        normal = series(10)
        assert not any(a for a, _ in normal), f"false alarm in the normal stretch: {normal}"

        injector = lab.faults.Injector(live_lab["services"], procs.spawn)
        fault = {"kind": "cpu-stress", "target": "catalogue", "duration": 10, "name": "cpu-live"}
        handle = injector.start(fault)
        try:
            during = series(10)
        finally:
            injector.stop(handle)
        t_end = time.time()
        first = next((i for i, (a, _) in enumerate(during) if a == 1), None)
        assert first is not None and first <= 10, f"no alarm within 10 steps of the CPU fault (threshold {threshold:.4g}, normal {normal}): {during}"
        after = wait_for(lambda m: m['puad_alert{entity="catalogue"}'] == 0, 30, "the alert to resolve (--alarm_clear)",
                         port, detector)
        assert after['puad_anomaly{entity="catalogue"}'] == 0
        lines = [json.loads(line) for line in events.read_text().splitlines() if '"catalogue"' in line]
        assert [e["state"] for e in lines][:2] == ["anomalous", "normal"], lines
        # which metrics: the CPU fault's alarm names a CPU column among its top 3 features
        assert len(lines[0]["top_features"]) == 3, lines[0]
        assert {"cpu_rate", "process_cpu_rate"} & set(lines[0]["top_features"]), lines[0]
        assert 'puad_feature_score{entity="catalogue",feature="cpu_rate"}' in scrape(port)
        # the webhook got Alertmanager-shaped alerts: firing (answered 500: counted, not fatal), then resolved
        deadline = time.monotonic() + 10
        while len(webhook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        (path0, fired), (_, resolved) = webhook.received[:2]
        assert path0 == "/api/v2/alerts" and len(fired) == 1 and len(resolved) == 1
        assert fired[0]["labels"]["alertname"] == "PUADAnomaly" and fired[0]["labels"]["entity"] == "catalogue"
        assert fired[0]["annotations"]["description"] == ", ".join(lines[0]["top_features"])
        print("\nfired alert:", json.dumps(fired[0]))
        assert "startsAt" in fired[0] and "endsAt" not in fired[0] and resolved[0]["endsAt"] >= resolved[0]["startsAt"]
        assert scrape(port)["puad_webhook_errors_total"] == 1
        print(f"\nthreshold {threshold:.4g} (SPOT {live_lab['spot']['catalogue']:.4g}); normal scores max {max(s for _, s in normal):.4g}; fault scores max "
              f"{max(s for _, s in during):.4g}; alarm {first} s after the fault start, cleared "
              f"{time.time() - t_end:.1f} s after its end; scoring latency "
              f"{after['puad_scoring_latency_seconds_sum'] / after['puad_scoring_latency_seconds_count'] * 1e3:.2f} ms/window")

        # Prometheus stops: /metrics still served, errors counted, stale, no alarm
        prom = next(p for n, p in procs.started if n == "prometheus")
        procs.stop("prometheus", prom)
        errors0 = after["puad_query_errors_total"]
        m = wait_for(lambda m: m["puad_query_errors_total"] >= errors0 + 2 and m['puad_stale{entity="catalogue"}'] == 1,
                     20, "errors and staleness while Prometheus is down", port, detector)
        assert m['puad_anomaly{entity="catalogue"}'] == 0
        # the same server again (port and storage): the detector recovers
        procs.spawn(live_lab["prom_cmd"], "prometheus")
        scored = m['puad_windows_scored_total{entity="catalogue"}']
        m = wait_for(lambda m: m['puad_stale{entity="catalogue"}'] == 0
                     and m['puad_windows_scored_total{entity="catalogue"}'] > scored, 60,
                     "recovery after Prometheus returns", port, detector)
        assert m["puad_last_success_timestamp_seconds"] > time.time() - 10
        # the windows over the outage's gap were skipped, not scored on filled-in data
        assert m['puad_skipped_windows_total{entity="catalogue",reason="missing_points"}'] >= 1
        assert m['puad_anomaly{entity="catalogue"}'] == 0

        # SIGTERM: exit 0, port closed
        detector.send_signal(signal.SIGTERM)
        assert detector.wait(timeout=15) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        if detector.poll() is None:
            os.killpg(detector.pid, signal.SIGKILL)
            detector.wait(timeout=10)
        log.close()
        webhook.close()
        print((tmp / "logs" / "detect_live.log").read_text()[-3000:])


def test_step_mismatch_is_refused(tmp_path):
    """Refused before any model is built (a checkpoint dict with the metric set's columns is
    enough). The step itself comes from the train timestamps (utils.time_step): Unix seconds or
    milliseconds, never row numbers."""
    import dataclasses
    import torch
    from config import PRESETS, Config
    from prometheus import load_metric_set
    from utils import Entity, time_step
    entity = lambda ts: Entity("a", ["x"], np.zeros((len(ts), 1)), np.asarray(ts))  # noqa: E731
    assert time_step([entity(1.7e9 + np.array([0, 15, 30, 45, 75]))]) == 15.0
    assert time_step([entity(1.7e12 + np.arange(5) * 1000)]) == 1.0
    assert time_step([entity(np.arange(100))]) is None  # ASD, SMD: row numbers
    ckpt = tmp_path / "puad.ckpt"
    metrics_file = ROOT / "labshop" / "metrics-lab.yaml"
    features = [m["column"] for m in load_metric_set(metrics_file)["metrics"]]
    torch.save({"config": dataclasses.asdict(Config(**PRESETS["test"])), "features": features,
                "n_features": len(features), "scalers": {}, "entities": ["catalogue"], "step_s": 1.0}, ckpt)
    result = subprocess.run([sys.executable, str(ROOT / "detect_live.py"), f"--ckpt={ckpt}", "--live_step=15",
                             f"--metrics_file={metrics_file}", f"--port={free_port()}", "--num_threads=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("detect_live.py: error: --live_step=15 "), result.stderr
    assert "(1 s, step_s)" in errors[0] and "--live_step=1)" in errors[0], errors


@needs_binaries
def test_step_from_checkpoint_and_old_checkpoint(live_lab, tmp_path, caplog):
    """The lab's data was exported at 1 s: the checkpoint says so, and the detector polls at it when
    --live_step is left out; an old checkpoint (no step_s) keeps --live_step, warned once."""
    import logging

    import torch

    import detect_live
    from puad import read_checkpoint
    ckpt = read_checkpoint(live_lab["ckpt"])
    assert ckpt["step_s"] == 1.0
    common = [f"--metrics_file={live_lab['metrics_file']}", f"--data={live_lab['tmp'] / 'data'}",
              "--entities=payment", f"--live_log={tmp_path / 'x.jsonl'}", "--fixed_threshold=1.0"]
    assert detect_live.setup([f"--ckpt={live_lab['ckpt']}", *common]).step == 1
    old = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "step_s"}, old)
    with caplog.at_level(logging.WARNING, logger="puad.live"):
        det = detect_live.setup([f"--ckpt={old}", "--live_step=2", *common])
    assert det.step == 2
    warned = [r.getMessage() for r in caplog.records if "step_s" in r.getMessage()]
    assert len(warned) == 1 and "--live_step=2 is not checked" in warned[0], warned


def build_image(dockerfile: Path, context: Path, root: Path, build_args: dict[str, str]) -> None:
    """Lay out an image's files under root as the Dockerfile's ARG and COPY lines would (no Docker
    here): each source a glob in the build context, a folder's contents copied into the target."""
    args: dict[str, str] = {}
    for line in dockerfile.read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default)
        elif word == "COPY":
            *sources, dest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            target = root / dest.lstrip("/")
            for src in (p for pattern in sources for p in sorted(context.glob(pattern.rstrip("/")))):
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True)
                else:
                    (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, target / src.name if dest.endswith("/") else target)


def container_command(container: dict, paths: dict[str, str]) -> list[str]:
    """A container's command line, each of `paths` (container path or option -> this machine's) replaced in one pass."""
    pattern = re.compile("|".join(map(re.escape, sorted(paths, key=len, reverse=True))))
    return [pattern.sub(lambda m: paths[m.group(0)], part) for part in container["command"] + container["args"]]


@needs_binaries
def test_kubernetes_container_command(live_lab, tmp_path):
    """deploy/k8s/detector.yaml as the StatefulSet runs it: the init container fills the model volume
    from a bundle built as deploy/Dockerfile.model builds it (the checkpoint trained on the lab,
    its calibration data and metric set); then replica 1 of the manifest's SHARDS=2 (catalogue,
    by Prometheus' hashmod) and replica 0 of 3 shards (no service: 0/3 gets neither) run the
    detector's exact args. The first serves catalogue's score only, the second idles and serves
    /metrics; both exit 0 on SIGTERM."""
    from prometheus import hashmod
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "detector.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    (init,), (main,) = pod["initContainers"], pod["containers"]
    mount = {v["name"]: v["mountPath"] for v in main["volumeMounts"]}["model"]
    assert {v["name"]: v["mountPath"] for v in init["volumeMounts"]}["model"] == mount
    # the bundle: a build context holding what `docker build -f deploy/Dockerfile.model` would be given
    context, image, volume = tmp_path / "context", tmp_path / "image", tmp_path / "volume"
    (context / "ckpt").mkdir(parents=True)
    shutil.copy(live_lab["ckpt"], context / "ckpt" / "puad.ckpt")
    shutil.copytree(live_lab["tmp"] / "data", context / "data")
    shutil.copy(live_lab["metrics_file"], context / "metrics.yaml")
    build_image(ROOT / "deploy" / "Dockerfile.model", context, image,
                {"CKPT_DIR": "ckpt", "DATA": "data", "METRICS": "metrics.yaml"})
    volume.mkdir()
    subprocess.run(container_command(init, {"/model": str(image / "model"), mount: str(volume)}),
                   check=True, timeout=30)
    assert (volume / "checkpoints" / "puad.ckpt").is_file() and (volume / "calibration" / "catalogue").is_dir()

    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["SHARDS"] == "2" and [hashmod(e, 2) for e in ENTITIES] == [1, 0] and [hashmod(e, 3) for e in ENTITIES] == [2, 2]
    runs = {"catalogue": ("puad-detector-1", "2"), "empty": ("puad-detector-0", "3")}
    procs, ports = {}, {}
    try:
        for name, (hostname, shards) in runs.items():
            ports[name] = free_port()
            command = container_command(main, {
                mount: str(volume), "/tmp/": f"{tmp_path}/{name}-",
                "--prometheus=http://prometheus-operated.monitoring.svc:9090": f"--prometheus={live_lab['prometheus']}",
                "--port=9109": f"--port={ports[name]}", "--listen=0.0.0.0": "--listen=127.0.0.1"})
            procs[name] = subprocess.Popen(
                command, cwd=ROOT, start_new_session=True, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                env={**os.environ, **env, "SHARDS": shards, "HOSTNAME": hostname,
                     "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})  # `python` is this one
        m = wait_for(lambda m: m.get('puad_windows_scored_total{entity="catalogue"}', 0) >= 1, 60,
                     "a scored window of catalogue", ports["catalogue"], procs["catalogue"])
        assert math.isfinite(m['puad_anomaly_score{entity="catalogue"}'])
        assert not any("payment" in k for k in m) and m["puad_entities"] == 1
        assert m["puad_step_seconds"] == 1  # the checkpoint's step: the manifest gives no --live_step
        m = wait_for(lambda m: "puad_entities" in m, 60, "/metrics of the empty shard", ports["empty"], procs["empty"])
        assert m["puad_entities"] == 0 and m["process_cpu_seconds_total"] > 0
        assert not any(k.startswith("puad_anomaly_score") for k in m)
        time.sleep(2)  # it idles: still up, polling nothing
        assert procs["empty"].poll() is None
        for name, p in procs.items():
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=20) == 0, (name, (tmp_path / f"{name}.log").read_text()[-2000:])
        assert "--shard=0/3: no entity of this shard; idling" in (tmp_path / "empty.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@needs_binaries
@pytest.mark.skipif(ALERTMANAGER is None, reason="needs prometheus-alertmanager (apt-get install prometheus-alertmanager)")
def test_alerts_resolved_when_detector_stops(live_lab, tmp_path):
    """A threshold of -1 puts both services in alarm at their first scored window; Alertmanager
    shows both alerts active. On SIGTERM, and at the end of --max_polls, the detector resolves
    them before it exits 0: Alertmanager holds no active alert (without it they would stay
    active for its resolve_timeout, 5 minutes), and the event log ends with a `normal` line for
    each service saying why."""
    import lab
    procs = lab.Processes(tmp_path)
    try:
        alertmanager = start_alertmanager(procs, tmp_path)
        for stop in ("sigterm", "max_polls"):
            port, events = free_port(), tmp_path / f"events-{stop}.jsonl"
            command = [sys.executable, str(ROOT / "detect_live.py"), f"--ckpt={live_lab['ckpt']}",
                       f"--entities={','.join(ENTITIES)}", "--fixed_threshold=-1", f"--prometheus={live_lab['prometheus']}",
                       f"--metrics_file={live_lab['metrics_file']}", f"--port={port}", f"--live_log={events}",
                       f"--webhook={alertmanager}/api/v2/alerts", "--live_step=1", "--num_threads=1"]
            if stop == "max_polls":
                command.append("--max_polls=6")
            detector = procs.spawn(command, f"detect_live-{stop}")
            if stop == "sigterm":
                deadline = time.monotonic() + 60
                while set(active_alerts(alertmanager)) != set(ENTITIES):
                    assert detector.poll() is None and time.monotonic() < deadline, "no alert reached Alertmanager"
                    time.sleep(0.5)
                detector.send_signal(signal.SIGTERM)
            assert detector.wait(timeout=60) == 0, (tmp_path / f"detect_live-{stop}.log").read_text()[-2000:]
            assert active_alerts(alertmanager) == {}, stop
            lines = [json.loads(line) for line in events.read_text().splitlines()]
            for e in ENTITIES:
                states = [(x["state"], x.get("reason")) for x in lines if x["entity"] == e]
                assert states == [("anomalous", None), ("normal", "detector stopped")], (stop, e, states)
        received = alerts_received(alertmanager)
        assert received == {"firing": 2 * len(ENTITIES), "resolved": 2 * len(ENTITIES)}, received
    finally:
        procs.stop_all()


@needs_binaries
def test_new_service_is_calibrating_then_scored(live_lab, tmp_path):
    """front-end is in Prometheus but the checkpoint was trained on catalogue and payment only and
    it has no local file: the detector scores it with the shared model and the history's pooled
    scaler once Prometheus holds --min_calib_rows complete rows of it, calibrated on those rows with
    the history's latent memory (docs/meta.md's new server); until then puad_calibrating is 1, it
    is stale and unscored, and /metrics is served. Polled at chosen grid times: a window reaching
    back before Prometheus' first scrape is incomplete, a later one complete. A checkpoint without
    the history's scaler refuses the new service in one line."""
    import torch

    import detect_live
    from puad import history_memory, read_checkpoint
    prom, ckpt_path = live_lab["prometheus"], live_lab["ckpt"]
    first = requests.get(f"{prom}/api/v1/query", params={"query": 'min(min_over_time(timestamp(up{service="front-end"})[30m:1s]))'},
                         timeout=10).json()["data"]["result"]
    first = int(float(first[0]["value"][1]))
    args = [f"--metrics_file={live_lab['metrics_file']}", f"--data={live_lab['tmp'] / 'data'}", "--live_step=1",
            "--entities=catalogue,front-end", "--min_calib_rows=20", f"--prometheus={prom}", "--port=0",
            f"--live_log={tmp_path / 'events.jsonl'}", "--num_threads=1"]
    det = detect_live.setup([f"--ckpt={ckpt_path}", *args])
    assert det.pending == ["front-end"] and det.scoring.states["front-end"].new
    det.serve()
    port = det.gauges.server.server_port
    try:
        det.poll(first + 10)  # its last 20 rows reach back before its first scrape
        m = scrape(port)
        assert m['puad_calibrating{entity="front-end"}'] == 1 and m['puad_calibrating{entity="catalogue"}'] == 0
        assert m['puad_windows_scored_total{entity="front-end"}'] == 0 and m['puad_stale{entity="front-end"}'] == 1
        assert m['puad_skipped_windows_total{entity="catalogue",reason="missing_points"}'] == 1  # before the first scrape too
        det.poll(int(time.time()) - 3)  # complete: calibrated and scored
        m = scrape(port)
        assert m['puad_calibrating{entity="front-end"}'] == 0 and det.pending == []
        assert m['puad_windows_scored_total{entity="front-end"}'] == 1 and m['puad_stale{entity="front-end"}'] == 0
        assert math.isfinite(m['puad_anomaly_score{entity="front-end"}'])
        assert math.isfinite(m['puad_threshold{entity="front-end"}'])
    finally:
        det.close()
    ckpt = read_checkpoint(ckpt_path)
    scorer, state = det.scoring.scorers["front-end"], det.scoring.states["front-end"]
    assert scorer.n_rows_ == 20 and len(scorer.memory_) == len(history_memory(ckpt))
    np.testing.assert_array_equal(state.scaler.shift, ckpt["history_scaler"]["shift"].numpy())
    old = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "history_scaler"}, old)
    with pytest.raises(detect_live.LiveError, match="'front-end': no scaler .* no history_scaler"):
        detect_live.setup([f"--ckpt={old}", *args])
