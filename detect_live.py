#!/usr/bin/env python3
"""Live anomaly detection: poll Prometheus, score the last window with a PUAD checkpoint,
serve the result as Prometheus metrics.

    python detect_live.py --ckpt=checkpoints/puad.ckpt --entities=catalogue,payment \
        --prometheus=http://127.0.0.1:9090 --metrics_file=labshop/metrics-lab.yaml \
        --port=9109 --num_threads=1 [--threshold=12.5] [--webhook=URL]

Every --live_step seconds (the step of the checkpoint's training rows, its step_s, train_safe.py; a
--live_step that differs is refused, one line; a checkpoint without step_s keeps --live_step, with a
warning), for every entity (= the metric set's $service): the last seq_len grid
points (plus the rate window before them) of the metric set's columns that the checkpoint was
trained on, matched BY NAME to the checkpoint's `features`; scaled with the entity's scaler (its
local file's when adapted, else the checkpoint's; refused if neither); the window scored (the
score of its last point, the window ending at it; higher = more anomalous) and compared with the
threshold.

Fleets (docs/fleet.md): a poll sends one query per column for ALL its entities (the $service
matcher turned into a regex over them, the answer split by the service label:
prometheus.grouped_query), node-level columns once, and one presence query; rows already
fetched are kept and only the new grid points plus the last REFRESH_STEPS are asked again. All
complete windows of a poll go through the model in one batch (score_windows: entities on the
global prototypes together, each entity with local prototypes in a batch of its own; a window
seen in the last poll is not run again), then scoring.apply_batch; the scores are those of one
window at a time (tested). --shard=I/N keeps the entities whose name hashes to I modulo N
(prometheus.hashmod: Prometheus' hashmod relabelling, md5), so N replicas split a fleet with no
coordination; each serves only its entities. A shard that gets no entity idles: it says so in one
log line, serves /metrics (puad_entities 0) and stops on SIGTERM like any other.

Calibration: at start-up, exactly as test.py does (puad.calibrate_entity), the score's
per-feature normaliser and the threshold (spot | percentile) come from the validation tail of
the entity's train series in --data (which defaults to the checkpoint's training data), the
latent term's memory from the train rows before that tail;
the threshold then follows the score's level as in test.py (the drift guard, `--drift_window`:
each entity keeps its last scores, the calibration's last ones at start-up);
`--threshold=NUMBER` replaces the threshold, fixed at every poll. Each poll scores the last `--smooth` windows so
that the score is test.py's causal smoothed score of the last point. A non-finite score (which
the clipped inputs of the scorer should make impossible) is never read as normal: the window
is skipped and counted as reason="non_finite".

Served on --listen:--port /metrics (own CollectorRegistry):
  puad_anomaly_score{entity}            score of the last scored window
  puad_feature_score{entity,feature}    each feature's contribution to that score over its usual
                                        level (1 = its --name_q quantile, 0.9, on the calibration
                                        rows; scoring.named): V features x entities series, bounded
  puad_anomaly{entity}                  1 when that score > threshold, else 0
  puad_threshold{entity}
  puad_stale{entity}                    1 until the entity's first scored window, and when its last one is
                                        older than --stale_steps steps (Prometheus down, data missing)
  puad_last_success_timestamp_seconds   last time every query of a poll succeeded
  puad_query_errors_total               failed polls (Prometheus unreachable, HTTP errors)
  puad_skipped_windows_total{entity,reason}  windows not scored: missing_points | no_data | non_finite
  puad_windows_scored_total{entity}
  puad_scoring_latency_seconds          histogram, scoring time per window (a poll's batch / its windows)
  puad_webhook_errors_total
  puad_live_log_errors_total            state changes --live_log could not take (the event is logged instead)
  puad_entities                         entities this detector scores (its shard's)
  process_*                             the process' CPU, memory, open files (prometheus_client)
Errors and missing data never raise an alarm: puad_anomaly KEEPS ITS LAST VALUE while windows
are skipped or Prometheus fails (it starts at 0), and puad_stale says the value is old.
A window with a missing point is skipped and counted, never filled. A point counts as missing
when Prometheus has no scrape sample (of any `up` series) within 2 steps of it, or any column
has no value there after the metric set's `fill`; the rate window after a missing point is
missing too (its rate() would be computed on partial data). While Prometheus fails, polls back
off (step, 2 x step, ... up to --max_backoff seconds).

One JSON line per state change (normal <-> anomalous), with the 3 features that name the alarm
("top_features": for an alarm, named as test.py names a flagged row, scoring.explain: V + 1
reconstructions of each of the last `smooth` windows, when the alarm is raised or re-sent only,
for at most NAMED_PER_POLL = 50 alarms a poll; otherwise, and when it clears, the 3 furthest
above their usual level), is appended to --live_log; the alert's description names them. With
--webhook the change is POSTed as an Alertmanager /api/v2/alerts list (a firing alert, re-sent
every minute while it lasts, then the same alert with endsAt when it resolves); a failed POST
is logged and counted, never fatal.
SIGTERM or SIGINT stops the loop (so does the end of --max_polls); every entity still anomalous
then gets its state change to normal (a JSON line with "reason": "detector stopped") and, with
--webhook, its resolved alert (endsAt), all in one POST sent before exiting (alerts still in flight
first), so that Alertmanager holds no alert of a stopped detector; then the HTTP server is closed
and the exit code is 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import torch

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")  # no *_created series
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,  # noqa: E402
                               start_http_server)

import puad  # noqa: E402
import scoring  # noqa: E402
from config import CHECKS, THRESHOLD_METHODS, Config, cli, print_config  # noqa: E402
from faultlog import ExportError  # noqa: E402
from prometheus import (grouped_query, load_metric_set, make_session, parse_shard,  # noqa: E402
                        parse_step, query_range, redact_url, render_query, shard_services, split_by_label)
from puad import (apply_local_state, build_model, calibrate_entity, clip_inputs, local_path,  # noqa: E402
                  read_checkpoint, run_config, window_reconstructor)
from utils import (DataError, Scaler, align_features, load_dataset, set_threads, time_step)  # noqa: E402

PROG = "detect_live.py"
QUERY_WORKERS = 4  # queries of a poll in flight at once
REFRESH_STEPS = 3  # a poll asks again for the last this many grid points (and for every point it lacks)
RESEND_S = 60.0  # a firing alert is re-posted this often (Alertmanager's resolve_timeout is 5m)
NAMED_PER_POLL = 50  # alarms named by repair (scoring.explain, ~20 ms each) in one poll; the rest of a
                     # storm keep the plain ranking until their next re-send
log = logging.getLogger("puad.live")


class LiveError(Exception):
    """A start-up problem; printed as one line, exit code 1."""


class QueryError(Exception):
    """Prometheus did not answer a query (down, timeout, HTTP error)."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


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


def entity_state(ckpt: dict, cfg: Config, entity: str) -> dict:
    """Scaler and local prototypes of one entity: local file if adapted, else the checkpoint's."""
    local, scaler = puad.entity_state(ckpt, cfg.ckpt, entity)  # refuses a local file of another model/entity
    if scaler is None:
        raise LiveError(f"entity {entity!r}: no scaler (not trained on, no local file "
                        f"{local_path(cfg.ckpt, entity)}); the checkpoint knows {sorted(ckpt['scalers'])}")
    return {"local": local, "scaler": scaler, "use_local": local is not None and cfg.use_local}


def poll_step(cfg: Config, ckpt: dict, given: set[str]) -> int:
    """The poll step in seconds: the step of the checkpoint's training rows (step_s) unless
    --live_step is given; a --live_step that differs from it is refused. A checkpoint without
    step_s (older, or trained on row-numbered data) keeps --live_step, with a warning."""
    trained = ckpt.get("step_s")
    if trained is None:
        log.warning("%s does not record the step it was trained on (step_s); --live_step=%d is not checked "
                    "against it", cfg.ckpt, cfg.live_step)
        return cfg.live_step
    whole = abs(trained - round(trained)) < 1e-3 * trained and round(trained) >= 1
    if "live_step" not in given and whole:
        return int(round(trained))
    if not whole or cfg.live_step != round(trained):
        raise LiveError(f"--live_step={cfg.live_step} does not match the step of {cfg.ckpt}'s training data "
                        f"({trained:g} s, step_s): poll at the step the model was trained on"
                        + (f" (--live_step={round(trained)})" if whole else ", in whole seconds: retrain on such data"))
    return cfg.live_step


def explicit_threshold(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        raise LiveError(f"--threshold={text}: not a finite number")
    return value


def calibrate(model, ckpt: dict, cfg: Config, entity: str, st: dict) -> scoring.Scorer:
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
    if st["local"] is not None:
        apply_local_state(model, st["local"])
    return calibrate_entity(model, ckpt, cfg, st["scaler"].transform(train), st["local"], st["use_local"], entity,
                            step_s=time_step([ent]))


# ---------------------------------------------------------------- Prometheus

def _column(session, prometheus: str, query: str, start: int, end: int, step: int, agg: str,
            timeout: float) -> dict[int, float]:
    """One query_range -> {timestamp: value}, several series combined with agg; no retries here
    (the poll loop backs off). Raises QueryError when Prometheus does not answer."""
    try:
        series = query_range(session, prometheus, query, start, end, step,
                                            timeout=timeout, retries=0)
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
    order of `metrics`, NaN rows where a point is missing (see the module docstring)
    -> (values, number of missing rows). `presence`: fetch_presence() of the same grid."""
    grid, rate_steps = window_grid(metric_set, end, n, step)
    first = int(grid[0])
    if presence is None:
        presence = fetch_presence(session, prometheus, grid, step, timeout)
    x = np.full((len(grid), len(metrics)), np.nan)
    for j, m in enumerate(metrics):
        got = _column(session, prometheus, render_query(m, metric_set, service),
                      int(first), int(end), step, m["agg"], timeout)
        x[:, j] = [got.get(int(t), np.nan) for t in grid]
        if m["fill"] is not None:
            x[:, j] = np.where(np.isnan(x[:, j]), float(m["fill"]), x[:, j])
    return mark_missing(x, grid, presence, rate_steps)


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
               first: int, end: int, step: int, timeout: float) -> np.ndarray:
    """Values (services, grid points first..end, V) of every column, `fill` applied, NaN where
    none: one query per column for all services (prometheus.grouped_query: the $service matcher
    turned into a regex over `services`, the answer split by the service's label); a node-level
    column (no $service) is queried once for all; a column whose query cannot be grouped falls
    back to one query per service. A service missing from an answer gets NaN there."""
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
        if m["fill"] is not None:
            x[:, :, j] = np.where(np.isnan(x[:, :, j]), float(m["fill"]), x[:, :, j])

    # the columns' queries are in flight together (Prometheus works on them while this process
    # parses answers); each writes its own column of x
    with ThreadPoolExecutor(min(QUERY_WORKERS, max(len(metrics), 1))) as pool:
        for future in [pool.submit(column, j, m) for j, m in enumerate(metrics)]:
            future.result()  # the first QueryError is raised here
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


# ---------------------------------------------------------------- detector

class Detector:
    def __init__(self, cfg: Config, ckpt: dict, model, entities: list[str], metric_set: dict,
                 metrics: list[dict], states: dict[str, dict], scorers: dict[str, scoring.Scorer]):
        self.cfg, self.ckpt, self.model = cfg, ckpt, model
        self.entities, self.metric_set, self.metrics = entities, metric_set, metrics
        self.states, self.scorers = states, scorers
        self.thresholds = {e: s.threshold_ for e, s in scorers.items()}
        # the drift guard's past scores per entity (scoring.live_threshold), the calibration's last ones first
        self.history = {e: deque(s.recent_, maxlen=max(s.drift_window, 1)) for e, s in scorers.items()}
        self.prometheus = cfg.prometheus
        if cfg.prometheus == Config.prometheus and os.environ.get("PROMETHEUS_URL"):
            self.prometheus = os.environ["PROMETHEUS_URL"]
        self.session = make_session()
        self.step = cfg.live_step
        self.stop_event = threading.Event()
        self.anomalous = {e: False for e in entities}
        self.last_scored = {e: 0.0 for e in entities}
        self.alert_start: dict[str, float] = {}
        self.features = list(ckpt["features"])
        self.last_input: dict[str, tuple[scoring.Reconstruction, np.ndarray]] = {}  # last rows, named contributions
        self.top: dict[str, list[str]] = {}
        self.last_post: dict[str, float] = {}
        self.last_window: dict[str, tuple[float, int]] = {}  # the last scored window's score and end, per entity
        self.posting: list[threading.Thread] = []  # alert POSTs in flight
        self.started = time.time()
        self.failures = 0
        self.rows: dict[int, tuple[np.ndarray, float]] = {}  # grid time -> (values (entities, V), presence)
        self.window_cache: dict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = {}  # window -> mu, theta0
        self.timing: dict[str, float] = {}
        self.model_windows = 0
        r = self.registry = CollectorRegistry()
        self.g_score = Gauge("puad_anomaly_score", "PUAD score of the last scored window (higher = more anomalous)", ["entity"], registry=r)
        self.g_anomaly = Gauge("puad_anomaly", "1 when the last scored window's score exceeds the threshold", ["entity"], registry=r)
        self.g_threshold = Gauge("puad_threshold", "Anomaly threshold of the entity", ["entity"], registry=r)
        self.g_stale = Gauge("puad_stale", "1 when the last scored window is older than stale_steps steps", ["entity"], registry=r)
        self.g_success = Gauge("puad_last_success_timestamp_seconds", "Unix time of the last poll whose queries all succeeded", registry=r)
        self.c_errors = Counter("puad_query_errors", "Polls that failed because Prometheus did not answer", registry=r)
        self.c_skipped = Counter("puad_skipped_windows", "Windows not scored", ["entity", "reason"], registry=r)
        self.c_scored = Counter("puad_windows_scored", "Windows scored", ["entity"], registry=r)
        self.c_webhook = Counter("puad_webhook_errors", "Failed alert POSTs to the webhook", registry=r)
        self.c_log_errors = Counter("puad_live_log_errors", "State changes that could not be appended to --live_log", registry=r)
        self.h_latency = Histogram("puad_scoring_latency_seconds", "Model time to score one window", registry=r,
                                   buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.g_feature = Gauge("puad_feature_score", "Each feature's contribution to the last score over its usual level (features x entities series)",
                               ["entity", "feature"], registry=r)
        self.g_step = Gauge("puad_step_seconds", "Poll interval", registry=r)
        self.g_step.set(self.step)
        Gauge("puad_entities", "Entities this detector scores (its shard's)", registry=r).set(len(entities))
        ProcessCollector(registry=r)
        for e in entities:
            self.g_score.labels(e).set(float("nan"))
            self.g_anomaly.labels(e).set(0)
            self.g_threshold.labels(e).set(self.thresholds[e])
            self.g_stale.labels(e).set_function(lambda e=e: float(self.is_stale(e)))
            self.c_scored.labels(e)
            for reason in ("missing_points", "no_data", "non_finite"):
                self.c_skipped.labels(e, reason)
        self.server = self.server_thread = None

    def set_threshold(self, entity: str, value: float) -> None:
        """Fix an entity's threshold at `value` for every later poll (no drift guard)."""
        self.scorers[entity] = self.scorers[entity].fixed(value)
        self.history[entity].clear()
        self.thresholds[entity] = float(value)
        self.g_threshold.labels(entity).set(float(value))

    def is_stale(self, entity: str) -> bool:
        """True until the entity's first scored window, then when that is older than stale_steps steps."""
        return not self.last_scored[entity] or time.time() - self.last_scored[entity] > self.cfg.stale_steps * self.step

    def serve(self) -> None:
        self.server, self.server_thread = start_http_server(self.cfg.port, self.cfg.listen, registry=self.registry)
        log.info("serving /metrics on http://%s:%d/metrics", self.cfg.listen, self.server.server_port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server_thread.join(timeout=5)
            self.server = None

    def score_window(self, entity: str, raw: np.ndarray) -> float:
        """Score of the last point of raw (seq_len + smooth - 1 rows): the one scorer on the
        last `smooth` windows, so the causal smoothing is test.py's."""
        return self.score_windows({entity: raw})[entity]

    def _reconstruct(self, windows: np.ndarray, use_local: bool) -> tuple[np.ndarray, np.ndarray]:
        """The model's decoder mean (B, T, V) and theta0 (B, d_theta) of scaled, clipped windows,
        in batches."""
        parts: tuple[list, list] = ([], [])
        for i in range(0, len(windows), self.cfg.score_batch):
            out = self.model.reconstruct(torch.as_tensor(np.ascontiguousarray(windows[i:i + self.cfg.score_batch])),
                                         use_local)
            parts[0].append(out["x_mu"].numpy())
            parts[1].append(out["theta0"].numpy())
        return np.concatenate(parts[0]), np.concatenate(parts[1])

    def score_windows(self, raws: dict[str, np.ndarray]) -> dict[str, float]:
        """Scores of many entities' windows (raw: seq_len + smooth - 1 rows each), batched: each
        entity's rows are scaled with its own scaler and clipped (puad.clip_inputs, as in
        score_series); the windows of every entity on the global prototypes only go through the
        model in one batch (--score_batch windows at a time); an entity with local prototypes
        (its own beta_l, loaded into the model) in one batch of its own; then scoring.score_many
        with each entity's Scorer. The same numbers as score_series on each entity alone
        (tested). A window the model saw in an earlier poll (same scaled values: the grid moved
        by one step, so smooth - 1 of the smooth windows are the last poll's) is not run again
        (posterior means are deterministic)."""
        t0 = time.perf_counter()
        seq_len, entities = self.cfg.seq_len, list(raws)
        # every entity at once (E, n, V): its own scaler, clipped; windows (E, W, T, V) as a view
        xs = clip_inputs(Scaler.transform_many([self.states[e]["scaler"] for e in entities],
                                               np.stack([raws[e] for e in entities])))
        windows = np.lib.stride_tricks.sliding_window_view(xs, seq_len, axis=1).transpose(0, 1, 3, 2)
        keys = [[w.tobytes() for w in ws] for ws in windows]
        todo: dict[bool, list] = {False: [], True: []}
        for i, e in enumerate(entities):
            old = self.window_cache.get(e, {})
            todo[bool(self.states[e]["use_local"])] += [(i, w) for w, key in enumerate(keys[i]) if key not in old]
        self.model_windows = len(todo[False]) + len(todo[True])
        groups = [(False, todo[False])]  # global prototypes only: one batch for every such entity
        by_entity: dict[int, list] = {}
        for item in todo[True]:
            by_entity.setdefault(item[0], []).append(item)
        groups += [(True, items) for items in by_entity.values()]  # local prototypes: one batch per entity
        fresh: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (entity, window) -> mu, theta0
        for use_local, items in groups:
            if not items:
                continue
            if use_local:
                apply_local_state(self.model, self.states[entities[items[0][0]]]["local"])
            mu, theta0 = self._reconstruct(np.stack([windows[i, w] for i, w in items]), use_local)
            fresh.update(zip(items, zip(mu, theta0)))
        # each window's mean (E, W, T, V) and theta0 (E, W, d), from this poll or the cache
        known = [[fresh.get((i, w)) or self.window_cache[e][key] for w, key in enumerate(keys[i])]
                 for i, e in enumerate(entities)]
        (m0, z0), size = known[0][0], windows.shape[:2]
        mu_w, z_w = np.empty(size + m0.shape, m0.dtype), np.empty(size + z0.shape, z0.dtype)
        for i, ks in enumerate(known):
            for w, (m, z) in enumerate(ks):
                mu_w[i, w], z_w[i, w] = m, z
        # to points, as window_to_point_scores and window_values_to_points: (E, n, V) and (E, n, d)
        mu = np.concatenate([mu_w[:, 0, :-1], mu_w[:, :, -1]], axis=1)
        theta0 = np.concatenate([np.repeat(z_w[:, :1], seq_len - 1, axis=1), z_w], axis=1)
        scores, named = scoring.score_many([self.scorers[e] for e in entities], xs, mu, theta0)
        results = {}
        for i, e in enumerate(entities):
            self.last_input[e] = (scoring.Reconstruction(xs[i], mu[i]), named[i])
            results[e] = float(scores[i, -1])
            self.window_cache[e] = dict(zip(keys[i], known[i]))
        per_window = (time.perf_counter() - t0) / max(len(raws), 1)
        for _ in raws:
            self.h_latency.observe(per_window)
        return results

    def poll(self, end: int) -> None:
        """One poll of every entity for the window ending at grid time `end`; raises QueryError.
        One grouped query per column and one presence query for all entities (fetch_fleet),
        then one batched scoring of every complete window (score_windows)."""
        if not self.entities:  # an empty shard idles
            return
        t0 = time.perf_counter()
        n = self.cfg.seq_len + max(self.cfg.smooth, 1) - 1  # the last `smooth` windows
        grid, rate_steps = window_grid(self.metric_set, end, n, self.step)
        # rows already fetched are kept, but the last REFRESH_STEPS points are always asked again
        # (samples scraped just before a grid point can reach Prometheus' head after the poll)
        self.rows = {t: r for t, r in self.rows.items() if grid[0] <= t < end - (REFRESH_STEPS - 1) * self.step}
        first = next((int(t) for t in grid if int(t) not in self.rows), int(end))
        presence = fetch_presence(self.session, self.prometheus, grid[grid >= first], self.step,
                                  self.cfg.query_timeout) if first <= end else {}
        x = fetch_rows(self.session, self.prometheus, self.metric_set, self.metrics, self.entities,
                       first, end, self.step, self.cfg.query_timeout)
        for k, t in enumerate(range(first, end + self.step, self.step)):
            self.rows[t] = (x[:, k], presence.get(t, 0))
        self.g_success.set(time.time())
        x = np.stack([self.rows[int(t)][0] for t in grid], axis=1)
        presence = {int(t): self.rows[int(t)][1] for t in grid}
        results = {e: mark_missing(x[i], grid, presence, rate_steps) for i, e in enumerate(self.entities)}
        t1 = time.perf_counter()
        ready = {}
        for entity, (x, n_missing) in results.items():
            if np.isnan(x).all():
                self.c_skipped.labels(entity, "no_data").inc()
            elif n_missing:
                self.c_skipped.labels(entity, "missing_points").inc()
            else:
                ready[entity] = x
        scores = self.score_windows(ready) if ready else {}
        t2 = time.perf_counter()
        named = 0  # alarms named by repair in this poll
        for entity, score in scores.items():
            if not math.isfinite(score):  # never read as normal: skipped, counted, logged
                self.c_skipped.labels(entity, "non_finite").inc()
                log.warning("%s: non-finite score for the window ending %s; skipped", entity, iso(end))
                continue
            self.c_scored.labels(entity).inc()
            self.last_scored[entity] = time.time()
            self.g_score.labels(entity).set(score)
            self.last_window[entity] = (score, end)
            contrib = self.last_input[entity][1][-1] if entity in self.last_input else None  # the last point's
            if contrib is not None:  # which metrics: each feature's contribution over its usual level
                for name, c in zip(self.features, contrib):
                    self.g_feature.labels(entity, name).set(float(c))
                self.top[entity] = [n for n, _ in scoring.top_features(contrib, self.features, 3)]
            self.thresholds[entity] = self.scorers[entity].next_threshold(np.asarray(self.history[entity]))
            self.history[entity].append(score)
            self.g_threshold.labels(entity).set(self.thresholds[entity])
            anomalous = bool(score > self.thresholds[entity])
            self.g_anomaly.labels(entity).set(int(anomalous))
            resend = anomalous and self.cfg.webhook and time.time() - self.last_post.get(entity, 0) > RESEND_S
            if (anomalous and contrib is not None and (anomalous != self.anomalous[entity] or resend)
                    and named < NAMED_PER_POLL):
                self.top[entity] = self.name_alarm(entity)  # only when an alarm is raised or re-sent
                named += 1
            if anomalous != self.anomalous[entity]:
                self.anomalous[entity] = anomalous
                self.state_change(entity, anomalous, score, end)
            elif resend:
                self.send(entity, True, score, end)  # Alertmanager resolves an alert not re-sent
        self.timing = {"query_s": t1 - t0, "score_s": t2 - t1, "update_s": time.perf_counter() - t2,
                       "step_s": time.perf_counter() - t0, "scored": len(scores),
                       "model_windows": self.model_windows if scores else 0}

    def name_alarm(self, entity: str) -> list[str]:
        """The 3 features that name an alarming window, as test.py names a flagged row
        (Scorer.explain on the last poll's rows of this entity)."""
        st = self.states[entity]
        if st["use_local"]:
            apply_local_state(self.model, st["local"])
        rec, _ = self.last_input[entity]
        weights = self.scorers[entity].explain(rec, window_reconstructor(self.model, bool(st["use_local"])),
                                               np.array([len(rec) - 1]), self.cfg.seq_len)
        return [name for name, _ in scoring.top_features(weights[-1], self.features, 3)]

    def send(self, entity: str, anomalous: bool, score: float, end: int) -> None:
        now = time.time()
        self.last_post[entity] = now
        thread = threading.Thread(target=self.post_alert, daemon=True,
                                  args=(entity, anomalous, score, end, self.alert_start.get(entity, now), now))
        thread.start()
        self.posting = [t for t in self.posting if t.is_alive()] + [thread]

    def state_change(self, entity: str, anomalous: bool, score: float, end: int, reason: str | None = None,
                     notify: bool = True) -> None:
        now = time.time()
        event = {"time": iso(now), "entity": entity, "state": "anomalous" if anomalous else "normal",
                 "score": round(score, 6), "threshold": round(self.thresholds[entity], 6),
                 "top_features": self.top.get(entity, []), "window_end": iso(end), "window_end_unix": end}
        if reason:
            event["reason"] = reason
        try:
            with open(self.cfg.live_log, "a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError as e:  # a full disk or a read-only file system: the event is logged here instead
            self.c_log_errors.inc()
            log.warning("cannot append to --live_log %s (%s); event: %s", self.cfg.live_log, e.strerror, json.dumps(event))
        log.info("%s: %s (score %.4g, threshold %.4g; top features %s)", entity, event["state"], score,
                 self.thresholds[entity], ", ".join(event["top_features"]) or "n/a")
        if anomalous:
            self.alert_start[entity] = now
        if self.cfg.webhook and notify:
            self.send(entity, anomalous, score, end)

    def resolve_all(self) -> None:
        """At stop: every entity still anomalous changes to normal (a JSON line each) and, with
        --webhook, its resolved alert is POSTed, all in one request, after the POSTs in flight."""
        for thread in self.posting:  # a firing alert that arrived after its resolution would stay active
            thread.join(timeout=10)
        open_ = [e for e in self.entities if self.anomalous[e]]
        for entity in open_:
            self.anomalous[entity] = False
            self.g_anomaly.labels(entity).set(0)
            self.state_change(entity, False, *self.last_window[entity], reason="detector stopped", notify=False)
        if open_ and self.cfg.webhook:
            now = time.time()
            self.post([self.alert(e, False, *self.last_window[e], self.alert_start.get(e, now), now) for e in open_])
            log.info("resolved %d alert(s) at %s", len(open_), self.cfg.webhook)

    def post_alert(self, entity: str, anomalous: bool, score: float, end: int, start: float, now: float) -> None:
        self.post([self.alert(entity, anomalous, score, end, start, now)])

    def alert(self, entity: str, anomalous: bool, score: float, end: int, start: float, now: float) -> dict:
        """One alert in Alertmanager's /api/v2/alerts shape (resolved: with endsAt)."""
        alert = {"labels": {"alertname": "PUADAnomaly", "entity": entity, "severity": "warning",
                            "source": "detect_live"},
                 "annotations": {"summary": f"PUAD anomaly on {entity}",
                                 "description": ", ".join(self.top.get(entity, [])),
                                 "details": f"score {score:.4g} > threshold {self.thresholds[entity]:.4g} "
                                            f"for the window ending {iso(end)}; the metrics behind it, most first: "
                                            f"{', '.join(self.top.get(entity, [])) or 'n/a'}",
                                 "score": f"{score:.6g}", "threshold": f"{self.thresholds[entity]:.6g}"},
                 "startsAt": iso(start),
                 "generatorURL": f"http://{self.cfg.listen}:{self.cfg.port}/metrics"}
        if not anomalous:
            alert["endsAt"] = iso(now)
        return alert

    def post(self, alerts: list[dict]) -> None:
        """POST alerts to --webhook; a failure is logged and counted."""
        try:
            r = requests.post(self.cfg.webhook, json=alerts, timeout=5)
            if r.status_code >= 300:
                raise requests.RequestException(f"HTTP {r.status_code}: {r.text[:200]}")
        except requests.RequestException as e:
            self.c_webhook.inc()
            log.warning("webhook %s: %s", redact_url(self.cfg.webhook), redact_url(str(e)[:300]))

    def run(self) -> None:
        """Poll every step until SIGTERM/SIGINT or --max_polls; then resolve what is still anomalous."""
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
                self.c_errors.inc()
                self.failures += 1
                delay = min(self.step * 2 ** (self.failures - 1), self.cfg.max_backoff)
                log.warning("poll of %s failed (%d in a row; next try in %.1fs): %s",
                            iso(end), self.failures, delay, str(e)[:300])
            next_end = end + self.step
            polls += 1
            if self.cfg.max_polls and polls >= self.cfg.max_polls:
                break


def setup(argv: list[str]) -> Detector:
    parsed = cli(argv, description=__doc__, show=False)
    ckpt = read_checkpoint(parsed.cfg.ckpt)
    cfg = run_config(parsed.cfg, ckpt, parsed.given)  # the model fields are the checkpoint's
    try:
        metric_set = load_metric_set(cfg.metrics_file)
    except ExportError as e:
        raise LiveError(str(e)) from None
    if cfg.rate_window:
        metric_set["rate_window"] = cfg.rate_window
    try:  # a window's grid needs it in whole seconds
        parse_step(metric_set["rate_window"])
    except ExportError as e:
        raise LiveError(f"rate window of {cfg.metrics_file} or --rate_window: {e}") from None
    metrics = check_features(list(ckpt["features"]), metric_set, str(cfg.ckpt), cfg.metrics_file)
    cfg = dataclasses.replace(cfg, live_step=poll_step(cfg, ckpt, parsed.given))
    print_config(cfg)
    prometheus = os.environ.get("PROMETHEUS_URL") if cfg.prometheus == Config.prometheus else None
    if prometheus and not CHECKS["prometheus"][0](prometheus):
        raise LiveError(f"PROMETHEUS_URL={redact_url(prometheus)!r}: must be {CHECKS['prometheus'][1]}")
    if cfg.live_step < 1:
        raise LiveError("--live_step must be >= 1 second")
    set_threads(cfg.num_threads)
    if cfg.entity:
        entities = [cfg.entity]
    elif cfg.entities in ("all", ""):
        entities = list(ckpt.get("entities") or ckpt["scalers"])
    else:
        entities = list(dict.fromkeys(e.strip() for e in cfg.entities.split(",") if e.strip()))
    if not entities:
        raise LiveError(f"--entities={cfg.entities!r}: no entity")
    if cfg.shard:
        shard = parse_shard(cfg.shard)
        entities = shard_services(entities, shard)
        log.info("shard %s: %d entities (hashmod of the name)", cfg.shard, len(entities))
        if not entities:
            log.warning("--shard=%s: no entity of this shard; idling (serving /metrics, puad_entities 0) "
                        "until stopped", cfg.shard)
    model, _ = build_model(ckpt, "cpu")
    states = {e: entity_state(ckpt, cfg, e) for e in entities}
    fixed = explicit_threshold(cfg.threshold)
    if fixed is None and cfg.threshold.lower() not in THRESHOLD_METHODS:
        raise LiveError(f"--threshold={cfg.threshold}: give a number, spot or percentile")
    scorers = {}
    for e in entities:
        # an explicit threshold still needs the score's normaliser from the calibration rows
        scorers[e] = calibrate(model, ckpt, dataclasses.replace(cfg, threshold="spot") if fixed is not None
                                    else cfg, e, states[e])
        if fixed is not None:
            scorers[e] = scorers[e].fixed(fixed)
        log.info("%s: threshold %.6g (%s)%s", e, scorers[e].threshold_, "--threshold" if fixed is not None
                 else f"{cfg.threshold} on the validation tail of {cfg.data}/{e}",
                 ", local prototypes" if states[e]["use_local"] else "")
    try:  # refused now rather than at the first state change
        Path(cfg.live_log).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.live_log, "a"):
            pass
    except OSError as e:
        raise LiveError(f"--live_log={cfg.live_log}: cannot append to it ({e.strerror})") from None
    return Detector(cfg, ckpt, model, entities, metric_set, metrics, states, scorers)


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
        print(f"{PROG}: error: cannot listen on {det.cfg.listen}:{det.cfg.port} ({e.strerror})", file=sys.stderr)
        return 1
    try:
        det.run()
    finally:
        det.close()
        log.info("stopped; server closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
