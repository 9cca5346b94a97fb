"""The project's one data loader, scaler, windowing and small I/O helpers.

Dataset layout (see README): a split folder holding train.csv, test.csv and test_label.csv
(`.csv.gz` too), or a folder of such entity folders. Repairs the loader makes, each logged:
  - rows whose timestamps are not increasing are sorted (the seed's test split is shuffled);
    duplicate timestamps keep their first row;
  - NaN/inf values are filled from the previous row (the next one at the start of a file);
    a column with no finite value at all is an error;
  - columns in test.csv that train.csv lacks are dropped; a train column missing from
    test.csv is an error;
  - a column constant over train is kept (it scales to 0 there; any change in test shows).
The timestamp column is the one named like a time (TIME_NAME: timestamp, time, ts, date,
datetime, epoch, ...; logged when not `timestamp`), or a first column of date strings; its
values are read as numbers or as datetimes (parse_timestamps), never sorted as text. A file
with fewer rows than one window, a non-numeric column, a missing or unreadable timestamp, two
columns named like times, a header naming a column twice or not at all, or a last row with
fewer fields than the header (a file cut off while written) is an error.

Optional interpretation labels (which metrics are anomalous): interpretation.csv beside
test.csv, columns start,end,features = first and last test row (0-based, inclusive, rows in
the loader's order, i.e. sorted by timestamp) and the ';'-joined names of the anomalous
feature columns. Kept as names on Entity.interpretation; interpretation_segments() maps them
to the indices of a given column order.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import gzip
import json
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from faultlog import TIME_NAME

log = logging.getLogger("puad")
if not log.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.INFO)


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


class LockError(RuntimeError):
    """Another run holds an output lock; the message names the lock file."""


@dataclass
class Entity:
    name: str
    features: list[str]
    train: np.ndarray                    # (n_train, V) float64, raw (unscaled)
    train_ts: np.ndarray                 # (n_train,)
    test: np.ndarray | None = None       # (n_test, V)
    test_ts: np.ndarray | None = None
    labels: np.ndarray | None = None     # (n_test,) int, 1 = anomalous
    faults: np.ndarray | None = None     # (n_test,) fault kind per point, '' outside faults
    # (start, end inclusive, feature names) per interpretation segment, from interpretation.csv
    interpretation: list[tuple[int, int, list[str]]] | None = None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, zlib.error)


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pd.read_csv of a data file, any failure (0 bytes, a cut-off .gz, binary, unreadable) a
    DataError naming it; a header naming a column twice, or a column without a name, refused
    (pandas would rename the copy `name.1` and use whichever it reads first)."""
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
        df = pd.read_csv(path, **kwargs)
    except _READ_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot parse CSV ({reason})") from None
    if len(header) == 1 and (sep := next((c for c in ";\t|" if c in header[0]), None)):
        raise DataError(f"{path}: one column {header[0]!r}: separated by {sep!r}? the loader reads comma-separated CSV")
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if not name.strip():
            raise DataError(f"{path}: column {i} of the header has no name (an index written with the data?)")
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header (columns {seen[name]} and {i}); "
                            "keep one")
        seen[name] = i
    return df


def _ts_column(df: pd.DataFrame, path: Path | None = None) -> str | None:
    """The timestamp column: the one named like a time (TIME_NAME); else a first column of date
    strings. Two columns named like times are refused (the other would be trained as a feature)."""
    named = [c for c in df.columns if TIME_NAME.fullmatch(str(c).strip().lower())]
    if len(named) > 1:
        raise DataError(f"{path}: columns {named} all name a time; keep one (the others would be features)")
    if named:
        return named[0]
    first = df.columns[0] if len(df.columns) else None
    if first is not None and len(df) and not pd.api.types.is_numeric_dtype(df[first]) and _looks_like_times(df[first]):
        return first
    return None


def _looks_like_times(values: pd.Series) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(pd.to_datetime(values.head(20), utc=True, errors="coerce").notna().all())


def parse_timestamps(values: pd.Series, path: Path) -> np.ndarray:
    """A timestamp column -> numbers (unix or any epoch, as written) or datetime64 (UTC; ISO 8601
    or another date format pandas infers from the first value, one format for the file), never
    text: a missing, non-finite or unreadable stamp is a DataError naming its line."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        ts = values.to_numpy()
        bad = ~np.isfinite(ts.astype(np.float64))
    else:
        numbers = pd.to_numeric(values, errors="coerce")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = pd.to_datetime(values.astype(str), utc=True, errors="coerce")
        if numbers.notna().sum() > times.notna().sum():
            ts, bad = numbers.to_numpy(), numbers.isna().to_numpy() | ~np.isfinite(numbers.to_numpy(np.float64))
        else:
            ts, bad = times.dt.tz_localize(None).to_numpy(), times.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {i + 2}: timestamp {values.iloc[i]!r} is missing or not a time "
                        f"({bad.sum()} such row(s); one format for the file: unix seconds, ISO 8601, ...)")
    return ts


def _read_table(path: Path, min_rows: int) -> tuple[pd.DataFrame, np.ndarray, str | None]:
    """Read one CSV, sort by timestamp if present -> (values frame, timestamps, timestamp column)."""
    df = read_csv(path)
    n_fields = _last_row_fields(path)
    if len(df) and n_fields is not None and n_fields < df.shape[1]:
        raise DataError(f"{path}: line {len(df) + 1}: {n_fields} fields, the header has {df.shape[1]} "
                        f"(file cut off while written?)")
    ts_col = _ts_column(df, path)
    if ts_col is None:
        ts = np.arange(len(df))
    else:
        if str(ts_col) != "timestamp":
            log.info("%s: column %r taken as the timestamp", path, ts_col)
        ts = parse_timestamps(df.pop(ts_col), path)
        if len(ts) > 1 and not np.all(ts[1:] > ts[:-1]):
            log.warning("%s: timestamps are not increasing; sorting %d rows by timestamp", path, len(ts))
            order = np.argsort(ts, kind="stable")
            df, ts = df.iloc[order].reset_index(drop=True), ts[order]
            dup = np.concatenate([[False], ts[1:] == ts[:-1]])
            if dup.any():
                log.warning("%s: %d duplicate timestamps; keeping the first row of each", path, dup.sum())
                df, ts = df[~dup].reset_index(drop=True), ts[~dup]
    if len(df) < min_rows:
        raise DataError(f"{path}: {len(df)} rows, fewer than one window of {min_rows}")
    return df, ts, ts_col


def _last_row_fields(path: Path) -> int | None:
    """Number of comma-separated fields on the last non-empty line (None if unreadable)."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
            if not path.name.endswith(".gz"):
                fh.seek(max(0, path.stat().st_size - 65536))
            lines = collections.deque((ln for ln in fh if ln.strip()), maxlen=1)
    except (OSError, EOFError, zlib.error):
        return None
    return lines[0].count(b",") + 1 if lines else None


def _numeric(df: pd.DataFrame, path: Path) -> np.ndarray:
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise DataError(f"{path}: non-numeric column(s) {bad}")
    x = df.to_numpy(dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        empty = [c for c, ok in zip(df.columns, finite.any(axis=0)) if not ok]
        if empty:
            raise DataError(f"{path}: column(s) {empty} have no finite value")
        log.warning("%s: %d NaN/inf values filled from neighbouring rows", path, (~finite).sum())
        x = pd.DataFrame(np.where(finite, x, np.nan)).ffill().bfill().to_numpy()
    return x


def load_entity(folder: str | Path, min_rows: int = 1, name: str | None = None) -> Entity:
    """Load one split folder (train, optional test and test_label)."""
    folder = Path(folder)
    train_path = _find(folder, "train")
    if train_path is None:
        raise DataError(f"{folder}: no train.csv or train.csv.gz")
    train_df, train_ts, _ = _read_table(train_path, min_rows)
    features = [str(c) for c in train_df.columns]
    if not features:
        raise DataError(f"{train_path}: no feature columns")
    ent = Entity(name or folder.name, features, _numeric(train_df, train_path), train_ts)
    if min(ent.train.shape[0], 2) > 1:
        const = [f for f, s in zip(features, ent.train.std(axis=0)) if s == 0]
        if const:
            log.info("%s: %d column(s) constant over train, kept: %s", train_path, len(const),
                     ", ".join(const[:8]) + (" ..." if len(const) > 8 else ""))
    test_path = _find(folder, "test")
    if test_path is None:
        return ent
    test_df, test_ts, ts_col = _read_table(test_path, min_rows)
    test_df.columns = [str(c) for c in test_df.columns]
    missing = [f for f in features if f not in test_df.columns]
    if missing:
        raise DataError(f"{test_path}: missing column(s) {missing} that train has")
    extra = [c for c in test_df.columns if c not in features]
    if extra:
        log.warning("%s: dropping column(s) %s that train lacks", test_path, extra)
    ent.test, ent.test_ts = _numeric(test_df[features], test_path), test_ts
    label_path = _find(folder, "test_label")
    if label_path is not None:
        ent.labels, ent.faults = _read_labels(label_path, test_ts, ts_col is not None)
    interp_path = _find(folder, "interpretation")
    if interp_path is not None:
        ent.interpretation = _read_interpretation(interp_path, len(test_ts), features)
        if ent.labels is not None and any(not ent.labels[a:b + 1].all() for a, b, _ in ent.interpretation):
            log.warning("%s: some interpretation segments cover rows labelled 0", interp_path)
    return ent


def _read_interpretation(path: Path, n_test: int, features: list[str]) -> list[tuple[int, int, list[str]]]:
    df = read_csv(path, dtype={"features": str}, keep_default_na=False)
    missing = [c for c in ("start", "end", "features") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; need start,end,features")
    bounds = df[["start", "end"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(bounds).all() or (bounds != np.round(bounds)).any():
        raise DataError(f"{path}: start and end must be whole row numbers")
    known = set(features)
    segments = []
    for row, ((start, end), text) in enumerate(zip(bounds.astype(np.int64), df["features"]), start=2):
        if start > end:
            raise DataError(f"{path}:{row}: start {start} > end {end}")
        if start < 0 or end >= n_test:
            raise DataError(f"{path}:{row}: rows {start}..{end} outside the {n_test} test rows")
        names = [f.strip() for f in str(text).split(";") if f.strip()]
        if not names:
            raise DataError(f"{path}:{row}: no features")
        unknown = [f for f in names if f not in known]
        if unknown:
            raise DataError(f"{path}:{row}: unknown feature(s) {unknown}")
        segments.append((int(start), int(end), names))
    return segments


def interpretation_segments(ent: Entity, features: list[str] | None = None) -> list[tuple[int, int, list[int]]]:
    """ent.interpretation with names mapped to indices into ``features`` (default: ent.features),
    as metrics.hitrate takes them; [] when the entity has no interpretation labels."""
    index = {f: i for i, f in enumerate(ent.features if features is None else features)}
    out = []
    for start, end, names in ent.interpretation or []:
        unknown = [f for f in names if f not in index]
        if unknown:
            raise DataError(f"{ent.name}: interpretation feature(s) {unknown} not among the given features")
        out.append((start, end, [index[f] for f in names]))
    return out


def _read_labels(path: Path, test_ts: np.ndarray, test_has_ts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    lab = read_csv(path, dtype={"fault": str})  # an all-empty fault column must not turn float
    ts_col = _ts_column(lab, path) if len(lab.columns) > 1 else None
    if "label" not in lab.columns:
        if lab.shape[1] == 1 or (lab.shape[1] == 2 and ts_col is not None):
            lab = lab.rename(columns={[c for c in lab.columns if c != ts_col][0]: "label"})
        else:
            raise DataError(f"{path}: no 'label' column")
    if ts_col is not None and test_has_ts:
        lab[ts_col] = parse_timestamps(lab[ts_col], path)  # as test.csv's are parsed
        lab = lab.drop_duplicates(ts_col).set_index(ts_col)
        missing = ~pd.Index(test_ts).isin(lab.index)
        if missing.any():
            raise DataError(f"{path}: no label for {missing.sum()} test timestamp(s), e.g. {test_ts[missing][0]}")
        lab = lab.loc[test_ts]
    elif len(lab) != len(test_ts):
        raise DataError(f"{path}: {len(lab)} labels for {len(test_ts)} test rows")
    labels = pd.to_numeric(lab["label"], errors="coerce").to_numpy()
    if not np.isfinite(labels).all() or not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: labels must be 0 or 1")
    faults = lab["fault"].fillna("").astype(str).to_numpy() if "fault" in lab.columns else None
    return labels.astype(np.int64), faults


def entity_folders(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset folder")
    if _find(path, "train") is not None:
        return [path]
    subs = sorted((p for p in path.iterdir() if p.is_dir() and _find(p, "train") is not None),
                  key=lambda p: _natural_key(p.name))
    if not subs:
        raise DataError(f"{path}: neither a split folder (train.csv) nor a folder of entity folders")
    return subs


def load_dataset(path: str | Path, entities: str | list[str] = "all", min_rows: int = 1) -> list[Entity]:
    """Load every entity (or the named ones) of a dataset; all must share one feature list."""
    folders = entity_folders(path)
    if entities not in ("all", "", None):
        wanted = list(dict.fromkeys(entities.split(",") if isinstance(entities, str) else entities))  # each once
        by_name = {p.name: p for p in folders}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise DataError(f"{path}: no entity {unknown}; have {', '.join(by_name)}")
        folders = [by_name[w] for w in wanted]
    ents = [load_entity(p, min_rows) for p in folders]
    for e in ents[1:]:  # one column order, the first entity's
        align_features(e, ents[0].features, f"{path}/{e.name}", against=ents[0].name, extra="refuse")
    return ents


def align_features(ent: Entity, features: list[str], where: str, against: str = "the checkpoint",
                   extra: str = "drop") -> Entity:
    """Order an entity's columns (train and test) like `features`, by name: the one rule of every
    script (load_dataset across entities, training, test.py, ablation.py, detect_live.py). A
    feature of `features` the entity lacks is a DataError naming it; columns not in `features`
    are dropped with a log line (extra="drop") or refused (extra="refuse")."""
    if ent.features == list(features):
        return ent
    missing = [f for f in features if f not in ent.features]
    unused = [f for f in ent.features if f not in features]
    if missing or (unused and extra == "refuse"):
        raise DataError(f"{where}: features differ from {against}: "
                        + "; ".join(([f"missing {missing}"] if missing else [])
                                    + ([f"not in {against}: {unused}"] if unused and extra == "refuse" else [])))
    if unused:
        log.info("%s: column(s) %s not in %s; dropped", where, unused, against)
    idx = [ent.features.index(f) for f in features]
    ent.train = ent.train[:, idx]
    ent.test = None if ent.test is None else ent.test[:, idx]
    ent.features = list(features)
    return ent


EPOCH_S = (1e9, 1e11)  # numeric timestamps in this range are Unix seconds (2001-09 on); 1,000 x it, milliseconds


def time_step(entities: list[Entity]) -> float | None:
    """The series' step in seconds: the median difference of consecutive train timestamps over
    the entities whose timestamps are Unix seconds (or milliseconds) or dates (parse_timestamps'
    datetime64); None when none has such timestamps (row numbers, as in ASD and SMD, or no
    timestamp column)."""
    diffs = []
    for e in entities:
        if len(e.train_ts) > 1 and np.asarray(e.train_ts).dtype.kind == "M":
            diffs.append(np.diff(e.train_ts) / np.timedelta64(1, "s"))
            continue
        if len(e.train_ts) < 2 or not pd.api.types.is_numeric_dtype(e.train_ts):
            continue
        ts = np.asarray(e.train_ts, dtype=np.float64)
        for scale in (1.0, 1e-3):
            if EPOCH_S[0] <= ts.min() * scale < EPOCH_S[1]:
                diffs.append(np.diff(ts) * scale)
                break
    return float(np.median(np.concatenate(diffs))) if diffs else None


class Windows:
    """Windows of several series, gathered per batch from one flat tensor (no window copies)."""

    def __init__(self, series: list[np.ndarray], seq_len: int, stride: int, device):
        self.data = torch.as_tensor(np.concatenate(series).astype(np.float32), device=device)
        starts, offset = [], 0
        for s in series:
            starts.append(offset + np.arange(0, len(s) - seq_len + 1, stride))
            offset += len(s)
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)
        self.steps = torch.arange(seq_len, device=device)

    def __len__(self) -> int:
        return len(self.starts)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, limit: int = 0,
                split: tuple[int, int] = (0, 1), shard: tuple[int, int] = (0, 1)):
        """Batches of windows, shuffled by generator (the same seed on every rank: one order).

        split=(rank, world): every batch of batch_size is split across the ranks (rank::world),
        so together they take the batches one process would (training under DDP); a last batch
        with fewer windows than ranks is dropped, since every rank must take every step.
        shard=(rank, world): this rank's windows (rank::world) in batches of batch_size (validation).
        """
        order = torch.randperm(len(self), generator=generator).to(self.starts.device) if generator else \
            torch.arange(len(self), device=self.starts.device)
        if limit:
            order = order[:limit]
        order = order[shard[0]::shard[1]]
        rank, world = split
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if world > 1:
                if len(idx) < world:
                    break
                idx = idx[rank::world]
            yield self.data[self.starts[idx, None] + self.steps]


class Scaler:
    """Per-feature affine scaling x -> (x - shift) / scale, fitted on train data only.

    minmax: shift=min, scale=max-min; zscore: mean, std; robust: median, IQR (suits a few
    windows). A zero scale (constant column) is replaced by 1.
    """

    def __init__(self, kind: str = "minmax", shift=None, scale=None):
        if kind not in ("minmax", "zscore", "robust"):
            raise ValueError(f"unknown scaler {kind!r}; choose minmax, zscore or robust")
        self.kind = kind
        self.shift = None if shift is None else np.asarray(shift, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)

    def fit(self, x: np.ndarray) -> "Scaler":
        if self.kind == "minmax":
            self.shift, scale = x.min(axis=0), x.max(axis=0) - x.min(axis=0)
        elif self.kind == "zscore":
            self.shift, scale = x.mean(axis=0), x.std(axis=0)
        else:
            q1, med, q3 = np.percentile(x, [25, 50, 75], axis=0)
            self.shift, scale = med, q3 - q1
        self.scale = np.where(scale > 1e-12, scale, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    @staticmethod
    def transform_many(scalers: list["Scaler"], x: np.ndarray) -> np.ndarray:
        """Series x (E, n, V), each scaled with its own scaler: transform of each, at once."""
        shift = np.stack([s.shift for s in scalers])[:, None]
        scale = np.stack([s.scale for s in scalers])[:, None]
        return ((x - shift) / scale).astype(np.float32)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "shift": torch.tensor(self.shift), "scale": torch.tensor(self.scale)}

    @classmethod
    def from_state(cls, d: dict) -> "Scaler":
        return cls(d["kind"], d["shift"].numpy(), d["scale"].numpy())


def split_train_val(x: np.ndarray, val_frac: float, seq_len: int, blocks: int = 1
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out val_frac of a series for validation and calibration -> (train parts, held-out
    parts), each in time order; no window crosses a cut. blocks=1: the last val_frac (the tail);
    blocks=B: the series cut into B equal chunks, the last val_frac of each held out, so the
    held-out rows sample the whole series (every time of day of a one-day history) instead of
    its last stretch. B is lowered until every part holds at least one window; a series too short
    for any split validates on itself ([x], [x])."""
    bounds = split_bounds(len(x), val_frac, seq_len, blocks)
    if bounds is None:
        log.warning("series of %d rows too short for a validation split; validating on train", len(x))
        return [x], [x]
    return [x[lo:cut] for lo, cut, _ in bounds], [x[cut:hi] for _, cut, hi in bounds]


def split_bounds(n: int, val_frac: float, seq_len: int, blocks: int = 1) -> list[tuple[int, int, int]] | None:
    """split_train_val's cuts of a series of n rows: (lo, cut, hi) per block, rows lo..cut trained
    on and cut..hi held out; None where the series is too short to split."""
    n_val = max(int(round(n * val_frac)), seq_len) if val_frac > 0 else 0
    if n_val == 0 or n - n_val < seq_len:
        return None
    b = max(1, min(int(blocks), n_val // seq_len, (n - n_val) // seq_len))
    edges = np.linspace(0, n, b + 1).round().astype(int)
    return [(lo, hi - int(round(n_val * (hi - lo) / n)), hi) for lo, hi in zip(edges[:-1], edges[1:])]


LEVEL_RANGE = 0.1  # a level gauge moved less than this share of its largest |value| over train


def level_gauges(train: np.ndarray) -> np.ndarray:
    """(V,) bool: the features that moved, but less than LEVEL_RANGE of their largest |value|, over
    a train series (n, V): gauges such as a pod's memory, whose level sits where the pod, its node
    or its last restart put it, so min-max scaling over one day makes the next level many train
    ranges away (docs/decisions.md, "Level gauges"). Constant features are not level gauges."""
    x = np.asarray(train, np.float64)
    span = np.nanmax(x, 0) - np.nanmin(x, 0)
    return (span > 0) & (span < LEVEL_RANGE * np.nanmax(np.abs(x), 0))


def shared_features(entities: list["Entity"], min_rows: int = 60) -> np.ndarray:
    """(V,) bool: the host-level features, those that hold the same moving values in two entities'
    train series over the timestamps every entity has (at least min_rows of them): a node's CPU,
    read by every pod on that node. Entities whose timestamps are row numbers share no clock and
    never match (time_step is None). One pass per entity and feature (a hash of its column), so
    a fleet of thousands costs what reading it does."""
    feats = entities[0].features if entities else []
    shared = np.zeros(len(feats), bool)
    if len(entities) < 2 or time_step(entities) is None:
        return shared
    core = functools.reduce(np.intersect1d, [np.asarray(e.train_ts) for e in entities])
    if len(core) < min_rows:
        return shared
    rows = [np.intersect1d(core, e.train_ts, return_indices=True)[2] for e in entities]
    for v in range(len(feats)):
        seen: set[bytes] = set()
        for e, r in zip(entities, rows):
            col = np.asarray(e.train[r, v], np.float64) + 0.0  # -0.0 -> 0.0
            if col.max() == col.min():  # constant: nothing to tell a node by
                continue
            key = col.tobytes()
            if key in seen:
                shared[v] = True
                break
            seen.add(key)
    return shared


def trailing_mean(x: np.ndarray, rows: int, history: np.ndarray | None = None) -> np.ndarray:
    """(n, V): each row's mean over the `rows` rows before it, `history` (rows before x, oldest
    first) counted as before x; fewer where fewer precede, the row itself where none does."""
    x = np.asarray(x, np.float64)
    h = np.zeros((0, x.shape[1])) if history is None or rows < 1 else np.asarray(history, np.float64)[-rows:]
    full = np.concatenate([h, x])
    csum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(full, 0)])
    end = np.arange(len(x)) + len(h)  # row t of x is row end[t] of full; the mean is over [lo, end)
    lo = np.maximum(end - max(rows, 1), 0)
    count = (end - lo)[:, None]
    return np.where(count > 0, (csum[end] - csum[lo]) / np.maximum(count, 1), x)


def create_sequences(data: np.ndarray, seq_len: int, stride: int = 1) -> np.ndarray:
    """Sliding windows (n_windows, seq_len, V) as a strided view: no data is copied."""
    if len(data) < seq_len:
        raise DataError(f"{len(data)} rows, fewer than one window of {seq_len}")
    view = np.lib.stride_tricks.sliding_window_view(data, seq_len, axis=0)  # (n, V, T)
    return view[::stride].transpose(0, 2, 1)


def window_to_point_scores(window_scores: np.ndarray, seq_len: int) -> np.ndarray:
    """Stride-1 window scores (n_windows, seq_len) -> one score per point.

    Point t is scored by the window that ends at it; the first seq_len-1 points, which no
    window ends at, by their position in the first window.
    """
    return np.concatenate([window_scores[0, :-1], window_scores[:, -1]])


def window_values_to_points(per_window: np.ndarray, seq_len: int) -> np.ndarray:
    """One value per stride-1 window (n_windows, ...) -> one per point, as window_to_point_scores
    assigns them: point t takes the window ending at it, the first seq_len-1 points the first
    window's."""
    return np.concatenate([np.repeat(per_window[:1], seq_len - 1, axis=0), per_window])


def release_freed_memory() -> None:
    """Give the memory this process has freed back to the system (glibc's malloc_trim; nothing
    elsewhere). Freed blocks between live ones stay resident otherwise: after many small
    long-lived arrays were built among temporaries (a fleet's latent memories), twice their size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int) -> int:
    """--num_threads: torch's CPU threads, intra-op and, where torch still allows it (once per
    process, before any inter-op work), inter-op; 0 keeps torch's default. Every script that runs
    the model calls it once its Config is known. Returns the intra-op threads in force."""
    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already set, or inter-op work already started in this process
            pass
    return torch.get_num_threads()


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={name}: CUDA is not available on this machine")
    return dev


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), then rename onto path, so a reader never sees half a file. A symlink
    at path is written through (its target is replaced, the link stays). The temporary name
    carries the writer's pid; those of dead writers (a killed save) are removed (sweep_temp)."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    sweep_temp(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{os.getpid()}-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sweep_temp(folder: Path, prefix: str) -> None:
    """Remove the files and folders `<prefix><pid>-...` in folder whose writing process is gone
    (killed mid-write): temporary names here carry their writer's pid (atomic_write, run_outputs)."""
    for p in folder.glob(f"{glob.escape(prefix)}*"):
        pid = re.match(r"(\d+)-", p.name[len(prefix):])
        if pid is None or _alive(int(pid.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def run_outputs(folder: str | Path, name: str = ".test", last: str = "metrics.json"):
    """The output-folder rule: one run's files in a folder that other tools share (test.py's
    --out_dir also holds loss_curve.png), replaced together. Yields a staging folder inside
    `folder` to write every file into; when the block succeeds they are moved in with the files
    of the previous run that this one did not write removed, and `last` (the file that says a run
    is complete) moved in last, after being removed first. `<name>.manifest` lists the run's
    files, so after a crash at any point (kill -9) the folder never holds `last` beside files of
    another run, and the next run removes whatever the crashed one left. A failed block changes
    nothing. One writer at a time: hold output_lock around it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp(folder, f"{name}.run-")
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=f"{name}.run-{os.getpid()}-"))
    try:
        yield stage
        new = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        manifest = folder / f"{name}.manifest"
        old = [rel for rel in _read_manifest(manifest) if not rel.startswith("/") and ".." not in Path(rel).parts]
        (folder / last).unlink(missing_ok=True)
        write_json_atomic(manifest, sorted(set(old) | set(new)))  # every file that may be in the folder now
        for rel in sorted(set(old) - set(new)):
            if (folder / rel).is_file() or (folder / rel).is_symlink():  # a folder it names is not ours
                (folder / rel).unlink()
        for rel in new:
            if rel != last:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / rel, folder / rel)
        write_json_atomic(manifest, new)
        if last in new:
            os.replace(stage / last, folder / last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _read_manifest(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        log.warning("%s: unreadable; files of earlier runs it named may stay", path)
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


@contextlib.contextmanager
def output_lock(path: str | Path):
    """Hold an exclusive lock on `path` (created if needed, pid written in it) for a with-block.

    Two runs writing the same outputs would mix their files; the second one gets LockError
    naming the lock. flock is released by the kernel when the process ends, even killed, so a
    lock file left behind never blocks a later run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockError(f"{path}: another run (pid {holder}) is writing these outputs; "
                            f"wait for it or choose another output path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def write_json_atomic(path: str | Path, obj) -> None:
    """Strict JSON (NaN/inf become null), written atomically."""
    text = json.dumps(json_safe(obj), indent=2) + "\n"

    def _write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, _write)


def json_safe(obj):
    """numpy scalars/arrays to Python, NaN/inf to None, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def scores_frame(ent: "Entity", scores: np.ndarray, threshold: float | np.ndarray) -> pd.DataFrame:
    """An entity's test scores as test.py and baselines.py write them (scores_<entity>.csv):
    timestamp, score, threshold, prediction (score > threshold), label (-1 without labels)."""
    pred = (np.asarray(scores) > threshold).astype(int)
    return pd.DataFrame({"timestamp": ent.test_ts, "score": scores, "threshold": threshold, "prediction": pred,
                         "label": ent.labels if ent.labels is not None else np.full(len(pred), -1)})


def write_csv_atomic(path: str | Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
