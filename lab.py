#!/usr/bin/env python3
"""Local chaos lab: real services, real Prometheus, real faults, no Kubernetes.

    python lab.py --minutes=40 --scrape=1s --out=Dataset/lab --overwrite  # re-record a dataset
    python lab.py --ci --out=/tmp/lab                             # about a minute, 2 faults

Starts, all on 127.0.0.1 and each in its own process group:
  - the shop (labshop/shop.py): front-end -> catalogue (SQLite) and payment, and a load
    generator whose rate follows a slow cycle plus a wandering random factor;
  - node_exporter and Prometheus (generated config, temporary storage in the run folder)
    scraping every service every --scrape;
then runs: warm-up (scrapes settle, every target must be up) -> normal period (train) ->
test period playing a seeded random fault schedule (labshop/faults.py: cpu-stress,
memory-stress, pod-failure, network-delay on catalogue and payment, with normal gaps),
writing the fault log as it goes -> stops the shop -> exports the recording with
export_metrics.export() and labshop/metrics-lab.yaml into OUT/<service>/{train,test,
test_label}.csv, copies the fault log to OUT/faults.csv and writes OUT/lab_run.json ->
stops Prometheus. Every process it started is stopped at the end, also on Ctrl-C, SIGTERM,
SIGHUP or an error (SIGCONT + SIGTERM to its process group, SIGKILL after 5 s); children
also get SIGKILL if lab.py itself dies (PR_SET_PDEATHSIG).

Labels (--label_scope): target+front-end (default): a fault labels its target and the
front-end, which calls both targets; target: only the target; all: every service.

From Python: `import lab; summary = lab.run(["--ci", "--out", "/tmp/x"])`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import requests
import yaml

import export_metrics
import faultlog
from labshop import faults
from prometheus import parse_step

ROOT = Path(__file__).resolve().parent
LAB = ROOT / "labshop"

PROG = "lab.py"
SERVICES = ("front-end", "catalogue", "payment")
BINARIES = ("prometheus", "prometheus-node-exporter", "stress-ng")
CI_DEFAULTS = {"minutes": 1.1, "scrape": "1s", "warmup": 8.0, "train_fraction": 0.4,
               "period": 30.0, "schedule": "cpu-stress:catalogue,pod-failure:catalogue"}


class LabError(Exception):
    """A problem that stops the lab; printed as one line."""


class Stopped(KeyboardInterrupt):
    """Raised by the SIGTERM/SIGHUP handler."""


def say(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[lab {stamp}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ci", action="store_true",
                        help="short run for CI: --minutes=1.1 --scrape=1s --warmup=8 "
                             "--schedule=cpu-stress:catalogue,pod-failure:catalogue")
    parser.add_argument("--minutes", type=float, help="whole run: warm-up + train + test "
                        "(default 40)")
    parser.add_argument("--scrape", help="Prometheus scrape interval (default 1s)")
    parser.add_argument("--step", help="export grid step (default: the scrape interval)")
    parser.add_argument("--rate_window", help="range of rate() in the metric set (default "
                        "5 x scrape interval)")
    parser.add_argument("--warmup", type=float, help="seconds before the recording starts "
                        "(default 30)")
    parser.add_argument("--train_fraction", type=float,
                        help="share of the time after warm-up that is normal/train (default 0.5)")
    parser.add_argument("--schedule", help="faults in order, KIND:TARGET,... (default: every "
                        "kind on every target, shuffled by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="fault order and timing, load noise")
    parser.add_argument("--rate", type=float, default=10.0, help="mean requests/s (default 10)")
    parser.add_argument("--period", type=float, help="load cycle in seconds (default 300)")
    parser.add_argument("--cpu_workers", type=int, default=1, help="stress-ng --cpu N")
    parser.add_argument("--vm_bytes", default="256M", help="stress-ng --vm-bytes (default 256M)")
    parser.add_argument("--delay_ms", type=float, default=150.0,
                        help="network-delay: added to every answer of the target (default 150)")
    parser.add_argument("--label_scope", choices=("target+front-end", "target", "all"),
                        default="target+front-end")
    parser.add_argument("--label_margin", type=float, default=0.0, help="seconds, both sides")
    parser.add_argument("--out", default=str(ROOT / "Dataset" / "lab"), help="dataset folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out whole (refused at start-up without this)")
    parser.add_argument("--run_dir", help="config, logs, SQLite and TSDB of this run "
                        "(default lab_runs/<UTC time>)")
    parser.add_argument("--keep_tsdb", action="store_true",
                        help="keep Prometheus' storage in the run folder")
    parser.add_argument("--no_progress", action="store_true", help="no export progress bar")
    args = parser.parse_args(argv)
    defaults = {"minutes": 40.0, "scrape": "1s", "warmup": 30.0, "train_fraction": 0.5,
                "period": 300.0, "schedule": None}
    if args.ci:
        defaults.update(CI_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the lab's thread that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Processes:
    """Every process the lab starts: own process group, output to a log file, stopped in
    reverse order by stop_all()."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, command: list[str], name: str) -> subprocess.Popen:
        log_name = name.split(" ")[0].replace("/", "_")
        log = open(self.log_dir / f"{log_name}.log", "ab")
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent, cwd=ROOT)
        except OSError as e:
            raise LabError(f"cannot start {name} ({command[0]}): {e.strerror}") from None
        finally:
            log.close()
        self.started.append((name, process))
        say(f"started {name} (pid {process.pid})")
        return process

    def pids(self) -> list[int]:
        return [p.pid for _, p in self.started]

    def check(self) -> None:
        """Raise if a long-running process (not stress-ng) has exited."""
        for name, process in self.started:
            if not name.startswith("stress-ng") and process.poll() is not None:
                raise LabError(f"{name} (pid {process.pid}) exited with {process.returncode}; "
                               f"see {self.log_dir}")

    def stop(self, name: str, process: subprocess.Popen) -> None:
        if process.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGTERM):  # a paused process needs CONT first
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                say(f"{name} (pid {process.pid}) ignored SIGTERM; SIGKILL")
        try:  # whatever is left of its group (stress-ng workers, ...)
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait(timeout=10)

    def stop_matching(self, names: tuple[str, ...]) -> None:
        for name, process in reversed(self.started):
            if name in names:
                self.stop(name, process)

    def stop_all(self) -> None:
        for name, process in reversed(self.started):
            try:
                self.stop(name, process)
            except Exception as e:  # keep stopping the others
                say(f"could not stop {name} (pid {process.pid}): {e}")
        alive = [p.pid for _, p in self.started if p.poll() is None]
        say(f"stopped {len(self.started) - len(alive)} of {len(self.started)} processes"
            + (f"; still running: {alive}" if alive else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, what: str, processes: Processes) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        processes.check()
        if time.monotonic() > deadline:
            raise LabError(f"{what} did not answer at {url} within {timeout:.0f}s")
        time.sleep(0.2)


def sleep_until(moment: float, processes: Processes) -> None:
    while True:
        left = moment - time.time()
        if left <= 0:
            return
        processes.check()
        time.sleep(min(left, 1.0))


def prometheus_config(scrape_s: int, targets: dict[str, int], node_port: int) -> str:
    config = {
        "global": {"scrape_interval": f"{scrape_s}s", "scrape_timeout": f"{scrape_s}s",
                   "evaluation_interval": f"{scrape_s}s"},
        "scrape_configs": [
            {"job_name": "shop", "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}}
                for name, port in targets.items()]},
            {"job_name": "node", "static_configs": [
                {"targets": [f"127.0.0.1:{node_port}"], "labels": {"service": "node"}}]},
        ],
    }
    return "# generated by lab.py\n" + yaml.safe_dump(config, sort_keys=False)


def query_up(prometheus: str) -> dict[str, float]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": "up"}, timeout=5)
    response.raise_for_status()
    return {r["metric"].get("service", r["metric"].get("instance", "?")): float(r["value"][1])
            for r in response.json()["data"]["result"]}


# ---------------------------------------------------------------- run

def run(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Run the lab (see the module docstring) -> summary dict (also OUT/lab_run.json).
    Raises LabError, faultlog.ExportError, faults.FaultError or KeyboardInterrupt;
    every started process is stopped before it returns or raises."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    plan = plan_run(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(args.run_dir or ROOT / "lab_runs" / stamp).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    fault_log = run_dir / "faults.csv"
    fault_log.unlink(missing_ok=True)
    processes = Processes(run_dir / "logs")
    summary: dict = {"command": " ".join([PROG] + (sys.argv[1:] if Path(sys.argv[0]).name == PROG
                                                    else [])),
                     "args": vars(args), "run_dir": str(run_dir), "out": str(out),
                     "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                              "kernel": platform.release(), "python": platform.python_version()},
                     "scrape_s": plan["scrape_s"], "step_s": plan["step_s"], "rate_window": plan["rate_window"],
                     "network_delay": "app (/admin/delay)", "schedule": plan["schedule"],
                     "loadavg_start": os.getloadavg(), "pids": [], "stopped": False}

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def stop_handler(signum, frame):
            raise Stopped(signal.Signals(signum).name)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, stop_handler)
    faulting: dict = {"injector": None, "active": None, "start": 0.0}  # the fault in flight, for clean_up
    try:
        say(f"run folder {run_dir}; {args.minutes * 60:.0f}s: warm-up {args.warmup:.0f}s, train "
            f"{plan['train_s']:.0f}s, test {plan['test_s']:.0f}s with {len(plan['schedule'])} fault(s); scrape "
            f"{plan['scrape_s']}s, step {plan['step_s']}s, rate window {plan['rate_window']}")
        services, prom_url = start_lab(args, run_dir, processes)
        summary.update(services=services, prometheus=prom_url, pids=processes.pids())
        summary["up_before_faults"] = warm_up(args, prom_url, processes, plan["scrape_s"])
        times = play_schedule(args, plan, services, processes, fault_log, summary, faulting)
        processes.stop_matching(("loadgen", "front-end", "catalogue", "payment", "node_exporter"))
        export_recording(args, plan, prom_url, times, fault_log, out, summary)
    finally:
        clean_up(args, processes, run_dir, fault_log, summary, faulting, old_handlers)
    (out / "lab_run.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    say(f"done: {out} (fault log {out / 'faults.csv'}, summary {out / 'lab_run.json'})")
    return summary


def plan_run(args: argparse.Namespace) -> dict:
    """Check what can be checked before anything starts; the run's steps, periods, fault schedule
    and metric set."""
    export_metrics.check_out(args.out, args.overwrite)  # before a recording that would be lost
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise LabError(f"missing program(s) {', '.join(missing)}: apt-get install prometheus "
                       "prometheus-node-exporter stress-ng")
    scrape_s = parse_step(args.scrape)
    step_s = parse_step(args.step or args.scrape)
    rate_window = args.rate_window or f"{5 * scrape_s}s"
    recorded = args.minutes * 60 - args.warmup
    if args.warmup < parse_step(rate_window) + scrape_s or recorded <= 0:
        raise LabError(f"--warmup ({args.warmup:.0f}s) must exceed the rate window "
                       f"({rate_window}) by a scrape, and --minutes must leave time after it")
    train_s = round(recorded * args.train_fraction)
    test_s = recorded - train_s
    pairs = faults.parse_schedule(args.schedule) if args.schedule else None
    schedule = faults.make_schedule(pairs, test_s, args.seed, shuffle=pairs is None)
    metric_set = yaml.safe_load((LAB / "metrics-lab.yaml").read_text())
    metric_set["rate_window"] = rate_window
    return dict(scrape_s=scrape_s, step_s=step_s, rate_window=rate_window, train_s=train_s, test_s=test_s,
                schedule=schedule, metric_set=metric_set)


def start_lab(args: argparse.Namespace, run_dir: Path, processes: Processes) -> tuple[dict, str]:
    """Start the shop, node_exporter, Prometheus and the load generator -> (services, Prometheus URL)."""
    scrape_s = parse_step(args.scrape)
    cpus = sorted(os.sched_getaffinity(0))
    cores = {"catalogue": cpus[-1], "payment": cpus[0]}
    ports = {name: free_port() for name in SERVICES}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    shop = [sys.executable, str(LAB / "shop.py")]
    services = {}
    for name in ("catalogue", "payment", "front-end"):
        command = shop + [name, "--port", str(ports[name]), "--seed", str(args.seed)]
        if name in cores:
            command += ["--cpu", str(cores[name])]
        if name == "catalogue":
            command += ["--db", str(run_dir / "catalogue.sqlite")]
        if name == "front-end":
            command += ["--catalogue", urls["catalogue"], "--payment", urls["payment"]]
        process = processes.spawn(command, name)
        services[name] = {"pid": process.pid, "url": urls[name], "port": ports[name],
                          "cpu": cores.get(name)}
    for name in services:
        wait_http(urls[name] + "/health", 30, name, processes)
    node_port, prom_port = free_port(), free_port()
    processes.spawn(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{node_port}",
                     "--collector.disable-defaults", "--collector.cpu", "--collector.loadavg",
                     "--collector.meminfo", "--collector.stat"], "node_exporter")
    (run_dir / "prometheus.yml").write_text(prometheus_config(scrape_s, ports, node_port))
    prom_url = f"http://127.0.0.1:{prom_port}"
    processes.spawn(["prometheus", f"--config.file={run_dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={run_dir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}",
                     "--storage.tsdb.retention.time=2d"], "prometheus")
    wait_http(f"http://127.0.0.1:{node_port}/metrics", 30, "node_exporter", processes)
    wait_http(f"{prom_url}/-/ready", 60, "prometheus", processes)
    processes.spawn(shop + ["loadgen", "--target", urls["front-end"], "--rate", str(args.rate),
                            "--period", str(args.period), "--seed", str(args.seed)], "loadgen")
    say(f"prometheus {prom_url}, node_exporter :{node_port}, shop "
        + ", ".join(f"{n} :{p}" for n, p in ports.items()))
    return services, prom_url


def warm_up(args: argparse.Namespace, prom_url: str, processes: Processes, scrape_s: int) -> dict:
    """Wait the warm-up, then every target must be up -> Prometheus' `up` per target."""
    began = time.time()
    sleep_until(began + args.warmup, processes)
    deadline = time.time() + 20
    while True:
        up = query_up(prom_url)
        if all(up.get(n) == 1 for n in (*SERVICES, "node")) or time.time() > deadline:
            break
        time.sleep(scrape_s)
    down = [n for n in (*SERVICES, "node") if up.get(n) != 1]
    if down:
        raise LabError(f"target(s) {', '.join(down)} not up after the warm-up: {up}")
    say(f"all targets up: {up}")
    return up


def play_schedule(args: argparse.Namespace, plan: dict, services: dict, processes: Processes, fault_log: Path,
                  summary: dict, faulting: dict) -> dict:
    """The normal period (train), then the test period playing the fault schedule, each fault
    logged when it ends -> the run's times (also summary["times"])."""
    step_s, scrape_s = plan["step_s"], plan["scrape_s"]
    start = math.ceil(time.time() / step_s) * step_s
    train_end = start + plan["train_s"]
    end = train_end + round(plan["test_s"])
    summary["times"] = times = {"start": start, "train_end": train_end, "end": end,
                                "start_iso": faultlog.format_time(start),
                                "train_end_iso": faultlog.format_time(train_end),
                                "end_iso": faultlog.format_time(end)}
    say(f"normal period (train) {times['start_iso']} .. {times['train_end_iso']}")
    sleep_until(train_end, processes)

    say(f"test period until {times['end_iso']}: {len(plan['schedule'])} fault(s)")
    injector = faulting["injector"] = faults.Injector(services, processes.spawn, args.cpu_workers, args.vm_bytes,
                                                      args.delay_ms, say)
    for fault in plan["schedule"]:
        sleep_until(train_end + fault["offset"], processes)
        faulting["start"] = time.time()
        faulting["active"] = injector.start(fault)
        say(f"fault {fault['name']}: {fault['kind']} on {fault['target']} for "
            f"{fault['duration']:.0f}s")
        summary["pids"] = processes.pids()
        sleep_until(faulting["start"] + fault["duration"], processes)
        injector.stop(faulting["active"])
        faultlog.append_fault(fault_log, faulting["start"], math.ceil(time.time()),
                              fault["kind"], fault["target"], fault["name"])
        faulting["active"] = None
        say(f"fault {fault['name']} ended")
    sleep_until(end + 2 * scrape_s, processes)  # the last points are scraped
    return times


def export_recording(args: argparse.Namespace, plan: dict, prom_url: str, times: dict, fault_log: Path,
                     out: Path, summary: dict) -> None:
    """Export the recording with export_metrics.export() into OUT, copy the fault log beside it."""
    logged = faultlog.read_fault_log(fault_log)
    if args.label_scope == "target+front-end":
        label_faults = logged + [{**f, "target": "front-end"} for f in logged
                                 if f["target"] != "front-end"]
    else:
        label_faults = logged
    say(f"exporting {len(SERVICES)} services x {len(plan['metric_set']['metrics'])} columns to {out}")
    exported = export_metrics.export(
        prometheus=prom_url, metric_set_path=plan["metric_set"], start=times["start"], end=times["end"],
        step=plan["step_s"], out=out, train_end=times["train_end"], fault_log=label_faults,
        label_margin=args.label_margin,
        label_scope="all" if args.label_scope == "all" else "target",
        services=list(SERVICES), progress=not args.no_progress, overwrite=args.overwrite,
        interpretation_faults=logged)  # the front-end copies above get no interpretation
    shutil.copyfile(fault_log, out / "faults.csv")
    summary.update(faults=logged, export=exported)
    for name, info in exported["services"].items():
        say(f"{name}: {info['train_rows']} train rows, {info['test_rows']} test rows "
            f"({info['anomalous_rows']} labelled), {info['dropped_rows']} dropped")


def clean_up(args: argparse.Namespace, processes: Processes, run_dir: Path, fault_log: Path, summary: dict,
             faulting: dict, old_handlers: dict) -> None:
    """End a fault in flight (logged as interrupted), stop every process, restore the signal handlers;
    signals are ignored meanwhile."""
    ignore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            ignore[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        active, injector = faulting["active"], faulting["injector"]
        if active is not None and injector is not None:
            say(f"ending fault {active['fault']['name']} early")
            try:
                injector.stop(active)
            finally:
                faultlog.append_fault(fault_log, faulting["start"], math.ceil(time.time()),
                                      active["fault"]["kind"], active["fault"]["target"],
                                      active["fault"]["name"] + "-interrupted")
        processes.stop_all()
        summary["pids"] = processes.pids()
        summary["loadavg_end"] = os.getloadavg()
        summary["stopped"] = all(p.poll() is not None for _, p in processes.started)
        if not args.keep_tsdb:
            shutil.rmtree(run_dir / "tsdb", ignore_errors=True)
        (run_dir / "pids.txt").write_text("".join(f"{pid}\n" for pid in summary["pids"]))
    finally:
        for sig, handler in {**ignore, **old_handlers}.items():
            signal.signal(sig, old_handlers.get(sig, handler))


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (LabError, faultlog.ExportError, faults.FaultError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{PROG}: stopped ({e or 'SIGINT'})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
