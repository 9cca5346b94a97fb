#!/usr/bin/env python3
"""Export Prometheus metrics of sock-shop services into the project's dataset layout.

    python export_metrics.py --start 2026-11-24T02:00:00Z --end 2026-11-24T04:00:00Z \
        --fault_log faults.csv --out Dataset/sockshop

writes, for every service of the metric set (chaos/metrics-sockshop.yaml by default):

    DIR/<service>/train.csv       timestamp, <metric columns in YAML order>   (timestamp < train_end)
    DIR/<service>/test.csv        same columns                               (timestamp >= train_end)
    DIR/<service>/test_label.csv  timestamp, label, fault

Rules (also printed by --help):
- Times: ISO 8601 with 'Z' or an offset, or unix seconds. A time without a zone is refused
  (a silent local/UTC mix-up would shift every label), and so is a number > 1e11: that is a
  time in milliseconds (refused with the value in seconds as a hint, never converted silently).
- Grid: timestamps are integer unix seconds on multiples of --step, from the first multiple
  >= --start to the last one <= --end. Ranges are split so that no request asks for more than
  11,000 points per series (Prometheus' limit). More than 5,000,000 grid points are refused
  up front (a larger --step or a shorter range).
- Several series from one query (one per pod, ...) are combined point by point with the
  metric's `agg` (sum by default; mean, max, min). ±Inf and NaN values count as missing.
- Missing points: a metric's `fill` value if it has one; otherwise runs of at most --max_gap
  steps are filled (linear interpolation inside the series, nearest value at its start or
  end); longer runs are reported as warnings and those rows are DROPPED for that service,
  because the project's loader refuses NaN. A query that returns no data at all is an error.
- Split: rows with timestamp < --train_end go to train.csv, the rest to test.csv. Without
  --train_end: with no fault log everything goes to train.csv (a normal-traffic recording);
  with a fault log, train_end is the start of the first fault in the range minus
  --label_margin, so train.csv holds only time before any fault.
- Labels: test_label.csv has label 1 where the timestamp lies in a fault window
  [start - margin, end + margin] (both ends included), and `fault` = the fault kind ('+'-joined
  when faults overlap; empty outside faults). --label_scope target (default): a service is
  labelled only by faults whose target is that service; all: every fault labels every service.
- --out must be empty or absent; a non-empty folder (an existing dataset) is refused unless
  --overwrite, which replaces it whole: the dataset is written to a temporary folder next to
  --out and swapped in only when every query succeeded, so a failed export changes nothing
  and no file of the old dataset survives a successful one.
- Interpretation (which columns a fault moves): when the metric set has an `interpretation:`
  mapping (fault kind -> columns), DIR/<service>/interpretation.csv gets one row per fault
  whose target is that service and that has test rows: start,end = first and last test row
  (0-based, inclusive) inside the fault's labelled window, features = the kind's columns
  ';'-joined. Services labelled only by scope (a fault on another service) get no rows; a
  service with no rows gets no file. `--interpretation_only` writes just these files for an
  already exported folder, from its test_label.csv and the fault log (see
  write_interpretation()).
- Auth: bearer token from PROMETHEUS_TOKEN, or basic auth from PROMETHEUS_USER and
  PROMETHEUS_PASSWORD. TLS certificates are verified (--ca_cert FILE, or --insecure).

The fault log (written by chaos/inject.py and the local lab) is a CSV with the header
`start,end,kind,target,name`, times like 2026-11-24T03:20:00Z; see append_fault().
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
from tqdm import tqdm

from faultlog import (FAULT_KINDS, FAULT_LOG_COLUMNS, ExportError, append_fault, format_time,  # noqa: F401
                      parse_time, read_fault_log)
from prometheus import (AGGREGATIONS, DEFAULT_PROMETHEUS, load_metric_set, make_session,  # noqa: F401
                        parse_step, query_range, render_query, warn)

PROG = "export_metrics.py"
DEFAULT_METRIC_SET = Path(__file__).resolve().parent / "chaos" / "metrics-sockshop.yaml"
MAX_POINTS = 11_000  # Prometheus refuses query_range requests with more points per series
MAX_ROWS = 5_000_000  # grid points per export (about 58 days at 1s, 2.4 years at 15s): memory
DEFAULT_MAX_GAP = 4
DATASET_FILES = ("train.csv", "test.csv", "test_label.csv")
INTERPRETATION_FILE = "interpretation.csv"


# ---------------------------------------------------------------- one column

def grid(start: Any, end: Any, step: int) -> np.ndarray:
    """Integer unix seconds on multiples of step within [start, end]."""
    first = math.ceil(parse_time(start) / step) * step
    last = math.floor(parse_time(end) / step) * step
    if last < first:
        raise ExportError(f"no {step}s step between {format_time(start)} and {format_time(end)}")
    rows = (last - first) // step + 1
    if rows > MAX_ROWS:  # refused before anything is allocated or queried
        raise ExportError(f"{rows:,} grid points from {format_time(start)} to {format_time(end)} at {step}s "
                          f"steps, more than {MAX_ROWS:,}: give a larger --step (>= "
                          f"{math.ceil((last - first) / (MAX_ROWS - 1))}s) or a shorter range")
    return np.arange(first, last + step, step, dtype=np.int64)


def fetch_column(session: requests.Session, prometheus: str, query: str, timestamps: np.ndarray,
                 step: int, agg: str = "sum", what: str = "query", timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5) -> pd.Series:
    """Query one column over the grid (split into requests of <= MAX_POINTS points) and
    combine several series with `agg` -> float Series indexed by timestamp, NaN where
    missing. Raises ExportError if the query returns no data at all."""
    pieces = []
    for i in range(0, len(timestamps), MAX_POINTS):
        chunk = timestamps[i:i + MAX_POINTS]
        series = query_range(session, prometheus, query, int(chunk[0]), int(chunk[-1]), step,
                             what, timeout, retries, backoff)
        frame = pd.DataFrame({  # parse_matrix's values: float (time, value) arrays
            n: pd.Series(s["values"][:, 1], index=np.rint(s["values"][:, 0]).astype(np.int64), dtype=float)
            for n, s in enumerate(series)})
        if frame.empty:
            continue
        frame = frame.replace([np.inf, -np.inf], np.nan)
        if agg == "sum":
            pieces.append(frame.sum(axis=1, min_count=1))
        else:
            pieces.append(getattr(frame, agg)(axis=1))
    values = pd.concat(pieces) if pieces else pd.Series(dtype=float)
    values = values[~values.index.duplicated()].reindex(timestamps)
    if values.isna().all():
        raise ExportError(f"{what} returned no data between {format_time(timestamps[0])} and "
                          f"{format_time(timestamps[-1])}; query: {query}")
    return values


def fill_gaps(values: pd.Series, max_gap: int) -> tuple[pd.Series, list[tuple[int, int]]]:
    """Fill runs of at most max_gap missing points (linear inside the series, nearest value
    at its ends) -> (filled series, [(first, last) timestamp of each longer run, left NaN])."""
    missing = values.isna().to_numpy()
    if not missing.any():
        return values, []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], missing.astype(np.int8), [0]))))
    inside = values.interpolate(method="linear", limit_area="inside")
    nearest = values.ffill().bfill()
    result = values.copy()
    long_gaps = []
    for first, stop in zip(edges[0::2], edges[1::2]):  # stop is exclusive
        if stop - first > max_gap:
            long_gaps.append((int(values.index[first]), int(values.index[stop - 1])))
        elif first > 0 and stop < len(values):
            result.iloc[first:stop] = inside.iloc[first:stop]
        else:
            result.iloc[first:stop] = nearest.iloc[first:stop]
    return result, long_gaps


def fetch_service(session: requests.Session, prometheus: str, metric_set: dict, service: str,
                  timestamps: np.ndarray, step: int, max_gap: int, timeout: float = 30.0,
                  retries: int = 3, backoff: float = 0.5, bar: tqdm | None = None,
                  ) -> tuple[pd.DataFrame, list[str]]:
    """All columns of one service on the grid, gaps handled -> (frame with a timestamp column
    and no NaN, warnings about dropped rows)."""
    columns = {}
    warnings = []
    for metric in metric_set["metrics"]:
        column = metric["column"]
        what = f"column '{column}' (service {service})"
        values = fetch_column(session, prometheus, render_query(metric, metric_set, service),
                              timestamps, step, metric["agg"], what, timeout, retries, backoff)
        if metric["fill"] is not None:
            values = values.fillna(float(metric["fill"]))
        values, long_gaps = fill_gaps(values, max_gap)
        for first, last in long_gaps:
            steps = (last - first) // step + 1
            warnings.append(f"{service}/{column}: no data from {format_time(first)} to "
                            f"{format_time(last)} ({steps} steps > max_gap {max_gap}); "
                            "those rows are dropped")
        columns[column] = values.to_numpy()
        if bar is not None:
            bar.update(1)
    frame = pd.DataFrame({"timestamp": timestamps, **columns})
    return frame.dropna().reset_index(drop=True), warnings


# ---------------------------------------------------------------- labels

def make_labels(timestamps: np.ndarray, faults: list[dict], service: str,
                label_margin: float = 0, label_scope: str = "target") -> pd.DataFrame:
    """-> DataFrame timestamp, label (0/1), fault (kind, '+'-joined on overlap, '' outside)."""
    timestamps = np.asarray(timestamps, dtype=np.int64)
    kinds = [[] for _ in timestamps]
    for fault in faults:
        if label_scope == "target" and fault["target"] != service:
            continue
        inside = ((timestamps >= fault["start"] - label_margin)
                  & (timestamps <= fault["end"] + label_margin))
        for i in np.flatnonzero(inside):
            if fault["kind"] not in kinds[i]:
                kinds[i].append(fault["kind"])
    return pd.DataFrame({"timestamp": timestamps,
                         "label": np.array([1 if k else 0 for k in kinds], dtype=np.int64),
                         "fault": ["+".join(k) for k in kinds]})


def make_interpretation(test_timestamps: np.ndarray, faults: list[dict], service: str,
                        interpretation: dict[str, list[str]], label_margin: float = 0
                        ) -> pd.DataFrame:
    """-> DataFrame start, end (0-based inclusive rows of test_timestamps), features (';'-joined
    columns of the fault's kind): one row per fault whose target is `service`, whose kind the
    mapping declares, and whose window [start - margin, end + margin] holds test rows. These
    rows are labelled 1 by make_labels with the same faults and margin (any scope)."""
    rows = _interpretation_rows(test_timestamps, faults, service, interpretation, label_margin)
    return pd.DataFrame([r[:3] for r in rows], columns=["start", "end", "features"])


def _interpretation_rows(test_timestamps: np.ndarray, faults: list[dict], service: str,
                         interpretation: dict[str, list[str]], label_margin: float
                         ) -> list[tuple[int, int, str, str]]:
    """make_interpretation's rows, each with its fault kind as a fourth field."""
    timestamps = np.asarray(test_timestamps, dtype=np.int64)
    rows = []
    for fault in faults:
        if fault["target"] != service or fault["kind"] not in interpretation:
            continue
        inside = np.flatnonzero((timestamps >= fault["start"] - label_margin)
                                & (timestamps <= fault["end"] + label_margin))
        if inside.size:
            rows.append((int(inside[0]), int(inside[-1]), ";".join(interpretation[fault["kind"]]),
                         fault["kind"]))
    return rows


def write_interpretation(out: str | os.PathLike, metric_set_path: str | os.PathLike | dict,
                         fault_log: str | os.PathLike | list[dict], label_margin: float = 0,
                         services: list[str] | None = None) -> dict[str, int]:
    """Write DIR/<service>/interpretation.csv for an already exported folder (no Prometheus):
    test rows from its test_label.csv, faults from the fault log, columns from the metric
    set's `interpretation:`. Every row must lie on rows labelled with its fault's kind (else
    the margin or fault log differs from the export's). -> {service: number of rows}."""
    check_options(label_margin=label_margin)
    metric_set = load_metric_set(metric_set_path, services=services)
    if not metric_set["interpretation"]:
        raise ExportError(f"{metric_set_path}: no 'interpretation' mapping")
    faults = fault_log if isinstance(fault_log, list) else read_fault_log(fault_log)
    files, stale, counts = {}, [], {}
    for service in metric_set["services"]:
        folder = Path(out) / service
        label_path = folder / "test_label.csv"
        if not label_path.is_file():
            raise ExportError(f"{label_path} does not exist")
        try:
            labels = pd.read_csv(label_path, dtype={"fault": str}, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
            raise ExportError(f"{label_path}: cannot parse CSV ({str(e).splitlines()[0]})") from None
        if not {"timestamp", "label", "fault"} <= set(labels.columns):
            raise ExportError(f"{label_path}: needs columns timestamp,label,fault")
        rows = _interpretation_rows(labels["timestamp"].to_numpy(), faults, service,
                                    metric_set["interpretation"], label_margin)
        for start, end, _, kind in rows:
            part = labels.iloc[start:end + 1]
            if not (part["label"] == 1).all() or not all(kind in k.split("+") for k in part["fault"]):
                raise ExportError(f"{label_path}: rows {start}..{end} are not all labelled "
                                  f"{kind}; do --label_margin and the fault log match the export?")
        frame = pd.DataFrame([r[:3] for r in rows], columns=["start", "end", "features"])
        counts[service] = len(frame)
        if len(frame):
            files[folder / INTERPRETATION_FILE] = frame
        else:
            stale.append(folder / INTERPRETATION_FILE)
    try:
        for path, frame in files.items():  # every file checked before any is written
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", newline="") as f:
                    frame.to_csv(f, index=False)
                os.chmod(temp, 0o644)
                os.replace(temp, path)
            finally:
                Path(temp).unlink(missing_ok=True)
        for path in stale:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    return counts


# ---------------------------------------------------------------- writing

def _write_dataset(out: Path, files: dict[Path, pd.DataFrame | bytes]) -> None:
    """Write every frame or byte string (paths relative to out) into a new temp folder beside
    out, then swap it in for out whole: a reader sees the old dataset or the new one, never a
    mix, and no file of the old dataset survives (but the inputs inside it: inputs_inside). On
    any error (a full disk: ExportError) the temp folder is removed and out is unchanged."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise ExportError(f"cannot write --out {out}: {e.strerror}") from None
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o777 & ~umask)  # mkdtemp makes 0700: the dataset gets the usual permissions
        for rel, content in files.items():
            (temp / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(temp / rel, "wb") as f:
                if isinstance(content, bytes):
                    f.write(content)
                else:
                    content.to_csv(f, index=False)
                f.flush()
                os.fsync(f.fileno())
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        try:
            os.rename(temp, out)
        except OSError:
            if old is not None:  # put the old dataset back
                os.replace(old / out.name, out)
            raise
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None and not (old / out.name).exists():  # never a folder holding the old dataset
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write --out {out}: {e.strerror or e}; nothing changed") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_options(**values: float) -> None:
    """Refuse an option out of its range (NaN included), naming it: timeout > 0; label_margin,
    max_gap, retries, backoff >= 0; max_gap and retries whole numbers."""
    for name, value in values.items():
        whole = name in ("max_gap", "retries")
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > 0 if name == "timeout" else value >= 0) and (not whole or value == int(value)))
        if not ok:
            kind = "a number of seconds > 0" if name == "timeout" else \
                "a whole number >= 0" if whole else "a finite number >= 0"
            raise ExportError(f"--{name}={value!r}: must be {kind}")


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output folder that is not empty unless overwrite (then export replaces it whole)."""
    if not str(out).strip():
        raise ExportError("--out is empty: give the dataset's folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    for inside in (Path.cwd(), Path(__file__).resolve().parent):  # --overwrite must not replace these
        if inside.resolve().is_relative_to(out.resolve()):
            raise ExportError(f"--out {out}: holds {inside} (the current folder or this repository); "
                              "give a folder of its own for the dataset")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: not empty (an existing dataset?); give --overwrite to replace "
                          "it whole, or another --out")


# ---------------------------------------------------------------- export

def export(prometheus: str, metric_set_path: str | os.PathLike | dict, start: Any, end: Any,
           step: Any = "15s", out: str | os.PathLike = "Dataset/sockshop", train_end: Any = None,
           fault_log: str | os.PathLike | list[dict] | None = None, label_margin: float = 0,
           label_scope: str = "target", services: list[str] | None = None,
           namespace: str | None = None, max_gap: int = DEFAULT_MAX_GAP,
           session: requests.Session | None = None, timeout: float = 30.0, retries: int = 3,
           backoff: float = 0.5, progress: bool = True, overwrite: bool = False,
           interpretation_faults: list[dict] | None = None) -> dict:
    """Export one dataset (see the module docstring for the rules) -> {'out', 'columns',
    'train_end' (unix s or None), 'faults' (in range), 'warnings', 'services': {service:
    {'train_rows', 'test_rows', 'anomalous_rows', 'interpretation_rows', 'dropped_rows',
    'files'}}}. interpretation_faults: the faults with their real targets when the fault
    list given for labels has been widened (lab.py's target+front-end scope); default: the
    fault log. Raises ExportError; writes nothing unless every query succeeded. A non-empty
    `out` is refused unless overwrite, and then replaced whole (no file of the old dataset is kept)."""
    step_s = parse_step(step)
    start_s, end_s = parse_time(start), parse_time(end)
    if end_s <= start_s:
        raise ExportError(f"--end ({format_time(end_s)}) must be after --start "
                          f"({format_time(start_s)})")
    if label_scope not in ("target", "all"):
        raise ExportError(f"label_scope must be 'target' or 'all', got {label_scope!r}")
    check_options(label_margin=label_margin, max_gap=max_gap, timeout=timeout, retries=retries, backoff=backoff)
    check_out(out, overwrite)
    kept = inputs_inside(out, fault_log, metric_set_path)  # read now: --overwrite replaces out whole
    metric_set = load_metric_set(metric_set_path, namespace, services)
    timestamps = grid(start_s, end_s, step_s)
    faults = faults_in_range(fault_log, timestamps, label_margin, label_scope, metric_set)
    split = train_split(train_end, faults, label_margin)
    results, warnings = query_services(session or make_session(), prometheus, metric_set, timestamps, step_s,
                                       max_gap, timeout, retries, backoff, progress)
    out = Path(out)
    summary = {"out": str(out), "columns": [m["column"] for m in metric_set["metrics"]],
               "train_end": None if split is None else int(split), "faults": faults,
               "warnings": warnings, "services": {}}
    files: dict[Path, pd.DataFrame | bytes] = dict(kept)
    for service, frame in results.items():
        service_files, info = split_service(service, frame, split, faults, interpretation_faults, metric_set,
                                            label_margin, label_scope)
        files.update(service_files)
        summary["services"][service] = dict(info, dropped_rows=len(timestamps) - len(frame),
                                            files=[str(out / p) for p in service_files])
    check_out(out, overwrite)  # again: another run may have written there while this one queried
    _write_dataset(out, files)
    return summary


def inputs_inside(out: str | os.PathLike, *inputs: Any) -> dict[Path, bytes]:
    """Input files (the fault log, the metric set) that lie inside `out` -> {path inside out: their
    bytes}: written again into the new dataset, so that --overwrite never deletes an input
    (Dataset/lab keeps its fault log in the dataset's folder)."""
    kept = {}
    root = Path(out).resolve()
    for path in inputs:
        if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
            continue
        real = Path(path).resolve()
        if real.is_relative_to(root):
            try:
                kept[real.relative_to(root)] = real.read_bytes()
            except OSError as e:
                raise ExportError(f"cannot read {path}: {e.strerror}") from None
    return kept


def faults_in_range(fault_log: str | os.PathLike | list[dict] | None, timestamps: np.ndarray, label_margin: float,
                    label_scope: str, metric_set: dict) -> list[dict]:
    """The faults of the log (a path or a list) whose labelled window meets the grid; warns when
    none does, or when a fault's target is not an exported service."""
    if fault_log is None:
        return []
    all_faults = fault_log if isinstance(fault_log, list) else read_fault_log(fault_log)
    faults = [f for f in all_faults
              if f["end"] + label_margin >= timestamps[0]
              and f["start"] - label_margin <= timestamps[-1]]
    if not faults:
        warn(f"no fault of the fault log lies between {format_time(timestamps[0])} and "
             f"{format_time(timestamps[-1])}; all labels are 0")
    for target in sorted({f["target"] for f in faults} - set(metric_set["services"])):
        if label_scope == "target":
            warn(f"faults on '{target}' label nothing: it is not an exported service")
    return faults


def train_split(train_end: Any, faults: list[dict], label_margin: float) -> float | None:
    """Where train.csv ends: --train_end, else before the first fault, else None (all train)."""
    if train_end is not None:
        return parse_time(train_end)
    if faults:
        split = min(f["start"] for f in faults) - label_margin
        warn(f"no --train_end: train.csv ends before the first fault, at {format_time(split)}")
        return split
    return None


def query_services(session: requests.Session, prometheus: str, metric_set: dict, timestamps: np.ndarray,
                   step_s: int, max_gap: int, timeout: float, retries: int, backoff: float,
                   progress: bool) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Every column of every service over the grid -> ({service: frame}, warnings)."""
    results, warnings = {}, []
    total = len(metric_set["services"]) * len(metric_set["metrics"])
    with tqdm(total=total, desc="queries", unit="query", disable=not progress,
              file=sys.stderr) as bar:
        for service in metric_set["services"]:
            frame, service_warnings = fetch_service(
                session, prometheus, metric_set, service, timestamps, step_s, max_gap,
                timeout, retries, backoff, bar)
            warnings += service_warnings
            results[service] = frame
    for message in warnings:
        warn(message)
    return results, warnings


def split_service(service: str, frame: pd.DataFrame, split: float | None, faults: list[dict],
                  interpretation_faults: list[dict] | None, metric_set: dict, label_margin: float,
                  label_scope: str) -> tuple[dict[Path, pd.DataFrame], dict]:
    """One service's files (paths inside out: train, test, labels, interpretation) and its row counts."""
    folder = Path(service)  # inside out
    if split is None:
        train, test = frame, frame.iloc[0:0]
    else:
        train, test = frame[frame["timestamp"] < split], frame[frame["timestamp"] >= split]
    if train.empty:
        raise ExportError(f"{service}: no rows left to export" if split is None else
                          f"{service}: no rows before train_end {format_time(split)} "
                          "(does the first fault start at the beginning of the range? "
                          "give --train_end)")
    if split is not None and test.empty:
        raise ExportError(f"{service}: no rows at or after train_end {format_time(split)}")
    labels = make_labels(frame["timestamp"].to_numpy(), faults, service, label_margin,
                         label_scope)
    if split is not None and labels.loc[frame["timestamp"].to_numpy() < split, "label"].any():
        warn(f"{service}: faults lie in the train part (before {format_time(split)})")
    files = {folder / "train.csv": train}
    interpretation = pd.DataFrame()
    if split is not None:
        files[folder / "test.csv"] = test
        files[folder / "test_label.csv"] = labels[labels["timestamp"] >= split]
        interpretation = make_interpretation(
            test["timestamp"].to_numpy(),
            faults if interpretation_faults is None else interpretation_faults, service,
            metric_set["interpretation"], label_margin)
    if len(interpretation):
        files[folder / INTERPRETATION_FILE] = interpretation
    info = {"train_rows": len(train), "test_rows": len(test),
            "anomalous_rows": int(labels.loc[labels["timestamp"] >= split, "label"].sum())
            if split is not None else 0,
            "interpretation_rows": len(interpretation)}
    return files, info


def fetch_window(prometheus: str, metric_set: str | os.PathLike | dict, service: str, end: Any,
                 n_steps: int, step: Any = "15s", session: requests.Session | None = None,
                 max_gap: int = DEFAULT_MAX_GAP, timeout: float = 10.0, retries: int = 2,
                 backoff: float = 0.5) -> pd.DataFrame:
    """The last n_steps grid points up to `end` (e.g. 'now') of one service's metrics ->
    DataFrame timestamp + metric columns, gaps handled as in export(). Rows inside longer
    gaps are dropped, so fewer than n_steps rows can come back."""
    step_s = parse_step(step)
    check_options(max_gap=max_gap, timeout=timeout, retries=retries, backoff=backoff)
    metric_set = load_metric_set(metric_set)
    last = math.floor(parse_time(end) / step_s) * step_s
    timestamps = np.arange(last - (n_steps - 1) * step_s, last + step_s, step_s, dtype=np.int64)
    frame, _ = fetch_service(session or make_session(), prometheus, metric_set, service,
                             timestamps, step_s, max_gap, timeout, retries, backoff)
    return frame


# ---------------------------------------------------------------- CLI

def make_parser() -> argparse.ArgumentParser:
    """export_metrics.py's options."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="See the top of export_metrics.py for the grid, gap, split and label rules.")
    parser.add_argument("--prometheus", default=os.environ.get("PROMETHEUS_URL", DEFAULT_PROMETHEUS),
                        help="Prometheus base URL (env PROMETHEUS_URL; default %(default)s)")
    parser.add_argument("--metrics", default=str(DEFAULT_METRIC_SET),
                        help="metric set YAML (default chaos/metrics-sockshop.yaml)")
    parser.add_argument("--start", help="ISO 8601 with Z/offset, or unix seconds (required)")
    parser.add_argument("--end", help="ISO 8601 with Z/offset, or unix seconds (required)")
    parser.add_argument("--step", default="15s", help="grid step (default %(default)s)")
    parser.add_argument("--train_end", help="rows before this go to train.csv, the rest to test.csv")
    parser.add_argument("--fault_log", help="fault log CSV (start,end,kind,target,name)")
    parser.add_argument("--label_margin", type=float, default=0,
                        help="seconds added on both sides of every fault window (default 0)")
    parser.add_argument("--label_scope", choices=("target", "all"), default="target",
                        help="target: a service is labelled by its own faults only (default)")
    parser.add_argument("--services", help="comma separated, overrides the metric set's list")
    parser.add_argument("--namespace", help="overrides the metric set's namespace")
    parser.add_argument("--max_gap", type=int, default=DEFAULT_MAX_GAP,
                        help="fill runs of at most this many missing steps (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a failed request (default %(default)s)")
    parser.add_argument("--backoff", type=float, default=0.5,
                        help="first retry delay in seconds, doubled each time")
    parser.add_argument("--ca_cert", help="CA bundle to verify Prometheus' TLS certificate")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="output folder, one subfolder per service")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out whole (refused without this)")
    parser.add_argument("--interpretation_only", action="store_true",
                        help="only write OUT/<service>/interpretation.csv of an exported folder "
                        "from its test_label.csv, --fault_log and the metric set's "
                        "interpretation mapping (no Prometheus)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    services = ([s.strip() for s in args.services.split(",") if s.strip()]
                if args.services else None)
    if args.interpretation_only:
        if not args.fault_log:
            parser.error("--interpretation_only needs --fault_log")
        try:
            counts = write_interpretation(args.out, args.metrics, args.fault_log,
                                          args.label_margin, services)
        except ExportError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        for service, n in counts.items():
            print(f"{service}: {n} interpretation row(s)"
                  + (f" -> {Path(args.out) / service / INTERPRETATION_FILE}" if n else ""))
        return 0
    if not args.start or not args.end:
        parser.error("--start and --end are required")

    verify: bool | str = False if args.insecure else (args.ca_cert or True)
    try:
        summary = export(
            args.prometheus, args.metrics, args.start, args.end, args.step, args.out,
            train_end=args.train_end, fault_log=args.fault_log, label_margin=args.label_margin,
            label_scope=args.label_scope,
            services=services,
            namespace=args.namespace, max_gap=args.max_gap,
            session=make_session(verify=verify), timeout=args.timeout, retries=args.retries,
            backoff=args.backoff, progress=not args.no_progress, overwrite=args.overwrite)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    for service, info in summary["services"].items():
        print(f"{service}: {info['train_rows']} train rows, {info['test_rows']} test rows "
              f"({info['anomalous_rows']} labelled anomalous, {info['interpretation_rows']} "
              f"interpretation rows), {info['dropped_rows']} dropped "
              f"-> {Path(summary['out']) / service}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
