#!/usr/bin/env python3
r"""Live anomaly detection: poll Prometheus, score every service's last window with a PUAD
checkpoint, serve the results as Prometheus metrics and raise alerts (docs/live.md).

    python detect_live.py --ckpt=checkpoints/puad.ckpt --entities=catalogue,payment \
        --prometheus=http://127.0.0.1:9090 --metrics_file=labshop/metrics-lab.yaml \
        --port=9109 --num_threads=1 [--webhook=URL] [--fixed_threshold=NUMBER]

Every --live_step seconds (the step of the checkpoint's training rows, its step_s; another is
refused, one line) one query per column of the metric set, for all entities at once (the
$service matcher turned into a regex, the answer split by the service label), fetches the last
seq_len + smooth - 1 grid points of every entity (= the metric set's $service), and before them
--level_window's worth where the checkpoint has level gauges (their recent level), its columns
matched BY NAME to the checkpoint's features; rows already fetched are kept. Each entity's rows
are scaled with its scaler (its local file's when adapted, else the checkpoint's) and scored in
one batch as test.py scores a point (the score of the window ending at it, smoothed over the
last `smooth`); its threshold is test.py's (puad.calibrate_entity on its train series in --data,
SPOT at --alarm_budget, then the drift guard), or --fixed_threshold. --shard=I/N keeps the
entities whose name hashes to I modulo N (Prometheus' hashmod); a shard with none idles and
serves /metrics.

Alerts: an entity's alert fires once its score has been above its threshold for --alarm_hold
polls in a row (Prometheus' for:) and resolves after --alarm_clear polls in a row at or below
it, so a service flapping around its threshold keeps one alert (metrics.AlertState: test.py counts
alarm events with the same lifecycle). Each change is a JSON line in --live_log with the 3
metrics that name it (scoring.explain, as test.py names a flagged point) and, with --webhook, an
Alertmanager /api/v2/alerts POST (a firing alert is re-sent every minute, then resolved with
endsAt). SIGTERM, SIGINT or the end of --max_polls resolves every open alert (one POST) before
the exit 0.

New services: an entity named in --entities that the checkpoint was not trained on and that has
no local file is scored by the shared model with the history's pooled scaler, calibrated on its
own last --min_calib_rows rows in Prometheus (with the history's latent memory, as docs/meta.md
calibrates a new server) once they are complete; until then puad_calibrating{entity} is 1.

Errors never raise or clear an alarm: a window with a missing point is skipped and counted,
never filled; a failed poll is counted and backed off (step, 2 x step, ... --max_backoff);
puad_stale says a value is old. The metrics it serves: docs/live.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
import torch

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")  # no *_created series
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,  # noqa: E402
                               start_http_server)

import puad  # noqa: E402
import scoring  # noqa: E402
from config import SCORES, Config, ConfigError, check_fields, cli, cli_error, print_config  # noqa: E402
from faultlog import ExportError  # noqa: E402
from metrics import AlertState  # noqa: E402
from prometheus import (DEFAULT_PROMETHEUS, grouped_query, load_metric_set, make_session,  # noqa: E402
                        parse_shard, parse_step, query_range, redact_url, render_query, shard_services,
                        split_by_label)
from puad import (apply_local_state, build_model, calibrate_entity, clip_inputs, local_path,  # noqa: E402
                  read_checkpoint, run_config, window_reconstructor)
from utils import DataError, Scaler, align_features, load_dataset, set_threads, time_step, trailing_mean  # noqa: E402

PROG = "detect_live.py"
# the Config fields detect_live.py reads: the checkpoint, its data, the scorer and the alarms
READS = ("data", "entities", "entity", "ckpt", "smooth", "alarm_budget", "alarm_hold", "alarm_clear", "num_threads", "val_frac",
         "val_blocks") + tuple(f for f in SCORES if f in ("score_floor", "name_q", "repair_weight", "latent_weight",
                                                           "use_local", "min_calib_rows", "score_batch", "score_mode",
                                                           "spot_q", "spot_level", "drift_window"))
QUERY_WORKERS = 4  # queries of a poll in flight at once
REFRESH_STEPS = 3  # a poll asks again for the last this many grid points (and for every point it lacks)
RESEND_S = 60.0  # a firing alert is re-posted this often (Alertmanager's resolve_timeout is 5m)
NAMED_PER_POLL = 50  # alarms named by repair (scoring.explain: V + 1 windows each) in one poll; the rest of a
                     # storm keep the plain ranking until their next re-send
log = logging.getLogger("puad.live")


class LiveError(Exception):
    """A start-up problem; printed as one line, exit code 1."""


class QueryError(Exception):
    """Prometheus did not answer a query (down, timeout, HTTP error)."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


# ---------------------------------------------------------------- options

def _opt(default: Any, help: str, kind: type | None = None) -> Any:
    """An option of detect_live.py's own, with its --help text and type."""
    return field(default=default, metadata={"help": help, "kind": kind or type(default)})


@dataclass
class LiveOptions:
    """detect_live.py's own options (no other script reads them; Config holds the shared ones)."""
    prometheus: str = _opt(DEFAULT_PROMETHEUS, "Prometheus base URL (env PROMETHEUS_URL when not given)")
    metrics_file: str = _opt("labshop/metrics-lab.yaml", "metric set YAML (export_metrics.py format)")
    rate_window: str = _opt("", "override the metric set's $rate_window ('' = keep)")
    live_step: int = _opt(15, "seconds between polls = the grid step of a window (default: the checkpoint's step_s; "
                              "another is refused; 15 for a checkpoint without one)")
    fixed_threshold: float | None = _opt(None, "a fixed threshold for every entity instead of SPOT at --alarm_budget "
                                               "with the drift guard", float)
    port: int = _opt(9109, "/metrics of the detector (0 = any free port)")
    listen: str = _opt("127.0.0.1", "address the detector listens on")
    live_log: str = _opt("live_events.jsonl", "one JSON line per alert state change")
    webhook: str = _opt("", "Alertmanager-compatible URL (.../api/v2/alerts); '' = off")
    stale_steps: int = _opt(3, "puad_stale = 1 when the last scored window is older than this many steps")
    max_backoff: float = _opt(60.0, "seconds, cap of the retry delay while Prometheus fails")
    query_timeout: float = _opt(5.0, "seconds per Prometheus request")
    max_polls: int = _opt(0, "stop after N polls (0 = run until SIGTERM/SIGINT)")
    shard: str = _opt("", "I/N: only the entities whose name hashes to I modulo N (Prometheus hashmod); '' = all")


_url = (lambda v: re.match(r"https?://[^/\s]", v) is not None)
_pos = (lambda v: v >= 1), ">= 1"
_positive = (lambda v: v > 0), "> 0"
_nonempty = (lambda v: v.strip() != ""), "a non-empty string"
LIVE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prometheus": (_url, "an http:// or https:// URL"), "metrics_file": _nonempty,
    "rate_window": ((lambda v: v == "" or re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", v) is not None),
                    "'' or a Prometheus duration like 30s or 1m"),
    "live_step": _pos,
    "port": ((lambda v: 0 <= v <= 65535), "in [0, 65535]"), "listen": _nonempty,
    "live_log": _nonempty, "webhook": ((lambda v: v == "" or _url(v)), "'' or an http:// or https:// URL"),
    "stale_steps": _pos, "max_backoff": _positive, "query_timeout": _positive, "max_polls": ((lambda v: v >= 0), ">= 0"),
    "shard": ((lambda v: v == "" or (re.fullmatch(r"(\d+)/(\d+)", v) is not None
                                     and int(v.split("/")[0]) < int(v.split("/")[1]))), "'' or I/N with 0 <= I < N"),
}


def add_options(parser: argparse.ArgumentParser) -> None:
    """detect_live.py's own options (LiveOptions), after the Config fields it reads."""
    group = parser.add_argument_group("live detection")
    for f in fields(LiveOptions):
        kind = f.metadata["kind"]
        group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                           help=f"{f.metadata['help']} [{kind.__name__}, default {f.default!r}]".replace("%", "%%"))


def live_options(ns: argparse.Namespace) -> tuple[LiveOptions, set[str]]:
    """The parsed options (cli(extra=add_options)'s opts) and which were given; one out of its
    range is a one-line error (exit 2)."""
    given = {f.name for f in fields(LiveOptions) if hasattr(ns, f.name)}
    opts = LiveOptions(**{name: getattr(ns, name) for name in given})
    try:
        check_fields(opts, LIVE_CHECKS)
    except ConfigError as e:
        cli_error(str(e))
    return opts, given


def changed_options(opts: LiveOptions) -> dict[str, Any]:
    """The options that differ from their defaults (for the config line)."""
    return {f.name: getattr(opts, f.name) for f in fields(opts) if getattr(opts, f.name) != f.default}


# ---------------------------------------------------------------- start-up

def check_features(ckpt_features: list[str], metric_set: dict, ckpt_name: str, set_name: str) -> list[dict]:
    """The metric set's metrics for the checkpoint's features, in the checkpoint's order.
    Refuses (LiveError naming the columns) when the metric set lacks one."""
    by_name = {m["column"]: m for m in metric_set["metrics"]}
    missing = [f for f in ckpt_features if f not in by_name]
    extra = [c for c in by_name if c not in ckpt_features]
    if missing:
        raise LiveError(f"checkpoint {ckpt_name} does not match metric set {set_name}: "
                        f"missing from the metric set: {missing}"
                        + (f"; in the metric set only: {extra}" if extra else ""))
    if extra:
        log.warning("metric set %s: column(s) %s not in the checkpoint; not queried", set_name, extra)
    return [by_name[f] for f in ckpt_features]


@dataclass
class EntityState:
    """What scales and reconstructs one entity: its scaler, its local prototypes (None unless
    adapted) and whether they are used; new: neither trained on nor adapted (the history's
    scaler, calibrated on its own rows in Prometheus)."""
    scaler: Scaler
    local: dict | None = None
    use_local: bool = False
    new: bool = False


def entity_state(ckpt: dict, cfg: Config, entity: str) -> EntityState:
    """An entity's scaler and local prototypes: its local file's if adapted, else the
    checkpoint's; an entity with neither is new: the history's pooled scaler (history_scaler,
    as train_safe.py --stage=local gives a new server), refused only by a checkpoint without one."""
    local, scaler = puad.entity_state(ckpt, cfg.ckpt, entity)  # refuses a local file of another model/entity
    if scaler is not None:
        return EntityState(scaler, local, local is not None and cfg.use_local)
    if "history_scaler" not in ckpt:
        raise LiveError(f"entity {entity!r}: no scaler (not trained on, no local file {local_path(cfg.ckpt, entity)}) "
                        f"and the checkpoint has no history_scaler for a new entity (retrain it); it knows "
                        f"{sorted(ckpt['scalers'])}")
    return EntityState(Scaler.from_state(ckpt["history_scaler"]), new=True)


def poll_step(opts: LiveOptions, ckpt: dict, given: set[str], ckpt_name: str) -> int:
    """The poll step in seconds: the step of the checkpoint's training rows (step_s) unless
    --live_step is given; a --live_step that differs from it is refused. A checkpoint without
    step_s (older, or trained on row-numbered data) keeps --live_step, with a warning."""
    trained = ckpt.get("step_s")
    if trained is None:
        log.warning("%s does not record the step it was trained on (step_s); --live_step=%d is not checked "
                    "against it", ckpt_name, opts.live_step)
        return opts.live_step
    whole = abs(trained - round(trained)) < 1e-3 * trained and round(trained) >= 1
    if "live_step" not in given and whole:
        return int(round(trained))
    if not whole or opts.live_step != round(trained):
        raise LiveError(f"--live_step={opts.live_step} does not match the step of {ckpt_name}'s training data "
                        f"({trained:g} s, step_s): poll at the step the model was trained on"
                        + (f" (--live_step={round(trained)})" if whole else ", in whole seconds: retrain on such data"))
    return opts.live_step


def calibrate(model, ckpt: dict, cfg: Config, entity: str, st: EntityState) -> scoring.Scorer:
    """The calibration test.py would use (puad.calibrate_entity): the score's normaliser and
    threshold from the validation tail of the entity's train series in --data (or its first
    adapt_windows windows when adapted from those, or the history's calibration rows when those
    are under --min_calib_rows)."""
    try:
        ent = load_dataset(cfg.data, [entity], min_rows=cfg.seq_len)[0]
    except DataError as e:
        raise LiveError(f"calibration of {entity}: {e} (give --data=DATASET, the entity's training data)") from None
    try:
        train = align_features(ent, list(ckpt["features"]), f"{cfg.data}/{entity}").train
    except DataError as e:
        raise LiveError(str(e)) from None
    if st.local is not None:
        apply_local_state(model, st.local)
    return calibrate_entity(model, ckpt, cfg, st.scaler.transform(train), st.local, st.use_local, entity,
                            step_s=time_step([ent]))


def calibrate_new(model, ckpt: dict, cfg: Config, entity: str, st: EntityState, raw: np.ndarray,
                  step_s: float) -> scoring.Scorer:
    """A new entity's calibration, as docs/meta.md calibrates a new server from its own rows:
    its rows (raw, at least --min_calib_rows, from Prometheus) scaled with the history's scaler and
    reconstructed with the global prototypes are the calibration rows, its constant features
    those constant over them, the latent memory the history's (puad.history_memory)."""
    x = st.scaler.transform(raw)
    rows = puad.score_series(model, x, cfg.seq_len, False, **puad.score_kwargs(cfg, step_s))
    calib = puad.CalibrationData(rows, scoring.constant_features(x), puad.history_memory(ckpt, entity),
                                 puad.checkpoint_host(ckpt))
    return puad.fit_scorer(cfg, calib, step_s)


# ---------------------------------------------------------------- Prometheus

def _column(session, prometheus: str, query: str, start: int, end: int, step: int, agg: str,
            timeout: float) -> dict[int, float]:
    """One query_range -> {timestamp: value}, several series combined with agg; no retries here
    (the poll loop backs off). Raises QueryError when Prometheus does not answer."""
    try:
        series = query_range(session, prometheus, query, start, end, step, timeout=timeout, retries=0)
    except ExportError as e:
        raise QueryError(str(e)) from None
    values: dict[int, list[float]] = {}
    for s in series:
        for t, v in s["values"]:
            v = float(v)
            if math.isfinite(v):
                values.setdefault(int(round(float(t))), []).append(v)
    combine = {"sum": sum, "max": max, "min": min, "mean": lambda xs: sum(xs) / len(xs)}[agg]
    return {t: combine(vs) for t, vs in values.items()}


def window_grid(metric_set: dict, end: int, n: int, step: int) -> tuple[np.ndarray, int]:
    """Grid of a window of n points ending at `end`, with the rate window's points before it
    -> (grid, number of rate-window points in front)."""
    rate_steps = math.ceil(parse_step(metric_set["rate_window"]) / step)
    first = end - (n - 1 + rate_steps) * step
    return np.arange(first, end + step, step, dtype=np.int64), rate_steps


def fetch_presence(session, prometheus: str, grid: np.ndarray, step: int, timeout: float) -> dict[int, float]:
    """Grid points at which Prometheus scraped anything (an `up` sample within 2 steps)."""
    return _column(session, prometheus, f"sum(count_over_time(up[{2 * step}s]))",
                   int(grid[0]), int(grid[-1]), step, "sum", timeout)


def fetch_window(session, prometheus: str, metric_set: dict, metrics: list[dict], service: str,
                 end: int, n: int, step: int, timeout: float,
                 presence: dict[int, float] | None = None) -> tuple[np.ndarray, int]:
    """Raw (unscaled) values (n, V) of the grid points end-(n-1)*step .. end, columns in the
    order of `metrics`, NaN rows where a point is missing (mark_missing) -> (values, number of
    missing rows). `presence`: fetch_presence() of the same grid. One service at a time: what
    fetch_fleet's grouped queries are checked against."""
    grid, rate_steps = window_grid(metric_set, end, n, step)
    first = int(grid[0])
    if presence is None:
        presence = fetch_presence(session, prometheus, grid, step, timeout)
    x = np.full((len(grid), len(metrics)), np.nan)
    for j, m in enumerate(metrics):
        got = _column(session, prometheus, render_query(m, metric_set, service),
                      int(first), int(end), step, m["agg"], timeout)
        x[:, j] = [got.get(int(t), np.nan) for t in grid]
    return mark_missing(apply_fill(x, metrics), grid, presence, rate_steps)


def mark_missing(x: np.ndarray, grid: np.ndarray, presence: dict[int, float], rate_steps: int) -> tuple[np.ndarray, int]:
    """NaN rows where a point is missing (no scrape, or a column without a value after fill;
    the rate window after a scrape gap too) -> (the window without the rate-window rows, number
    of missing rows)."""
    present = np.array([presence.get(int(t), 0) > 0 for t in grid])
    missing = ~present | np.isnan(x).any(axis=1)
    # a rate window that overlaps a missing point (Prometheus down) is computed on partial data
    gone = np.flatnonzero(~present)
    for i in gone:
        missing[i:i + rate_steps + 1] = True
    x[missing] = np.nan
    return x[rate_steps:], int(missing[rate_steps:].sum())


def fetch_rows(session, prometheus: str, metric_set: dict, metrics: list[dict], services: list[str],
               first: int, end: int, step: int, timeout: float, fill: bool = True) -> np.ndarray:
    """Values (services, grid points first..end, V) of every column, NaN where none (then
    `fill` applied unless fill=False): one query per column for all services
    (prometheus.grouped_query: the $service matcher turned into a regex over `services`, the
    answer split by the service's label); a node-level column (no $service) is queried once for
    all; a column whose query cannot be grouped falls back to one query per service. A service
    missing from an answer gets NaN there."""
    grid = np.arange(first, end + step, step, dtype=np.int64)
    x = np.full((len(services), len(grid), len(metrics)), np.nan)

    def column(j: int, m: dict) -> None:
        try:
            grouped = grouped_query(m, metric_set, services)
        except ExportError as e:
            log.warning("%s; querying it per service", e)
            grouped = "per-service"
        if grouped is None:  # the same for every service
            got = _column(session, prometheus, render_query(m, metric_set, services[0]), first, int(end), step,
                          m["agg"], timeout)
            x[:, :, j] = np.array([got.get(int(t), np.nan) for t in grid])[None, :]
        elif grouped == "per-service":
            for i, service in enumerate(services):
                got = _column(session, prometheus, render_query(m, metric_set, service), first, int(end), step,
                              m["agg"], timeout)
                x[i, :, j] = [got.get(int(t), np.nan) for t in grid]
        else:
            query, label = grouped
            try:
                series = query_range(session, prometheus, query, first, int(end), step, timeout=timeout, retries=0)
            except ExportError as e:
                raise QueryError(str(e)) from None
            x[:, :, j] = split_by_label(series, label, services, grid, m["agg"])

    # the columns' queries are in flight together (Prometheus works on them while this process
    # parses answers); each writes its own column of x
    with ThreadPoolExecutor(min(QUERY_WORKERS, max(len(metrics), 1))) as pool:
        for future in [pool.submit(column, j, m) for j, m in enumerate(metrics)]:
            future.result()  # the first QueryError is raised here
    return apply_fill(x, metrics) if fill else x


def apply_fill(x: np.ndarray, metrics: list[dict]) -> np.ndarray:
    """Each column's missing values (NaN, last axis = the columns) set to its metric's `fill`."""
    for j, m in enumerate(metrics):
        if m["fill"] is not None:
            x[..., j] = np.where(np.isnan(x[..., j]), float(m["fill"]), x[..., j])
    return x


def fetch_fleet(session, prometheus: str, metric_set: dict, metrics: list[dict], services: list[str],
                end: int, n: int, step: int, timeout: float,
                presence: dict[int, float] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """fetch_window for many services with one query per column (fetch_rows) -> {service:
    (values, missing rows)}: the same numbers as fetch_window of each service (tested)."""
    grid, rate_steps = window_grid(metric_set, end, n, step)
    if presence is None:
        presence = fetch_presence(session, prometheus, grid, step, timeout)
    x = fetch_rows(session, prometheus, metric_set, metrics, services, int(grid[0]), end, step, timeout)
    return {service: mark_missing(x[i], grid, presence, rate_steps) for i, service in enumerate(services)}




def fetch_own_rows(session, prometheus: str, metric_set: dict, metrics: list[dict], services: list[str],
                   end: int, n: int, step: int, timeout: float) -> dict[str, tuple[np.ndarray, int]]:
    """fetch_fleet for new services' calibration rows: a grid point where none of a service's
    columns has a sample is missing too (the service did not exist yet; the metric set's
    `fill` values there would be rows it never had)."""
    grid, rate_steps = window_grid(metric_set, end, n, step)
    presence = fetch_presence(session, prometheus, grid, step, timeout)
    x = fetch_rows(session, prometheus, metric_set, metrics, services, int(grid[0]), end, step, timeout, fill=False)
    absent = np.isnan(x).all(axis=-1)  # (services, grid points)
    x = apply_fill(x, metrics)
    x[absent] = np.nan
    return {service: mark_missing(x[i], grid, presence, rate_steps) for i, service in enumerate(services)}


class RowCache:
    """The Prometheus side of a poll: every entity's raw window ending at a grid time, with one
    grouped query per column and one presence query (fetch_rows, fetch_presence). Rows already
    fetched are kept; only the grid points it lacks and the last REFRESH_STEPS are asked again
    (samples scraped just before a grid point can reach Prometheus' head after the poll)."""

    def __init__(self, session, prometheus: str, metric_set: dict, metrics: list[dict], step: int, timeout: float):
        self.session, self.prometheus, self.metric_set, self.metrics = session, prometheus, metric_set, metrics
        self.step, self.timeout = step, timeout
        self.rows: dict[int, tuple[np.ndarray, float]] = {}  # grid time -> (values (entities, V), presence)

    def windows(self, entities: list[str], end: int, n: int) -> dict[str, tuple[np.ndarray, int]]:
        """{entity: (its n raw rows ending at `end`, NaN where missing; number of missing rows)}
        (mark_missing); raises QueryError."""
        grid, rate_steps = window_grid(self.metric_set, end, n, self.step)
        self.rows = {t: r for t, r in self.rows.items() if grid[0] <= t < end - (REFRESH_STEPS - 1) * self.step}
        first = next((int(t) for t in grid if int(t) not in self.rows), int(end))
        presence = fetch_presence(self.session, self.prometheus, grid[grid >= first], self.step,
                                  self.timeout) if first <= end else {}
        x = fetch_rows(self.session, self.prometheus, self.metric_set, self.metrics, entities,
                       first, end, self.step, self.timeout)
        for k, t in enumerate(range(first, end + self.step, self.step)):
            self.rows[t] = (x[:, k], presence.get(t, 0))
        x = np.stack([self.rows[int(t)][0] for t in grid], axis=1)
        presence = {int(t): self.rows[int(t)][1] for t in grid}
        return {e: mark_missing(x[i], grid, presence, rate_steps) for i, e in enumerate(entities)}


# ---------------------------------------------------------------- scoring

class Recent:
    """An entity's last `size` scores (the drift guard's history) in a fixed float64 array, written
    round: the guard takes their median, which needs their values, not their order, and a poll then
    converts no list (at 1,000 services a deque's conversion cost 20-30 ms a poll)."""

    def __init__(self, scores: np.ndarray | list[float], size: int):
        self.buffer, self.n = np.empty(size), 0
        for s in list(scores)[-size:]:
            self.append(s)

    def append(self, score: float) -> None:
        self.buffer[self.n % len(self.buffer)] = score
        self.n += 1

    def values(self) -> np.ndarray:
        return self.buffer[:min(self.n, len(self.buffer))]


class LiveScorer:
    """The scoring side: raw windows -> scores with the model and each entity's Scorer, batched
    (score), each entity's threshold at each poll (the drift guard over its past scores, the
    calibration's last ones first), and the metrics that name an alarm (name_alarm)."""

    def __init__(self, cfg: Config, model, states: dict[str, EntityState], scorers: dict[str, scoring.Scorer],
                 step_s: float | None = None):
        self.cfg, self.model, self.states = cfg, model, states
        self.scorers: dict[str, scoring.Scorer] = {}
        self.thresholds: dict[str, float] = {}
        self.history: dict[str, Recent] = {}  # the drift guard's past scores per entity
        for entity, scorer in scorers.items():
            self.add(entity, scorer)
        self.window_cache: dict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = {}  # window -> mu, theta0
        self.last_input: dict[str, tuple[scoring.Reconstruction, np.ndarray]] = {}  # last rows, named contributions
        self.model_windows = 0  # windows the last batch ran through the model
        self.level_rows = puad.level_rows(cfg, step_s) if model.has_level else 0  # rows of recent level (score)

    def add(self, entity: str, scorer: scoring.Scorer) -> None:
        """Score an entity with this fitted Scorer from now on."""
        self.scorers[entity] = scorer
        self.thresholds[entity] = scorer.threshold_
        self.history[entity] = Recent(scorer.recent_, max(scorer.drift_window, 1))

    def set_threshold(self, entity: str, value: float) -> None:
        """Fix an entity's threshold at `value` for every later poll (no drift guard)."""
        self.add(entity, self.scorers[entity].fixed(value))

    def threshold(self, entity: str, score: float) -> float:
        """The threshold a new score of the entity is compared with (Scorer.next_threshold over
        the scores before it); the score then joins its history."""
        self.thresholds[entity] = self.scorers[entity].next_threshold(self.history[entity].values())
        self.history[entity].append(score)
        return self.thresholds[entity]

    def _reconstruct(self, windows: np.ndarray, use_local: bool) -> tuple[np.ndarray, np.ndarray]:
        """The model's decoder mean (B, T, V) and theta0 (B, d_theta) of scaled, clipped windows,
        in batches of --score_batch."""
        parts: tuple[list, list] = ([], [])
        for i in range(0, len(windows), self.cfg.score_batch):
            out = self.model.reconstruct(torch.as_tensor(np.ascontiguousarray(windows[i:i + self.cfg.score_batch])),
                                         use_local)
            parts[0].append(out["x_mu"].numpy())
            parts[1].append(out["theta0"].numpy())
        return np.concatenate(parts[0]), np.concatenate(parts[1])

    def _run_model(self, todo: dict[bool, list]) -> dict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]]:
        """The windows not seen before through the model: those of every entity on the global
        prototypes in one batch, each entity with local prototypes (its own beta_l, loaded) in
        one of its own -> {entity: {window key: (mu, theta0)}}."""
        groups = [(False, todo[False])]
        by_entity: dict[str, list] = {}
        for item in todo[True]:
            by_entity.setdefault(item[0], []).append(item)
        groups += [(True, items) for items in by_entity.values()]
        fresh: dict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = {}
        for use_local, items in groups:
            if not items:
                continue
            if use_local:
                apply_local_state(self.model, self.states[items[0][0]].local)
            mu, theta0 = self._reconstruct(np.stack([w for *_, w in items]), use_local)
            for (entity, key, _), m, z in zip(items, mu, theta0):
                fresh.setdefault(entity, {})[key] = (m, z)
        self.model_windows = len(todo[False]) + len(todo[True])
        return fresh

    def score(self, raws: dict[str, np.ndarray], before: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """Scores of many entities' windows (raw: seq_len + smooth - 1 rows each), batched: each
        entity's rows scaled with its own scaler and clipped at once (Scaler.transform_many,
        puad.clip_inputs, as in score_series), its windows through the model (_run_model; a
        window the model saw in an earlier poll, same scaled values, is not run again: posterior
        means are deterministic), then scoring.score_many with each entity's Scorer (one latent
        search for all). The same numbers as score_series and Scorer.score on each entity alone
        (tested), `before` the raw rows before each entity's (score_series' history: the level
        gauges' recent level, the last level_rows of them)."""
        seq_len, entities = self.cfg.seq_len, list(raws)
        xs = clip_inputs(Scaler.transform_many([self.states[e].scaler for e in entities],
                                               np.stack([raws[e] for e in entities])))  # (E, n, V)
        windows = np.lib.stride_tricks.sliding_window_view(xs, seq_len, axis=1).transpose(0, 1, 3, 2)  # (E, W, T, V)
        keys = [[w.tobytes() for w in ws] for ws in windows]
        todo: dict[bool, list] = {False: [], True: []}
        for i, e in enumerate(entities):
            old = self.window_cache.get(e, {})
            todo[self.states[e].use_local] += [(e, key, windows[i, w]) for w, key in enumerate(keys[i]) if key not in old]
        fresh = self._run_model(todo)
        known = [[fresh.get(e, {}).get(key) or self.window_cache[e][key] for key in keys[i]]
                 for i, e in enumerate(entities)]
        (m0, z0), size = known[0][0], windows.shape[:2]
        mu_w, z_w = np.empty(size + m0.shape, m0.dtype), np.empty(size + z0.shape, z0.dtype)
        for i, ks in enumerate(known):
            for w, (m, z) in enumerate(ks):
                mu_w[i, w], z_w[i, w] = m, z
        # to points, as window_to_point_scores and window_values_to_points: (E, n, V) and (E, n, d)
        mu = np.concatenate([mu_w[:, 0, :-1], mu_w[:, :, -1]], axis=1)
        theta0 = np.concatenate([np.repeat(z_w[:, :1], seq_len - 1, axis=1), z_w], axis=1)
        fall = None
        if self.level_rows:  # as score_series: around the lower of the window's mean and the recent level
            lvl, fall = self.model.level.cpu().numpy(), np.zeros_like(mu)
            c_w = windows.mean(axis=2)  # (E, W, V)
            c = np.concatenate([np.repeat(c_w[:, :1], seq_len - 1, axis=1), c_w], axis=1)
            for i, e in enumerate(entities):
                past = (before or {}).get(e)
                h = None if past is None or not len(past) else clip_inputs(self.states[e].scaler.transform(past))
                mu[i], fall[i] = puad.to_recent_level(mu[i], c[i], trailing_mean(xs[i], self.level_rows, h), lvl)
        scores, named = scoring.score_many([self.scorers[e] for e in entities], xs, mu, theta0, fall=fall)
        for i, e in enumerate(entities):
            rec = scoring.Reconstruction(xs[i], mu[i], fall=None if fall is None else fall[i])
            self.last_input[e] = (rec, named[i])
            self.window_cache[e] = dict(zip(keys[i], known[i]))
        return {e: float(scores[i, -1]) for i, e in enumerate(entities)}

    def name_alarm(self, entity: str, features: list[str]) -> list[str]:
        """The 3 features that name an alarming window, as test.py names a flagged row
        (Scorer.explain on the last poll's rows of this entity)."""
        st = self.states[entity]
        if st.use_local:
            apply_local_state(self.model, st.local)
        rec, _ = self.last_input[entity]
        weights = self.scorers[entity].explain(rec, window_reconstructor(self.model, st.use_local),
                                               np.array([len(rec) - 1]), self.cfg.seq_len)
        return [name for name, _ in scoring.top_features(weights[-1], features, 3)]


# ---------------------------------------------------------------- alerting

@dataclass
class Reading:
    """An entity's last scored window, as its events and alerts report it."""
    score: float
    threshold: float
    end: int  # the window's last grid time
    top: list[str]  # the metrics behind it, most first


class Alerts:
    """State changes of the entities' alerts (AlertState): one JSON line each in --live_log,
    with --webhook an Alertmanager /api/v2/alerts POST each (a firing alert re-sent every
    RESEND_S while it lasts), and at stop every open alert resolved (resolve_all). A failed log
    append or POST is logged and counted (the counters), never fatal."""

    def __init__(self, opts: LiveOptions, entities: list[str], hold: int, clear: int, log_errors: Counter,
                 webhook_errors: Counter):
        self.opts = opts
        self.states = {e: AlertState(hold, clear) for e in entities}
        self.log_errors, self.webhook_errors = log_errors, webhook_errors
        self.start: dict[str, float] = {}  # when each entity's alert fired
        self.last_post: dict[str, float] = {}
        self.last: dict[str, Reading] = {}  # each entity's reading at its last event or post
        self.posting: list[threading.Thread] = []  # alert POSTs in flight

    def on(self, entity: str) -> bool:
        return self.states[entity].on

    def resend_due(self, entity: str) -> bool:
        """A firing alert is due to be posted again (Alertmanager resolves one not re-sent)."""
        return bool(self.opts.webhook) and self.on(entity) and time.time() - self.last_post.get(entity, 0) > RESEND_S

    def change(self, entity: str, r: Reading, reason: str | None = None, notify: bool = True) -> None:
        """Record the entity's new state (AlertState.on): a JSON line and, with --webhook, a POST."""
        now, on = time.time(), self.on(entity)
        self.last[entity] = r
        event = {"time": iso(now), "entity": entity, "state": "anomalous" if on else "normal",
                 "score": round(r.score, 6), "threshold": round(r.threshold, 6), "top_features": r.top,
                 "window_end": iso(r.end), "window_end_unix": r.end}
        if reason:
            event["reason"] = reason
        try:
            with open(self.opts.live_log, "a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError as e:  # a full disk or a read-only file system: the event is logged here instead
            self.log_errors.inc()
            log.warning("cannot append to --live_log %s (%s); event: %s", self.opts.live_log, e.strerror,
                        json.dumps(event))
        log.info("%s: %s (score %.4g, threshold %.4g; top features %s)", entity, event["state"], r.score,
                 r.threshold, ", ".join(r.top) or "n/a")
        if on:
            self.start[entity] = now
        if self.opts.webhook and notify:
            self.send(entity, r)

    def send(self, entity: str, r: Reading) -> None:
        """POST the entity's alert in its current state, in a thread of its own."""
        now = time.time()
        self.last_post[entity], self.last[entity] = now, r
        alert = self.alert(entity, self.on(entity), r, self.start.get(entity, now), now)
        thread = threading.Thread(target=self.post, args=([alert],), daemon=True)
        thread.start()
        self.posting = [t for t in self.posting if t.is_alive()] + [thread]

    def resolve_all(self) -> list[str]:
        """At stop: every open alert changes to normal (a JSON line each, reason "detector
        stopped") and, with --webhook, all are resolved in one POST sent after those in flight
        (a firing alert arriving after its resolution would stay active) -> the entities."""
        for thread in self.posting:
            thread.join(timeout=10)
        open_ = [e for e, s in self.states.items() if s.on]
        now = time.time()
        for entity in open_:
            self.states[entity].on = False
            self.change(entity, self.last[entity], reason="detector stopped", notify=False)
        if open_ and self.opts.webhook:
            self.post([self.alert(e, False, self.last[e], self.start.get(e, now), now) for e in open_])
            log.info("resolved %d alert(s) at %s", len(open_), redact_url(self.opts.webhook))
        return open_

    def alert(self, entity: str, on: bool, r: Reading, start: float, now: float) -> dict:
        """One alert in Alertmanager's /api/v2/alerts shape (resolved: with endsAt)."""
        top = ", ".join(r.top)
        alert = {"labels": {"alertname": "PUADAnomaly", "entity": entity, "severity": "warning", "source": "detect_live"},
                 "annotations": {"summary": f"PUAD anomaly on {entity}", "description": top,
                                 "details": f"score {r.score:.4g} > threshold {r.threshold:.4g} for the window ending "
                                            f"{iso(r.end)}; the metrics behind it, most first: {top or 'n/a'}",
                                 "score": f"{r.score:.6g}", "threshold": f"{r.threshold:.6g}"},
                 "startsAt": iso(start),
                 "generatorURL": f"http://{self.opts.listen}:{self.opts.port}/metrics"}
        if not on:
            alert["endsAt"] = iso(now)
        return alert

    def post(self, alerts: list[dict]) -> None:
        """POST alerts to --webhook; a failure is logged and counted."""
        try:
            r = requests.post(self.opts.webhook, json=alerts, timeout=5)
            if r.status_code >= 300:
                raise requests.RequestException(f"HTTP {r.status_code}: {r.text[:200]}")
        except requests.RequestException as e:
            self.webhook_errors.inc()
            log.warning("webhook %s: %s", redact_url(self.opts.webhook), redact_url(str(e)[:300]))


# ---------------------------------------------------------------- /metrics

class LiveMetrics:
    """What the detector serves on /metrics (its own CollectorRegistry; docs/live.md lists them)."""

    def __init__(self, entities: list[str], step: int, stale: Callable[[str], bool]):
        r = self.registry = CollectorRegistry()
        self.score = Gauge("puad_anomaly_score", "PUAD score of the last scored window (higher = more anomalous)", ["entity"], registry=r)
        self.anomaly = Gauge("puad_anomaly", "1 when the last scored window's score exceeds the threshold", ["entity"], registry=r)
        self.alert = Gauge("puad_alert", "1 while the entity's alert fires (held --alarm_hold polls, resolved after "
                           "--alarm_clear polls at or below the threshold)", ["entity"], registry=r)
        self.threshold = Gauge("puad_threshold", "Anomaly threshold of the entity", ["entity"], registry=r)
        self.stale = Gauge("puad_stale", "1 when the last scored window is older than stale_steps steps", ["entity"], registry=r)
        self.calibrating = Gauge("puad_calibrating", "1 while a new entity waits for --min_calib_rows rows of its own",
                                 ["entity"], registry=r)
        self.success = Gauge("puad_last_success_timestamp_seconds", "Unix time of the last poll whose queries all succeeded", registry=r)
        self.errors = Counter("puad_query_errors", "Polls that failed because Prometheus did not answer", registry=r)
        self.skipped = Counter("puad_skipped_windows", "Windows not scored", ["entity", "reason"], registry=r)
        self.scored = Counter("puad_windows_scored", "Windows scored", ["entity"], registry=r)
        self.webhook_errors = Counter("puad_webhook_errors", "Failed alert POSTs to the webhook", registry=r)
        self.log_errors = Counter("puad_live_log_errors", "State changes that could not be appended to --live_log", registry=r)
        self.latency = Histogram("puad_scoring_latency_seconds", "Model time to score one window", registry=r,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.feature = Gauge("puad_feature_score", "Each feature's contribution to the last score over its usual level "
                             "(features x entities series)", ["entity", "feature"], registry=r)
        Gauge("puad_step_seconds", "Poll interval", registry=r).set(step)
        Gauge("puad_entities", "Entities this detector scores (its shard's)", registry=r).set(len(entities))
        ProcessCollector(registry=r)
        for e in entities:
            self.score.labels(e).set(float("nan"))
            for gauge in (self.anomaly, self.alert, self.calibrating):
                gauge.labels(e).set(0)
            self.stale.labels(e).set_function(lambda e=e: float(stale(e)))
            self.scored.labels(e)
            for reason in ("missing_points", "no_data", "non_finite"):
                self.skipped.labels(e, reason)
        self.server = self.thread = None

    def serve(self, listen: str, port: int) -> None:
        self.server, self.thread = start_http_server(port, listen, registry=self.registry)
        log.info("serving /metrics on http://%s:%d/metrics", listen, self.server.server_port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None


# ---------------------------------------------------------------- detector

class Detector:
    """The poll loop: each step, every entity's window from Prometheus (RowCache), scored in one
    batch (LiveScorer), then its gauges, threshold and alert updated (Alerts); new entities
    calibrated once Prometheus holds --min_calib_rows complete rows of theirs (calibrate_pending).
    states: every entity's EntityState; scorers: the calibrated ones' (an entity without one is
    new: calibrating)."""

    def __init__(self, cfg: Config, opts: LiveOptions, ckpt: dict, model, entities: list[str], metric_set: dict,
                 metrics: list[dict], states: dict[str, EntityState], scorers: dict[str, scoring.Scorer]):
        self.cfg, self.opts, self.ckpt = cfg, opts, ckpt
        self.entities, self.metric_set, self.step = entities, metric_set, opts.live_step
        self.features = list(ckpt["features"])
        self.prometheus = opts.prometheus
        self.session = make_session()
        self.source = RowCache(self.session, self.prometheus, metric_set, metrics, self.step, opts.query_timeout)
        self.scoring = LiveScorer(cfg, model, states, {e: s for e, s in scorers.items() if e in entities}, self.step)
        self.pending = [e for e in entities if e not in scorers]  # new entities, calibrating
        self.last_scored = {e: 0.0 for e in entities}
        self.gauges = LiveMetrics(entities, self.step, self.is_stale)
        self.alerts = Alerts(opts, entities, cfg.alarm_hold, cfg.alarm_clear, self.gauges.log_errors, self.gauges.webhook_errors)
        self.top: dict[str, list[str]] = {}  # the metrics behind each entity's last score
        self.children: dict[str, tuple] = {}  # each entity's gauges of every poll (update; a labels() lookup is ~2 us)
        for e in entities:
            self.gauges.calibrating.labels(e).set(int(e in self.pending))
            if e in self.scoring.thresholds:
                self.gauges.threshold.labels(e).set(self.scoring.thresholds[e])
        self.stop_event = threading.Event()
        self.failures = 0
        self.timing: dict[str, float] = {}

    def is_stale(self, entity: str) -> bool:
        """True until the entity's first scored window, then when that is older than stale_steps steps."""
        last = self.last_scored[entity]
        return not last or time.time() - last > self.opts.stale_steps * self.step

    def serve(self) -> None:
        self.gauges.serve(self.opts.listen, self.opts.port)

    def close(self) -> None:
        self.gauges.close()

    def poll(self, end: int) -> None:
        """One poll of every entity for the window ending at grid time `end`; raises QueryError.
        An empty shard idles."""
        if not self.entities:
            return
        t0 = time.perf_counter()
        n = self.cfg.seq_len + max(self.cfg.smooth, 1) - 1  # the last `smooth` windows
        n_level = self.scoring.level_rows  # and the level gauges' recent level before them
        windows = self.source.windows(self.entities, end, n + n_level)
        if self.pending:
            self.calibrate_pending(end)
        self.gauges.success.set(time.time())
        t1 = time.perf_counter()
        ready, before = {}, {}
        for entity, (x, _) in windows.items():
            if entity in self.pending:
                continue
            x, past = x[len(x) - n:], x[:len(x) - n]
            if np.isnan(x).all():
                self.gauges.skipped.labels(entity, "no_data").inc()
            elif np.isnan(x).any():  # mark_missing: a missing point's row is NaN
                self.gauges.skipped.labels(entity, "missing_points").inc()
            else:
                ready[entity], before[entity] = x, past[~np.isnan(past).any(axis=1)]
        scores = self.scoring.score(ready, before) if ready else {}
        if ready:
            for _ in ready:  # a poll's batch time over its windows
                self.gauges.latency.observe((time.perf_counter() - t1) / len(ready))
        t2 = time.perf_counter()
        named = 0  # alarms named by repair in this poll
        for entity, score in scores.items():
            named += self.update(entity, score, end, named < NAMED_PER_POLL)
        self.timing = {"query_s": t1 - t0, "score_s": t2 - t1, "update_s": time.perf_counter() - t2,
                       "step_s": time.perf_counter() - t0, "scored": len(scores),
                       "model_windows": self.scoring.model_windows if scores else 0}

    def update(self, entity: str, score: float, end: int, may_name: bool) -> bool:
        """One entity's new score: its gauges, threshold and alert -> whether the alarm was named
        by repair (scoring.explain: only when an alert fires or is re-sent). A non-finite score is
        never read as normal: skipped, counted, logged."""
        if not math.isfinite(score):
            self.gauges.skipped.labels(entity, "non_finite").inc()
            log.warning("%s: non-finite score for the window ending %s; skipped", entity, iso(end))
            return False
        g = self.gauges
        if entity not in self.children:
            self.children[entity] = (g.scored.labels(entity), g.score.labels(entity), g.threshold.labels(entity),
                                     g.anomaly.labels(entity), [g.feature.labels(entity, f) for f in self.features])
        scored_, score_, threshold_, anomaly_, features_ = self.children[entity]
        scored_.inc()
        self.last_scored[entity] = time.time()
        score_.set(score)
        contrib = self.scoring.last_input[entity][1][-1]  # the last point's named contributions
        for child, c in zip(features_, contrib):
            child.set(float(c))
        self.top[entity] = [n for n, _ in scoring.top_features(contrib, self.features, 3)]
        threshold = self.scoring.threshold(entity, score)
        threshold_.set(threshold)
        flagged = bool(score > threshold)
        anomaly_.set(int(flagged))
        changed = self.alerts.states[entity].update(flagged)
        resend = not changed and self.alerts.resend_due(entity)
        named = may_name and self.alerts.on(entity) and (changed or resend)
        if named:
            self.top[entity] = self.scoring.name_alarm(entity, self.features)
        reading = Reading(score, threshold, end, self.top[entity])
        if changed:
            self.gauges.alert.labels(entity).set(int(self.alerts.on(entity)))
            self.alerts.change(entity, reading)
        elif resend:
            self.alerts.send(entity, reading)
        return named

    def calibrate_pending(self, end: int) -> None:
        """Calibrate each new entity whose last --min_calib_rows rows in Prometheus are complete
        (fetch_own_rows: rows before its first sample are missing) on those rows (calibrate_new);
        it is scored from this poll on."""
        n = max(self.cfg.min_calib_rows, self.cfg.seq_len + self.cfg.smooth)
        got = fetch_own_rows(self.session, self.prometheus, self.metric_set, self.source.metrics, self.pending,
                             end, n, self.step, self.opts.query_timeout)
        for entity, (x, n_missing) in got.items():
            if n_missing:
                continue
            scorer = calibrate_new(self.scoring.model, self.ckpt, self.cfg, entity, self.scoring.states[entity], x,
                                   self.step)
            warn_short_history(entity, scorer, self.step, 1.0)
            if self.opts.fixed_threshold is not None:
                scorer = scorer.fixed(self.opts.fixed_threshold)
            self.scoring.add(entity, scorer)
            self.pending.remove(entity)
            self.gauges.calibrating.labels(entity).set(0)
            self.gauges.threshold.labels(entity).set(scorer.threshold_)
            log.info("%s: calibrated on its own last %d rows (new entity, the history's scaler and latent memory); "
                     "threshold %.6g", entity, n, scorer.threshold_)

    def resolve_all(self) -> None:
        """At stop: every open alert resolved (Alerts.resolve_all), its gauge back to 0."""
        for entity in self.alerts.resolve_all():
            self.gauges.alert.labels(entity).set(0)

    def run(self) -> None:
        """Poll every step until SIGTERM/SIGINT or --max_polls; then resolve what is still open."""
        try:
            self._run()
        finally:
            self.resolve_all()

    def _run(self) -> None:
        polls, delay = 0, 0.0
        next_end = math.floor(time.time() / self.step) * self.step
        while not self.stop_event.is_set():
            # wait for the next grid point (+ a little, so its scrapes are in)
            grid_end = max(next_end, math.floor(time.time() / self.step) * self.step)
            wake = max(grid_end + min(0.25 * self.step, 2.0), time.time() + delay)
            if self.stop_event.wait(max(0.0, wake - time.time())):
                break
            end = math.floor((time.time() - min(0.25 * self.step, 2.0)) / self.step) * self.step
            try:
                self.poll(int(end))
                self.failures, delay = 0, 0.0
            except QueryError as e:
                self.gauges.errors.inc()
                self.failures += 1
                delay = min(self.step * 2 ** (self.failures - 1), self.opts.max_backoff)
                log.warning("poll of %s failed (%d in a row; next try in %.1fs): %s",
                            iso(end), self.failures, delay, redact_url(str(e)[:300]))
            next_end = end + self.step
            polls += 1
            if self.opts.max_polls and polls >= self.opts.max_polls:
                break


# ---------------------------------------------------------------- start-up

def select_entities(cfg: Config, opts: LiveOptions, ckpt: dict) -> list[str]:
    """--entity, or --entities (all = the checkpoint's), then this replica's --shard."""
    if cfg.entity:
        entities = [cfg.entity]
    elif cfg.entities in ("all", ""):
        entities = list(ckpt.get("entities") or ckpt["scalers"])
    else:
        entities = list(dict.fromkeys(e.strip() for e in cfg.entities.split(",") if e.strip()))
    if not entities:
        raise LiveError(f"--entities={cfg.entities!r}: no entity")
    if opts.shard:
        entities = shard_services(entities, parse_shard(opts.shard))
        log.info("shard %s: %d entities (hashmod of the name)", opts.shard, len(entities))
        if not entities:
            log.warning("--shard=%s: no entity of this shard; idling (serving /metrics, puad_entities 0) "
                        "until stopped", opts.shard)
    return entities


def load_metrics(opts: LiveOptions, ckpt: dict, ckpt_name: str) -> tuple[dict, list[dict]]:
    """The metric set (--rate_window applied) and its metrics for the checkpoint's features."""
    try:
        metric_set = load_metric_set(opts.metrics_file)
    except ExportError as e:
        raise LiveError(str(e)) from None
    if opts.rate_window:
        metric_set["rate_window"] = opts.rate_window
    try:  # a window's grid needs it in whole seconds
        parse_step(metric_set["rate_window"])
    except ExportError as e:
        raise LiveError(f"rate window of {opts.metrics_file} or --rate_window: {e}") from None
    return metric_set, check_features(list(ckpt["features"]), metric_set, ckpt_name, opts.metrics_file)


def prometheus_url(opts: LiveOptions, given: set[str]) -> str:
    """--prometheus, else $PROMETHEUS_URL when set, else the default; checked."""
    url = os.environ.get("PROMETHEUS_URL") if "prometheus" not in given else None
    if url and not LIVE_CHECKS["prometheus"][0](url):
        raise LiveError(f"PROMETHEUS_URL={redact_url(url)!r}: must be {LIVE_CHECKS['prometheus'][1]}")
    return url or opts.prometheus


def warn_short_history(entity: str, scorer: scoring.Scorer, step_s: float, val_frac: float) -> None:
    """Log puad.history_warning: the threshold extrapolated far beyond the calibration rows."""
    warning = puad.history_warning(scorer, step_s, val_frac)
    if warning:
        log.warning("%s: %s", entity, warning)


def calibrate_all(model, ckpt: dict, cfg: Config, opts: LiveOptions, entities: list[str],
                  states: dict[str, EntityState]) -> dict[str, scoring.Scorer]:
    """Each known entity's Scorer (calibrate; --fixed_threshold replaces its threshold, the
    normaliser still comes from the calibration rows); a new entity waits for its own rows."""
    scorers = {}
    for e in entities:
        if states[e].new:
            log.info("%s: new (not trained on, no local file): scored with the history's scaler once Prometheus "
                     "holds %d rows of it (puad_calibrating 1 until then)", e, max(cfg.min_calib_rows, cfg.seq_len))
            continue
        scorers[e] = calibrate(model, ckpt, cfg, e, states[e])
        warn_short_history(e, scorers[e], opts.live_step, cfg.val_frac)
        if opts.fixed_threshold is not None:
            scorers[e] = scorers[e].fixed(opts.fixed_threshold)
        log.info("%s: threshold %.6g (%s)%s", e, scorers[e].threshold_, "--fixed_threshold"
                 if opts.fixed_threshold is not None else f"SPOT on the validation tail of {cfg.data}/{e}",
                 ", local prototypes" if states[e].use_local else "")
    return scorers


def setup(argv: list[str]) -> Detector:
    """A Detector from a command line (nothing served or polled yet); a start-up problem is a
    LiveError, a bad option a one-line error (exit 2)."""
    parsed = cli(argv, description=__doc__, extra=add_options, show=False, reads=READS)
    opts, given = live_options(parsed.opts)
    ckpt = read_checkpoint(parsed.cfg.ckpt)
    cfg = run_config(parsed.cfg, ckpt, parsed.given)  # the model fields are the checkpoint's
    metric_set, metrics = load_metrics(opts, ckpt, str(cfg.ckpt))
    opts = dataclasses.replace(opts, live_step=poll_step(opts, ckpt, given, str(cfg.ckpt)))
    opts = dataclasses.replace(opts, prometheus=prometheus_url(opts, given))
    print_config(cfg, changed_options(opts))
    set_threads(cfg.num_threads)
    entities = select_entities(cfg, opts, ckpt)
    model, _ = build_model(ckpt, "cpu")
    states = {e: entity_state(ckpt, cfg, e) for e in entities}
    scorers = calibrate_all(model, ckpt, cfg, opts, entities, states)
    try:  # refused now rather than at the first state change
        Path(opts.live_log).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.live_log, "a"):
            pass
    except OSError as e:
        raise LiveError(f"--live_log={opts.live_log}: cannot append to it ({e.strerror})") from None
    return Detector(cfg, opts, ckpt, model, entities, metric_set, metrics, states, scorers)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s detect_live %(levelname)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        det = setup(argv)
    except LiveError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        det.stop_event.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        det.serve()
    except OSError as e:
        print(f"{PROG}: error: cannot listen on {det.opts.listen}:{det.opts.port} ({e.strerror})", file=sys.stderr)
        return 1
    try:
        det.run()
    finally:
        det.close()
        log.info("stopped; server closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
