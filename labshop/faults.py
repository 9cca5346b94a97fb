"""Fault schedule and injection for the local lab (loaded by lab.py from this file).

Kinds and what they do to a target service (catalogue or payment), with the names of the
cluster runner's fault log (chaos/inject.py):
  cpu-stress     `stress-ng --cpu N --taskset CORE` on the core the target is pinned to; the
                 stress-ng process group is attached to the target's "pod", so its CPU shows in
                 the target's pod_cpu_seconds_total (as Chaos Mesh's stress shows in the
                 container's cgroup)
  memory-stress  `stress-ng --vm 1 --vm-bytes B --vm-hang 0` (allocates B, then holds it
                 without burning CPU), attached to the target's pod the same way
  pod-failure    SIGSTOP of the target process, SIGCONT at the end: scrapes fail (up = 0) and
                 its callers time out
  network-delay  the target delays every answer by --delay_ms (+-20 %), switched on and off
                 through its /admin/delay endpoint. tc netem is not used: the lab runs
                 everything on loopback and not every kernel has sch_netem.
Every stress-ng also gets --timeout (fault duration + 15 s) as a safety net.
"""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time
import urllib.request
from typing import Callable

KINDS = ("cpu-stress", "memory-stress", "pod-failure", "network-delay")
TARGETS = ("catalogue", "payment")


class FaultError(Exception):
    """A schedule or fault the lab cannot use."""


def parse_schedule(text: str) -> list[tuple[str, str]]:
    """'cpu-stress:catalogue,pod-failure:payment' -> [(kind, target), ...] in that order."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, target = item.partition(":")
        if kind not in KINDS or target not in TARGETS:
            raise FaultError(f"bad schedule entry {item!r}: use KIND:TARGET with KIND in "
                             f"{', '.join(KINDS)} and TARGET in {', '.join(TARGETS)}")
        pairs.append((kind, target))
    if not pairs:
        raise FaultError("empty fault schedule")
    return pairs


def make_schedule(pairs: list[tuple[str, str]] | None, test_seconds: float, seed: int,
                  shuffle: bool = True) -> list[dict]:
    """Spread the faults over the test period: one equal slot per fault; inside its slot a
    fault starts after a normal gap of 20-35 % of the slot and lasts 35-50 % of it, so
    there is normal time between any two faults. -> [{'kind', 'target', 'offset' (s from the
    start of the test period), 'duration' (s), 'name'}] ordered by offset."""
    rng = random.Random(seed)
    pairs = list(pairs) if pairs else [(k, t) for k in KINDS for t in TARGETS]
    if shuffle:
        rng.shuffle(pairs)
    slot = test_seconds / len(pairs)
    if slot < 8:
        raise FaultError(f"{len(pairs)} faults do not fit in a {test_seconds:.0f}s test period "
                         "(need at least 8 s per fault): give more --minutes or fewer faults")
    schedule = []
    for i, (kind, target) in enumerate(pairs):
        gap = slot * rng.uniform(0.20, 0.35)
        duration = slot * rng.uniform(0.35, 0.50)
        schedule.append({"kind": kind, "target": target, "offset": round(i * slot + gap, 1),
                         "duration": round(duration, 1), "name": f"{kind}-{target}-{i + 1}"})
    return schedule


def _admin(url: str, action: str, **params: object) -> None:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = urllib.request.Request(f"{url}/admin/{action}?{query}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


class Injector:
    """Starts and stops one fault at a time. `spawn(cmd)` must start a tracked process in
    its own process group and return its Popen (lab.py's process tracker)."""

    def __init__(self, services: dict, spawn: Callable[..., subprocess.Popen],
                 cpu_workers: int = 1, vm_bytes: str = "256M", delay_ms: float = 150.0,
                 say: Callable[[str], None] = print) -> None:
        self.services = services  # name -> {'pid', 'url', 'cpu' (core or None)}
        self.spawn = spawn
        self.cpu_workers = cpu_workers
        self.vm_bytes = vm_bytes
        self.delay_ms = delay_ms
        self.say = say

    def start(self, fault: dict) -> dict:
        """Inject `fault` -> a handle for stop()."""
        kind, service = fault["kind"], self.services[fault["target"]]
        timeout = f"{math.ceil(fault['duration'] + 15)}s"
        handle = {"fault": fault, "process": None}
        if kind in ("cpu-stress", "memory-stress"):
            if kind == "cpu-stress":
                command = ["stress-ng", "--cpu", str(self.cpu_workers), "--cpu-load", "100"]
                if service.get("cpu") is not None:
                    command += ["--taskset", str(service["cpu"])]
            else:
                command = ["stress-ng", "--vm", "1", "--vm-bytes", self.vm_bytes, "--vm-hang", "0"]
            command += ["--timeout", timeout, "--quiet"]
            process = self.spawn(command, name=f"stress-ng ({fault['name']})")
            handle["process"] = process
            _admin(service["url"], "attach", pgid=process.pid)
        elif kind == "pod-failure":
            os.kill(service["pid"], signal.SIGSTOP)
        elif kind == "network-delay":
            _admin(service["url"], "delay", ms=self.delay_ms)
        else:
            raise FaultError(f"unknown fault kind {kind!r}")
        return handle

    def stop(self, handle: dict) -> None:
        """End the fault of `handle` (safe to call during cleanup, and more than once)."""
        if handle.get("stopped"):
            return
        handle["stopped"] = True
        kind, service = handle["fault"]["kind"], self.services[handle["fault"]["target"]]
        if kind == "pod-failure":
            try:
                os.kill(service["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
        elif kind == "network-delay":
            _admin(service["url"], "delay", ms=0)
        elif handle["process"] is not None:
            process = handle["process"]
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            time.sleep(0.2)  # let its workers go before the pod stops counting their memory
            try:
                _admin(service["url"], "detach", pgid=process.pid)
            except OSError:
                pass
