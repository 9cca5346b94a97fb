"""The fault log: the CSV that chaos/inject.py and lab.py write while faults run, and
export_metrics.py and the tests read to label a recording.

Header `start,end,kind,target,name`, one fault per row, times like 2026-11-24T03:20:00Z (UTC,
whole seconds). Also what every tool here shares without torch: the time format (parse_time,
format_time), the rule for a name used as a path (path_name) and the one error type, ExportError.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_UNIX_SECONDS = 1e11  # year 5138: a larger number is a time in milliseconds
# a data column named like this is a time, never a feature (utils' loader takes it as the timestamp;
# export refuses it as a metric's column; case and spaces ignored): timestamp*, time, ts, date,
# datetime, epoch, unix_time, time_stamp, ..., with a unit like _s, _ms, _utc
TIME_NAME = re.compile(r"timestamp.*|(time|ts|date|datetime|date_time|epoch|unix|unixtime|unix_time|time_stamp)"
                       r"([ _-]?(s|ms|us|ns|sec|secs|seconds|utc|\(s\)|\(ms\)))?")
FAULT_LOG_COLUMNS = ["start", "end", "kind", "target", "name"]
FAULT_KINDS = ("cpu-stress", "memory-stress", "pod-failure", "network-delay")


class ExportError(Exception):
    """A problem the user has to fix; the CLI prints it as one line and exits non-zero."""


# ---------------------------------------------------------------- names used as paths

MAX_NAME_BYTES = 200  # a file name is at most 255 bytes; room for prefixes like "contributions_"


def path_name(name: str, what: str = "name") -> str:
    """The one rule for a name (a service, an entity) that becomes a file or folder name: one
    path component that stays inside its folder -> the name, else ExportError naming it. Refused:
    empty, '.', '..', a '/' or '\\', a control character, a leading '.' (hidden: the temporary
    and lock files beside outputs start with one), more than MAX_NAME_BYTES bytes."""
    text = str(name)
    problem = ("is empty" if not text.strip() else
               "has a '/' or '\\' (a name is one folder, not a path)" if "/" in text or "\\" in text else
               "starts with '.'" if text.startswith(".") else
               "has a control character" if any(ord(c) < 32 or ord(c) == 127 for c in text) else
               f"is longer than {MAX_NAME_BYTES} bytes" if len(text.encode("utf-8", "replace")) > MAX_NAME_BYTES
               else None)
    if problem:
        raise ExportError(f"{what} {text!r} {problem}: it would be used as a file name")
    return text


# ---------------------------------------------------------------- times

def parse_time(value: Any) -> float:
    """ISO 8601 with 'Z' or an offset, unix seconds (number or text), an aware datetime,
    or 'now' -> unix seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ExportError(f"time {value!r} has no timezone")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _seconds(float(value))
    text = str(value).strip()
    if text == "now":
        return time.time()
    try:
        return _seconds(float(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(f"cannot read time {text!r}: use ISO 8601 like 2026-11-24T03:20:00Z, "
                          "or unix seconds") from None
    if parsed.tzinfo is None:
        raise ExportError(f"time {text!r} has no timezone: add 'Z' for UTC or an offset "
                          "like +08:00")
    return parsed.timestamp()


def _seconds(value: float) -> float:
    """Unix seconds, refusing NaN/inf and milliseconds (a number > 1e11 would be year 5138 or later)."""
    if not math.isfinite(value):
        raise ExportError(f"time {value} is not a finite number")
    if abs(value) > MAX_UNIX_SECONDS:
        raise ExportError(f"time {value:.0f} looks like milliseconds (as seconds it is after the year "
                          f"5000); give unix seconds, e.g. {value / 1000:.0f}")
    return value


def format_time(value: Any) -> str:
    """-> '2026-11-24T03:20:00Z' (UTC, whole seconds, rounded down)."""
    seconds = math.floor(parse_time(value))
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- fault log

def append_fault(path: str | os.PathLike, start: Any, end: Any, kind: str, target: str,
                 name: str) -> None:
    """Append one fault to the fault log CSV (header `start,end,kind,target,name`), creating
    it with its header if needed. The row is written in one write and fsynced, so the file
    is a valid log at every moment. A log that cannot be written is an ExportError naming it."""
    if kind not in FAULT_KINDS:
        raise ExportError(f"unknown fault kind {kind!r} (expected one of {', '.join(FAULT_KINDS)})")
    start_text, end_text = format_time(start), format_time(end)
    if parse_time(end_text) < parse_time(start_text):
        raise ExportError(f"fault {name!r} ends ({end_text}) before it starts ({start_text})")
    _append_rows(Path(path), [[start_text, end_text, kind, target, name]])


def prepare_fault_log(path: str | os.PathLike) -> None:
    """Make sure faults can be logged to `path` before any is run: an existing file must be a
    fault log; a missing or empty one is created with the header. ExportError naming the path
    otherwise (a folder, a missing folder, no permission, a read-only file system)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        read_fault_log(path)
        if not os.access(path, os.W_OK):
            raise ExportError(f"cannot write fault log {path}: permission denied")
    else:
        _append_rows(path, [])


def _append_rows(path: Path, rows: list[list[str]]) -> None:
    """rows appended to the log in one fsynced write, the header first when the file is new."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
        new_file = not path.exists() or path.stat().st_size == 0
        prefix = ""
        if not new_file:
            with open(path, "rb") as f:
                header = f.readline().decode("utf-8-sig", errors="replace").strip()  # -sig: a BOM (Excel)
                f.seek(-1, os.SEEK_END)
                prefix = "" if f.read(1) == b"\n" else "\n"  # a hand-edited file without final newline
            if header != ",".join(FAULT_LOG_COLUMNS):
                raise ExportError(f"{path} is not a fault log (header {header!r}, expected "
                                  f"{','.join(FAULT_LOG_COLUMNS)!r})")
        lines = ([FAULT_LOG_COLUMNS] if new_file else []) + rows
        with open(path, "a", newline="") as f:
            f.write(prefix + "".join(_csv_line(line) for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ExportError(f"cannot write fault log {path}: {e.strerror or e}") from None


def _csv_line(fields: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


def read_fault_log(path: str | os.PathLike) -> list[dict]:
    """Read a fault log -> list of {'start', 'end' (int unix seconds), 'kind', 'target',
    'name'} in file order. Raises ExportError naming the line of a bad row."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"fault log {path} does not exist")
    if path.is_dir():
        raise ExportError(f"fault log {path} is a folder, not a file")
    try:
        return _read_fault_rows(path)
    except (UnicodeDecodeError, csv.Error) as e:  # a binary file, NUL bytes
        raise ExportError(f"{path}: not a fault log (not CSV text: {str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise ExportError(f"cannot read fault log {path}: {e.strerror or e}") from None


def _read_fault_rows(path: Path) -> list[dict]:
    faults = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != FAULT_LOG_COLUMNS:
            raise ExportError(f"{path}: header must be {','.join(FAULT_LOG_COLUMNS)!r}, "
                              f"got {','.join(header or [])!r}")
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(FAULT_LOG_COLUMNS):
                raise ExportError(f"{path}:{line}: expected 5 fields, got {len(row)}")
            start, end, kind, target, name = (cell.strip() for cell in row)
            try:
                start_s, end_s = int(parse_time(start)), int(parse_time(end))
            except ExportError as e:
                raise ExportError(f"{path}:{line}: {e}") from None
            if end_s < start_s:
                raise ExportError(f"{path}:{line}: end {end} is before start {start}")
            if kind not in FAULT_KINDS:
                raise ExportError(f"{path}:{line}: unknown kind {kind!r} (expected one of "
                                  f"{', '.join(FAULT_KINDS)})")
            faults.append({"start": start_s, "end": end_s, "kind": kind, "target": target,
                           "name": name})
    return faults
