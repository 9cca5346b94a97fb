"""A synthetic fleet for detect_live.py at scale: an exporter serving N services' lab metrics
(labshop/metrics-lab.yaml's series, each with a `service` label) and a real Prometheus on
loopback scraping it. Used by `bench.py --fleet=N` and tests/test_fleet.py.

    with Fleet(names, tmp_dir, scrape_s=1) as fleet:   # exporter + Prometheus, stopped at exit
        fleet.prometheus                                 # http://127.0.0.1:PORT
        fleet.exporter.faults["svc-0007"] = "cpu"        # a fault, from now on

Every series of a service is the lab's (shop_*, pod_*, process_*, and an `up` gauge per service,
since one exporter target stands for all of them); node_* come from /node (job "node").
Normal load: each service has its own request rate, latency, CPU and memory level with
+-10 % noise per scrape; faults: "cpu" (the pod uses one more core, the process 3x its CPU),
"latency" (8x the median latency), "down" (up = 0, no requests).
"""
from __future__ import annotations

import math
import argparse
import shutil
import sys
import socket
import threading
import time
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
        median = self.latency * np.where(kind == "latency", 8.0, 1.0)
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
                           f"shop_requests_total{lab} {self.requests[i]:.10g}\n"
                           f"shop_errors_total{lab} {self.errors[i]:.10g}\n"
                           + "".join(f'shop_request_duration_seconds_bucket{s},le="{"+Inf" if math.isinf(le) else le}"}} '
                                     f"{self.buckets[i, k]:.10g}\n" for k, le in enumerate(BUCKETS))
                           + f"pod_cpu_seconds_total{lab} {self.pod_cpu[i]:.10g}\n"
                           f"pod_memory_bytes{lab} {mem[i]:.8g}\n"
                           f"process_cpu_seconds_total{lab} {self.proc_cpu[i]:.10g}\n"
                           f"process_resident_memory_bytes{lab} {0.8 * mem[i]:.8g}\n"
                           f"process_threads{lab} {self.threads[i]:.0f}\n"
                           f"process_open_fds{lab} {self.fds[i]:.0f}\n")
            return "".join(out).encode()

    def render_node(self) -> bytes:
        with self.lock:
            u, s, i = self.node_cpu
            load = 1.0 + 0.1 * self.rng.standard_normal()
            return (f'node_cpu_seconds_total{{cpu="0",mode="user"}} {u:.10g}\n'
                    f'node_cpu_seconds_total{{cpu="0",mode="system"}} {s:.10g}\n'
                    f'node_cpu_seconds_total{{cpu="0",mode="idle"}} {i:.10g}\n'
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


def main(argv: list[str] | None = None) -> None:
    """Serve a fleet's metrics until killed (Fleet(external=True) starts this)."""
    parser = argparse.ArgumentParser(prog="fleetsim.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", required=True, help="file of service names, one a line")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default="", help="service=kind,... (kind: cpu, latency, down)")
    args = parser.parse_args(argv)
    exporter = Exporter(Path(args.services).read_text().split(), args.seed)
    exporter.faults.update(dict(item.split("=", 1) for item in args.faults.split(",") if item))
    exporter.start(args.port)
    exporter.thread.join()


if __name__ == "__main__":
    main()
