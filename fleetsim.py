"""A synthetic fleet for detect_live.py at scale: an exporter serving N services' lab metrics
(labshop/metrics-lab.yaml's series, each with a `service` label) and a real Prometheus on
loopback scraping it. Used by `bench.py --fleet=N` and tests/test_fleet.py.

    with Fleet(names, tmp_dir, scrape_s=1) as fleet:   # exporter + Prometheus, stopped at exit
        fleet.prometheus                                 # http://127.0.0.1:PORT
        fleet.exporter.faults["svc-0007"] = "cpu"        # a fault, from now on

Every series of a service is the lab's (shop_*, pod_*, process_*, and an `up` gauge per service,
since one exporter target stands for all of them); node_* come from /node (job "node").
Normal load: each service has its own request rate, median latency (requests lognormal
around it, sigma 0.5), CPU and memory level with +-10 % noise per scrape; faults: "cpu" (the
pod uses one more core, the process 3x its CPU), "latency" (8x the median latency), "down"
(up = 0, no requests). The latency's noise matters: with a constant median, the quantiles of
the histogram were constant up to the rounding of its counters, and the scaler, fitted on that
rounding alone, stretched it to full range (false alarms named latency_p99 in the quiet fleet),
or, with counters written with every digit, scaled them by 1 (a latency fault hardly moved the
score). Counters are written with every digit, as Prometheus' client libraries write them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import yaml

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)
FAULTS = ("cpu", "latency", "down")


def service_names(n: int) -> list[str]:
    return [f"svc-{i:04d}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exporter:
    """Text exposition of N services' metrics: /metrics (job shop) and /node (job node)."""

    def __init__(self, names: list[str], seed: int = 0):
        self.names = list(names)
        self.faults: dict[str, str] = {}
        n = len(names)
        rng = self.rng = np.random.default_rng(seed)
        self.req_rate = rng.uniform(5, 50, n)
        self.err_frac = rng.uniform(0.0, 0.02, n)
        self.latency = rng.uniform(0.01, 0.08, n)  # median seconds
        self.cpu_per_req = rng.uniform(0.002, 0.01, n)
        self.mem = rng.uniform(30e6, 300e6, n)
        self.threads = rng.integers(4, 40, n).astype(float)
        self.fds = rng.integers(10, 100, n).astype(float)
        self.requests = np.zeros(n)
        self.errors = np.zeros(n)
        self.buckets = np.zeros((n, len(BUCKETS)))
        self.pod_cpu = np.zeros(n)
        self.proc_cpu = np.zeros(n)
        self.node_cpu = np.zeros(3)
        self.last = time.time()
        self.lock = threading.Lock()
        self.labels = [f'{{service="{s}"}}' for s in names]
        self.server = self.thread = None

    def _advance(self) -> None:
        now = time.time()
        dt, self.last = max(now - self.last, 0.0), now
        n = len(self.names)
        noise = lambda: 1 + 0.1 * self.rng.standard_normal(n)  # noqa: E731
        kind = np.array([self.faults.get(s, "") for s in self.names]) if self.faults else np.full(n, "")
        up = kind != "down"
        reqs = np.where(up, self.req_rate * noise() * dt, 0.0).clip(0)
        self.requests += reqs
        self.errors += reqs * self.err_frac
        median = self.latency * noise().clip(0.5) * np.where(kind == "latency", 8.0, 1.0)
        z = (np.log(np.array(BUCKETS[:-1]))[None, :] - np.log(median)[:, None]) / 0.5
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        self.buckets += reqs[:, None] * np.concatenate([cdf, np.ones((n, 1))], axis=1)
        proc = reqs * self.cpu_per_req * np.where(kind == "cpu", 3.0, 1.0)
        self.proc_cpu += proc
        self.pod_cpu += proc + np.where(kind == "cpu", 1.0, 0.0) * dt
        self.node_cpu += np.array([0.3, 0.1, 1.6]) * dt * (1 + 0.05 * self.rng.standard_normal(3))
        self.up = up

    def render(self) -> bytes:
        with self.lock:
            self._advance()
            n = len(self.names)
            mem = self.mem * (1 + 0.02 * self.rng.standard_normal(n))
            out = []
            for i, lab in enumerate(self.labels):
                s = lab[:-1]
                out.append(f"up{lab} {int(self.up[i])}\n"
                           f"shop_requests_total{lab} {self.requests[i]:.17g}\n"
                           f"shop_errors_total{lab} {self.errors[i]:.17g}\n"
                           + "".join(f'shop_request_duration_seconds_bucket{s},le="{"+Inf" if math.isinf(le) else le}"}} '
                                     f"{self.buckets[i, k]:.17g}\n" for k, le in enumerate(BUCKETS))
                           + f"pod_cpu_seconds_total{lab} {self.pod_cpu[i]:.17g}\n"
                           f"pod_memory_bytes{lab} {mem[i]:.8g}\n"
                           f"process_cpu_seconds_total{lab} {self.proc_cpu[i]:.17g}\n"
                           f"process_resident_memory_bytes{lab} {0.8 * mem[i]:.8g}\n"
                           f"process_threads{lab} {self.threads[i]:.0f}\n"
                           f"process_open_fds{lab} {self.fds[i]:.0f}\n")
            return "".join(out).encode()

    def render_node(self) -> bytes:
        with self.lock:
            u, s, i = self.node_cpu
            load = 1.0 + 0.1 * self.rng.standard_normal()
            return (f'node_cpu_seconds_total{{cpu="0",mode="user"}} {u:.17g}\n'
                    f'node_cpu_seconds_total{{cpu="0",mode="system"}} {s:.17g}\n'
                    f'node_cpu_seconds_total{{cpu="0",mode="idle"}} {i:.17g}\n'
                    f"node_load1 {load:.4g}\nnode_memory_MemAvailable_bytes 8e9\n").encode()

    def start(self, port: int = 0) -> int:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = exporter.render() if self.path.startswith("/metrics") else \
                    exporter.render_node() if self.path.startswith("/node") else None
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.server.server_port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None


def prometheus_config(exporter_port: int, scrape_s: int, extra_jobs: list[dict] = (),
                      shard_modulus: int = 0) -> dict:
    """Scrape the exporter (jobs shop and node) every scrape_s seconds. shard_modulus: also a
    `shard` label from Prometheus' own hashmod of `service` (to check prometheus.hashmod)."""
    shop = {"job_name": "shop", "honor_labels": True, "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
    if shard_modulus:
        shop["metric_relabel_configs"] = [{"source_labels": ["service"], "modulus": shard_modulus,
                                           "target_label": "shard", "action": "hashmod"}]
    return {"global": {"scrape_interval": f"{scrape_s}s", "scrape_timeout": f"{scrape_s}s",
                       "evaluation_interval": f"{scrape_s}s"},
            "scrape_configs": [shop, {"job_name": "node", "metrics_path": "/node",
                                      "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
                               *extra_jobs]}


class Fleet:
    """Exporter + Prometheus on loopback; a context manager that stops both."""

    def __init__(self, names: list[str], tmp: Path, scrape_s: int = 1, seed: int = 0,
                 extra_jobs: list[dict] = (), shard_modulus: int = 0, external: bool = False,
                 faults: dict[str, str] | None = None):
        """external: the exporter in a process of its own (python fleetsim.py: a benchmark's
        timings then leave out its rendering), its faults fixed from the start; else in a
        thread of this process, `exporter.faults` changeable at any time."""
        import lab
        if shutil.which("prometheus") is None:
            raise RuntimeError("needs the prometheus binary (apt-get install prometheus)")
        self.tmp = Path(tmp)
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        self.exporter = None if external else Exporter(names, seed)
        self.procs = lab.Processes(self.tmp / "logs")
        self.names, self.scrape_s = names, scrape_s
        try:
            if external:
                port = free_port()
                (self.tmp / "services.txt").write_text("\n".join(names))
                self.procs.spawn([sys.executable, str(Path(__file__).resolve()), f"--services={self.tmp / 'services.txt'}",
                                  f"--port={port}", f"--seed={seed}",
                                  "--faults=" + ",".join(f"{k}={v}" for k, v in (faults or {}).items())], "exporter")
                lab.wait_http(f"http://127.0.0.1:{port}/node", 30, "exporter", self.procs)
            else:
                self.exporter.faults.update(faults or {})
                port = self.exporter.start()
            (self.tmp / "prometheus.yml").write_text(yaml.safe_dump(
                prometheus_config(port, scrape_s, list(extra_jobs), shard_modulus), sort_keys=False))
            prom_port = free_port()
            self.procs.spawn(["prometheus", f"--config.file={self.tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={self.tmp / 'tsdb'}", "--storage.tsdb.retention.time=1d",
                              f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], "prometheus")
            self.prometheus = f"http://127.0.0.1:{prom_port}"
            lab.wait_http(f"{self.prometheus}/-/ready", 60, "prometheus", self.procs)
            self.started = time.time()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.procs.stop_all()
        if self.exporter is not None:
            self.exporter.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the quiet fleet (issue 33): a user's own services, end to end, with a real Alertmanager

ROOT = Path(__file__).resolve().parent
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
RATE_WINDOW_S = 5  # the metric set's rate window at 1 s scrapes (>= 4 scrape intervals)
SETTLE_S = 2 * RATE_WINDOW_S + 5  # after the first scrape: rates settled, the first row recorded
PREVIEW_LEAD_S = 30  # >= seq_len + smooth - 1 grid points (24 at the defaults) before the normal run
EXPECTED = {"cpu": ("cpu_rate", "process_cpu_rate"), "latency": ("latency_p50", "latency_p99")}  # named first


def start_alertmanager(procs, tmp: Path) -> str:
    """A real Alertmanager on a free loopback port (no cluster, a receiver that sends nothing) -> its URL."""
    import lab
    if ALERTMANAGER is None:
        raise RuntimeError("needs prometheus-alertmanager (apt-get install prometheus-alertmanager)")
    port = free_port()
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump({"route": {"receiver": "null", "group_wait": "1s"},
                                                          "receivers": [{"name": "null"}]}))
    procs.spawn([ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'alertmanager'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="], "alertmanager")
    url = f"http://127.0.0.1:{port}"
    lab.wait_http(f"{url}/-/ready", 30, "alertmanager", procs)
    return url


def active_alerts(alertmanager: str) -> dict[str, dict]:
    """The PUADAnomaly alerts Alertmanager holds as active, by entity."""
    import requests
    alerts = requests.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
    return {a["labels"]["entity"]: a for a in alerts if a["labels"].get("alertname") == "PUADAnomaly"}


def alerts_received(alertmanager: str) -> dict[str, float]:
    """The alert posts Alertmanager received so far: {"firing": n, "resolved": n}."""
    import requests
    got = {"firing": 0.0, "resolved": 0.0}
    for line in requests.get(f"{alertmanager}/metrics", timeout=5).text.splitlines():
        if line.startswith("alertmanager_alerts_received_total{"):
            got[line.split('status="')[1].split('"')[0]] += float(line.rsplit(" ", 1)[1])
    return got


def run_step(command: list[str], log: Path, nice: int = 0) -> None:
    """Run one documented command (export, training, test.py) to its end; its output in `log`;
    nice: its CPU priority lowered by that much (a preview beside a live detector)."""
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if nice:
            os.setpriority(os.PRIO_PROCESS, process.pid, nice)
        code = process.wait()
    if code:
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {code}); see {log}")


def export(prometheus: str, metrics: Path, start: float, end: float, out: Path, nice: int = 0) -> None:
    """export_metrics.py of [start, end] at 1 s steps into out (all rows normal: train.csv)."""
    run_step([sys.executable, "export_metrics.py", f"--prometheus={prometheus}", f"--metrics={metrics}",
              f"--start={int(start)}", f"--end={int(end)}", "--step=1s", f"--out={out}", "--no_progress",
              "--overwrite"], out.parent / f"export-{out.name}.log", nice)


def scrape_detector(port: int) -> dict[str, float]:
    import requests
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def wait_metric(port: int, ok, timeout: float, what: str, process) -> dict[str, float]:
    """Poll the detector's /metrics until ok(metrics) (RuntimeError after timeout or if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"detect_live.py exited with {process.returncode} waiting for {what}")
        try:
            m = scrape_detector(port)
            if ok(m):
                return m
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def events(live_log: Path) -> list[dict]:
    return [json.loads(line) for line in live_log.read_text().splitlines()] if live_log.is_file() else []


class Laps(dict):
    """Seconds each phase took, in order: laps.done("train") closes the phase that began at the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.t = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self[phase], self.t = round(now - self.t, 1), now


def inject(fleet: "Fleet", faults: dict[str, str], fault_s: float, port: int, process, alertmanager: str,
           live_log: Path, when_over=None) -> dict:
    """Faults on their services at once (service -> kind) for fault_s seconds, then until every
    one's alert resolves -> each fault's report (caught; the delay in steps from its first grid
    point to the first anomalous event's window; the metric named first; its alert's state
    changes), the other services' alarms meanwhile and the posts Alertmanager received.
    when_over: called once the faults end (while the alerts resolve)."""
    before, seen = alerts_received(alertmanager), len(events(live_log))
    start = time.time()
    fleet.exporter.faults.update(faults)
    time.sleep(fault_s)
    for target in faults:
        fleet.exporter.faults.pop(target)
    if when_over is not None:
        when_over()
    for target in faults:
        wait_metric(port, lambda m: m[f'puad_alert{{entity="{target}"}}'] == 0, 120, f"{target}'s alert to resolve",
                    process)
    time.sleep(2)  # the resolved posts reach Alertmanager
    new, after = events(live_log)[seen:], alerts_received(alertmanager)
    report = []
    for target, kind in faults.items():
        changes = [e for e in new if e["entity"] == target]
        raised = [e for e in changes if e["state"] == "anomalous"]
        first = raised[0] if raised else None
        report.append({"kind": kind, "target": target, "caught": first is not None,
                       "delay_steps": first["window_end_unix"] - math.ceil(start) if first else None,
                       "named_first": first["top_features"][0] if first else None,
                       "named_right": bool(first) and first["top_features"][0] in EXPECTED[kind],
                       "raised": len(raised), "resolved": len(changes) - len(raised)})
    return {"faults": report, "fault_s": fault_s,
            "others_raised": sum(e["state"] == "anomalous" and e["entity"] not in faults for e in new),
            "firing_posts": after["firing"] - before["firing"],
            "resolved_posts": after["resolved"] - before["resolved"]}


def quiet_fleet(out: Path, record_s: float = 1800, run_s: float = 1800, fault_s: float = 30, n: int = 3,
                train_args: tuple[str, ...] = (), holds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """The quiet fleet: n synthetic services scraped every second by a real Prometheus, record_s
    seconds of their normal data recorded once their rates settle, then quiet_run. Its report
    is also written to out/quiet.json."""
    import lab
    if n < 2:
        raise ValueError("the quiet fleet needs 2 services or more (one fault each on the first two)")
    out.mkdir(parents=True, exist_ok=True)
    names = service_names(n)
    with Fleet(names, out, scrape_s=1) as fleet:
        t_rec = fleet.started + SETTLE_S
        lab.sleep_until(t_rec + record_s + 2, fleet.procs)
        report = quiet_run(fleet, names, out, t_rec, t_rec + record_s, run_s, fault_s, train_args, holds)
    (out / "quiet.json").write_text(json.dumps(report, indent=2))
    return report


def quiet_run(fleet: "Fleet", names: list[str], out: Path, rec_start: float, rec_end: float, run_s: float,
              fault_s: float, train_args: tuple[str, ...] = (), holds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """The quiet fleet on a running Fleet, as a user goes from Prometheus to alerts: the services'
    normal data of [rec_start, rec_end] exported (export_metrics.py) and trained on
    (train_safe.py); detect_live.py run for run_s seconds of normal running with --webhook to a
    real Alertmanager; a CPU fault on the first service and a latency fault on the second, both
    at once for fault_s seconds; SIGTERM. Meanwhile (once the faults end) the preview: test.py
    on the normal run under each alarm hold in `holds`. The report: false alarms of the normal
    run, each fault's delay and first-named metric, the posts Alertmanager received during the
    faults and the alerts it still holds after the detector stopped, the preview's alarm events,
    and the seconds of each phase."""
    laps = Laps()
    alertmanager = start_alertmanager(fleet.procs, out)
    try:
        metric_set = yaml.safe_load((ROOT / "labshop" / "metrics-lab.yaml").read_text())
        metric_set.update(services=names, rate_window=f"{RATE_WINDOW_S}s")
        (out / "metrics.yaml").write_text(yaml.safe_dump(metric_set, sort_keys=False))
        export(fleet.prometheus, out / "metrics.yaml", rec_start, rec_end, out / "data")
        laps.done("export")
        run_step([sys.executable, "train_safe.py", f"--data={out / 'data'}", f"--ckpt={out / 'puad.ckpt'}",
                  f"--loss_csv={out / 'loss.csv'}", "--num_threads=1", *train_args], out / "train.log")
        laps.done("train")
        report = detect(fleet, out, names, alertmanager, run_s, fault_s, holds, laps)
    finally:
        fleet.procs.stop_matching(("detect_live", "alertmanager"))
    report.update(record_minutes=(rec_end - rec_start) / 60, seconds=laps)
    return report


def detect(fleet: "Fleet", out: Path, names: list[str], alertmanager: str, run_s: float, fault_s: float,
           holds: tuple[int, ...], laps: Laps) -> dict:
    """detect_live.py on the fleet (as a user runs it): run_s seconds of normal running, the two
    faults, SIGTERM; the preview (test.py on the normal run) beside the faults' end -> the report."""
    port, live_log = free_port(), out / "live_events.jsonl"
    live_log.unlink(missing_ok=True)
    process = fleet.procs.spawn([sys.executable, "detect_live.py", f"--ckpt={out / 'puad.ckpt'}",
                                 f"--data={out / 'data'}", f"--metrics_file={out / 'metrics.yaml'}",
                                 f"--prometheus={fleet.prometheus}", f"--port={port}", f"--live_log={live_log}",
                                 f"--webhook={alertmanager}/api/v2/alerts", "--num_threads=1"],
                                "detect_live")
    wait_metric(port, lambda m: all(m.get(f'puad_windows_scored_total{{entity="{s}"}}', 0) >= 1 for s in names),
                600, "a scored window of every service", process)
    laps.done("detector_start")
    start = time.time()
    time.sleep(run_s)
    end = time.time()
    laps.done("normal")
    normal = [e for e in events(live_log) if start <= e["window_end_unix"] < end]
    with ThreadPoolExecutor(1) as pool:
        previews = []
        faults = inject(fleet, {names[0]: "cpu", names[1]: "latency"}, fault_s, port, process, alertmanager, live_log,
                        lambda: previews.append(pool.submit(preview, fleet.prometheus, out, start, end, holds)))
        laps.done("faults")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        time.sleep(1)
        report = {"services": names, "normal_start": start, "normal_end": end, "normal_minutes": (end - start) / 60,
                  "false_alarms": sum(e["state"] == "anomalous" for e in normal), "state_changes": len(normal),
                  **faults, "detector_exit": code, "active_after_stop": sorted(active_alerts(alertmanager)),
                  "received_total": alerts_received(alertmanager)}
        laps.done("stop")
        report["preview"] = previews[0].result() if previews else {}
        laps.done("preview_wait")
    return report


def preview(prometheus: str, out: Path, start: float, end: float, holds: tuple[int, ...]) -> dict:
    """test.py's preview of the normal run: the recording's train.csv beside the normal run as an
    unlabelled test.csv (the detector's calibration), under each alarm hold -> the alarm events
    (and per entity-day) test.py predicts, to set beside the detector's. The test rows start
    PREVIEW_LEAD_S before the normal run and only events from its start are counted: test.py
    scores a series' first seq_len - 1 points with its first window, which the detector, with
    the rows before them in Prometheus, never does. At a lower CPU priority than the detector
    it runs beside."""
    import pandas as pd

    from config import Config
    from metrics import held_alarms, segments
    if not holds:
        return {}
    export(prometheus, out / "metrics.yaml", start - PREVIEW_LEAD_S, end, out / "run-export", nice=10)
    for folder in sorted((out / "run-export").iterdir()):
        (out / "run" / folder.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "data" / folder.name / "train.csv", out / "run" / folder.name / "train.csv")
        shutil.copy(folder / "train.csv", out / "run" / folder.name / "test.csv")
    got, clear = {}, Config().alarm_clear
    for hold in holds:
        res = out / f"preview-hold{hold}"
        run_step([sys.executable, "test.py", f"--ckpt={out / 'puad.ckpt'}", f"--data={out / 'run'}",
                  f"--out_dir={res}", "--plots=False", "--num_threads=1", f"--alarm_hold={hold}"],
                 out / f"preview-hold{hold}.log", nice=10)
        starts = []  # of the alarm events test.py reports (scores_<entity>.csv's predictions, held and cleared)
        for f in sorted(res.glob("scores_*.csv")):
            rows = pd.read_csv(f)
            ts = rows["timestamp"].to_numpy()
            starts += [float(ts[a]) for a, _ in segments(held_alarms(rows["prediction"].to_numpy(), hold, clear))]
        n = sum(t >= start for t in starts)
        days = len(list(res.glob("scores_*.csv"))) * (end - start) / 86400
        got[hold] = {"alarm_events": n, "per_entity_day": n / days, "before_start": len(starts) - n,
                     "warned_short_history": "SPOT extrapolates" in (out / f"preview-hold{hold}.log").read_text()}
    return got


def main(argv: list[str] | None = None) -> None:
    """Serve a fleet's metrics until killed (Fleet(external=True) starts this), or --quiet: run the
    quiet fleet and print its report."""
    parser = argparse.ArgumentParser(prog="fleetsim.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", help="file of service names, one a line (the exporter)")
    parser.add_argument("--port", type=int, help="the exporter's port")
    parser.add_argument("--seed", type=int, default=0, help="seed of the services' noise and faults (default 0)")
    parser.add_argument("--faults", default="", help="service=kind,... (kind: cpu, latency, down)")
    quiet = parser.add_argument_group("the quiet fleet (--quiet; docs/live.md)")
    quiet.add_argument("--quiet", action="store_true", help="run the quiet fleet end to end and report")
    quiet.add_argument("--out", default="res_hr/quiet", help="its folder (default res_hr/quiet)")
    quiet.add_argument("--record_min", type=float, default=30, help="minutes of normal data to train on (default 30)")
    quiet.add_argument("--run_min", type=float, default=30, help="minutes of normal running (default 30)")
    quiet.add_argument("--fault_s", type=float, default=30, help="seconds of the two faults (default 30)")
    quiet.add_argument("--n_services", type=int, default=3, help="services of the fleet, 2 or more (default 3)")
    quiet.add_argument("--train_args", default="", help="more options of train_safe.py, e.g. '--val_frac=0.3'")
    args = parser.parse_args(argv)
    if args.quiet:
        if args.n_services < 2:
            parser.error(f"--n_services={args.n_services}: the quiet fleet needs 2 or more (a fault on each of two)")
        report = quiet_fleet(Path(args.out), 60 * args.record_min, 60 * args.run_min, args.fault_s, args.n_services,
                             tuple(shlex.split(args.train_args)))
        print(json.dumps(report, indent=2))
        return
    if not args.services or args.port is None:
        parser.error("the exporter needs --services and --port (or give --quiet)")
    exporter = Exporter(Path(args.services).read_text().split(), args.seed)
    exporter.faults.update(dict(item.split("=", 1) for item in args.faults.split(",") if item))
    exporter.start(args.port)
    exporter.thread.join()


if __name__ == "__main__":
    main()
