#!/usr/bin/env python3
"""Run a fault plan with Chaos Mesh and record when each fault really ran.

    python -m chaos.inject --plan chaos/plan-example.yaml --fault_log faults.csv
    python -m chaos.inject --plan chaos/plan-example.yaml --dry-run

For every plan entry, in order: `kubectl apply -f MANIFEST`, wait until Chaos Mesh reports
the fault injected (condition AllInjected, --inject_timeout), keep it for `duration` seconds,
`kubectl delete -f MANIFEST` (which returns once Chaos Mesh has recovered the pods), append
`start,end,kind,target,name` to the fault log, then wait `pause_after` seconds.

start = when the fault was confirmed injected (or when apply returned, if that could not be
confirmed), rounded down to the second; end = when delete returned, rounded up. A row is
written only when its fault has ended, in one flushed write, so the log is valid at every
moment. Ctrl-C (SIGINT) or SIGTERM deletes the fault in flight, logs it with its real end
time and exits with 130 / 143; further signals during that cleanup are deferred.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

try:
    from faultlog import FAULT_LOG_COLUMNS, ExportError, append_fault, format_time, prepare_fault_log
except ModuleNotFoundError:  # run as a file: the repository root is not on the path
    raise SystemExit("inject.py: error: run it from the repository root as `python -m chaos.inject ...`") from None

PROG = "inject.py"
PLAN_KEYS = {"manifest", "duration", "pause_after", "name"}
MAX_SECONDS = 1e6  # a plan entry's duration or pause: 11.6 days (time.sleep overflows far above)


class PlanError(Exception):
    """A plan or manifest the runner cannot use."""


class Stop(Exception):
    """Raised by the signal handler to leave the plan."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_go_duration(text: str) -> float:
    """Chaos Mesh / Go duration like '5m', '90s', '1h30m', '500ms' -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text).strip():
        raise PlanError(f"cannot read duration {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def fault_identity(manifest: dict, where: str = "manifest") -> tuple[str, str, str]:
    """Chaos Mesh manifest -> (fault kind for the log, target service, metadata.name)."""
    kind = manifest.get("kind")
    spec = manifest.get("spec") or {}
    if kind == "Schedule":
        raise PlanError(f"{where}: a Schedule runs faults on its own clock, so their times "
                        "cannot be logged; put the chaos itself in the plan")
    if kind == "StressChaos":
        stressors = [s for s in ("cpu", "memory") if s in (spec.get("stressors") or {})]
        if len(stressors) != 1:
            raise PlanError(f"{where}: StressChaos needs exactly one of stressors.cpu and "
                            "stressors.memory (split it into two manifests)")
        fault = f"{stressors[0]}-stress"
    elif kind == "PodChaos":
        if spec.get("action") != "pod-failure":
            raise PlanError(f"{where}: PodChaos action {spec.get('action')!r} is not supported "
                            "(only pod-failure)")
        fault = "pod-failure"
    elif kind == "NetworkChaos":
        if not (spec.get("action") == "delay" or (spec.get("action") == "netem" and "delay" in spec)):
            raise PlanError(f"{where}: NetworkChaos action {spec.get('action')!r} is not "
                            "supported (only delay)")
        fault = "network-delay"
    else:
        raise PlanError(f"{where}: kind {kind!r} is not supported (StressChaos, PodChaos, "
                        "NetworkChaos)")
    target = ((spec.get("selector") or {}).get("labelSelectors") or {}).get("name")
    if not target:
        raise PlanError(f"{where}: needs spec.selector.labelSelectors.name (the service)")
    name = (manifest.get("metadata") or {}).get("name")
    if not name:
        raise PlanError(f"{where}: needs metadata.name")
    return fault, str(target), str(name)


def load_plan(path: str | Path) -> list[dict]:
    """Read and check a plan -> entries {'manifest' (absolute Path), 'duration', 'pause_after',
    'kind', 'target', 'name'}. Manifest paths are relative to the plan's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PlanError(f"plan {path} is not a text (UTF-8) file") from None
    except yaml.YAMLError as e:
        raise PlanError(f"plan {path} is not valid YAML: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise PlanError(f"{path}: a plan is a non-empty YAML list of faults")
    plan = []
    for number, item in enumerate(raw, 1):
        where = f"{path} entry {number}"
        if not isinstance(item, dict) or not isinstance(item.get("manifest"), str):
            raise PlanError(f"{where}: needs 'manifest: FILE'")
        if set(item) - PLAN_KEYS:
            raise PlanError(f"{where}: unknown keys {sorted(set(item) - PLAN_KEYS)}")
        manifest_path = (path.parent / item["manifest"]).resolve()
        try:
            documents = [d for d in yaml.safe_load_all(manifest_path.read_text()) if d]
        except OSError as e:
            raise PlanError(f"{where}: cannot read {manifest_path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise PlanError(f"{where}: {manifest_path} is not a text (UTF-8) file") from None
        except yaml.YAMLError as e:
            raise PlanError(f"{where}: {manifest_path} is not valid YAML: {e}") from None
        if len(documents) != 1 or not isinstance(documents[0], dict):
            raise PlanError(f"{where}: {manifest_path} must hold exactly one manifest")
        kind, target, name = fault_identity(documents[0], str(manifest_path))
        limit = (documents[0].get("spec") or {}).get("duration")
        try:
            limit_s = parse_go_duration(limit) if limit else None
        except PlanError as e:
            raise PlanError(f"{where}: spec.duration: {e}") from None
        duration = item.get("duration", limit_s)
        pause = item.get("pause_after", 0)
        for key, value in (("duration", duration), ("pause_after", pause)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= MAX_SECONDS:
                raise PlanError(f"{where}: {key} must be a number of seconds in [0, {MAX_SECONDS:g}], got {value!r}")
        if duration <= 0:
            raise PlanError(f"{where}: duration must be > 0")
        if limit_s is not None and duration > limit_s:
            raise PlanError(f"{where}: duration {duration}s is longer than the manifest's "
                            f"spec.duration {limit} (Chaos Mesh would end the fault first)")
        plan.append({"manifest": manifest_path, "duration": float(duration),
                     "pause_after": float(pause), "kind": kind, "target": target,
                     "name": str(item.get("name") or name)})
    return plan


def print_plan(plan: list[dict]) -> None:
    total = 0.0
    for number, entry in enumerate(plan, 1):
        print(f"{number:3d}. {entry['kind']:<14} on {entry['target']:<12} {entry['duration']:7.0f}s"
              f" then pause {entry['pause_after']:5.0f}s  {entry['name']}  ({entry['manifest']})")
        total += entry["duration"] + entry["pause_after"]
    print(f"{len(plan)} faults, about {total / 60:.1f} minutes")


def run_plan(plan: list[dict], fault_log: str | Path, kubectl: str = "kubectl",
             inject_timeout: float = 60) -> int:
    """Apply, hold, delete and log every fault of the plan -> exit code (0, 1 when a kubectl
    call failed, 128 + signal number when stopped by SIGINT/SIGTERM). One function on purpose:
    the signal handler and the loop share `state`, and the invariant (a fault applied is deleted
    and logged before any exit) reads in one place."""
    # in_flight: (entry, start) from just before apply until the fault is logged
    state = {"cleaning": False, "pending": None, "in_flight": None}

    def on_signal(signum, frame):
        if state["cleaning"]:
            state["pending"] = signum  # finish deleting and logging first
        else:
            raise Stop(signum)

    def call(*args: str) -> int:
        # own session: a Ctrl-C in the terminal reaches only this script, which then
        # decides what to stop; the delete during cleanup cannot be killed by a second one
        return subprocess.run([kubectl, *args], start_new_session=True).returncode

    def finish() -> bool:
        """Delete the fault in flight and log it; signals meanwhile are deferred."""
        state["cleaning"] = True
        try:
            entry, start = state["in_flight"]
            deleted = call("delete", "-f", str(entry["manifest"]), "--ignore-not-found") == 0
            end = math.ceil(time.time())
            row = [format_time(math.floor(start)), format_time(end), entry["kind"], entry["target"], entry["name"]]
            state["in_flight"] = None
            logged = True
            try:
                append_fault(fault_log, *row)
                print(f"{PROG}: {entry['name']}: {row[0]} .. {row[1]} logged", flush=True)
            except ExportError as e:  # the fault ran: its times must not be lost
                logged = False
                print(f"{PROG}: error: {e}; add the fault's row ({','.join(FAULT_LOG_COLUMNS)}) by hand: "
                      f"{','.join(row)}", file=sys.stderr, flush=True)
            if not deleted:
                print(f"{PROG}: error: kubectl delete failed; the fault may still be active: "
                      f"kubectl delete -f {entry['manifest']}", file=sys.stderr)
            return deleted and logged
        finally:
            state["cleaning"] = False

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for number, entry in enumerate(plan, 1):
            print(f"{PROG}: [{number}/{len(plan)}] applying {entry['name']} "
                  f"({entry['kind']} on {entry['target']})", flush=True)
            # until injection is confirmed, the fault counts from the apply
            state["in_flight"] = (entry, time.time())
            if call("apply", "-f", str(entry["manifest"])) != 0:
                state["in_flight"] = None
                call("delete", "-f", str(entry["manifest"]), "--ignore-not-found")
                print(f"{PROG}: error: kubectl apply -f {entry['manifest']} failed",
                      file=sys.stderr)
                return 1
            if inject_timeout > 0:
                if call("wait", "--for=condition=AllInjected", f"--timeout={inject_timeout:g}s",
                        "-f", str(entry["manifest"])) == 0:
                    state["in_flight"] = (entry, time.time())
                else:
                    print(f"{PROG}: warning: could not confirm that {entry['name']} was "
                          "injected; logging it from the apply", file=sys.stderr)
            start = state["in_flight"][1]
            time.sleep(max(0.0, start + entry["duration"] - time.time()))
            if not finish():
                return 1
            if state["pending"]:
                raise Stop(state["pending"])
            if entry["pause_after"] > 0:
                time.sleep(entry["pause_after"])
        return 0
    except Stop as stop:
        print(f"{PROG}: {stop}: stopping", file=sys.stderr)
        if state["in_flight"] is not None:
            finish()
        return 128 + stop.signum
    except BaseException:  # whatever goes wrong, a fault applied is deleted and logged
        if state["in_flight"] is not None:
            finish()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="plan YAML (see chaos/plan-example.yaml)")
    parser.add_argument("--fault_log", default="faults.csv",
                        help="fault log CSV to append to (default %(default)s)")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl to call (default %(default)s)")
    parser.add_argument("--inject_timeout", type=float, default=60,
                        help="seconds to wait for Chaos Mesh to report a fault injected; "
                             "0 to not wait (default %(default)s)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the plan and exit; calls nothing")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.inject_timeout) and args.inject_timeout >= 0):
        parser.error(f"--inject_timeout={args.inject_timeout}: must be a number of seconds >= 0")
    try:
        plan = load_plan(args.plan)
    except PlanError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print_plan(plan)
    if args.dry_run:
        return 0
    if shutil.which(args.kubectl) is None:
        print(f"{PROG}: error: kubectl not found at {args.kubectl!r} (use --kubectl PATH)",
              file=sys.stderr)
        return 1
    try:  # before any fault runs: a log that cannot be written would lose the faults' times
        prepare_fault_log(args.fault_log)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    first = time.time()
    try:
        code = run_plan(plan, args.fault_log, args.kubectl, args.inject_timeout)
    except ExportError as e:  # the fault log could not be written
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: fault log: {args.fault_log}; export with e.g.\n  python export_metrics.py "
          f"--end {format_time(time.time())} --fault_log {args.fault_log} --out Dataset/NAME "
          f"--start <start of the normal-traffic period, before {format_time(first)}>")
    return code


if __name__ == "__main__":
    sys.exit(main())
