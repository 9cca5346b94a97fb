"""The Prometheus client of export_metrics.py and detect_live.py: sessions with auth, query_range
with retries, metric sets (the YAML of column -> PromQL) and steps like 15s.

Auth: bearer token from PROMETHEUS_TOKEN, or basic auth from PROMETHEUS_USER and
PROMETHEUS_PASSWORD. TLS certificates are verified (a CA bundle path, or verify=False).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import string
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml
from tqdm import tqdm

from faultlog import FAULT_KINDS, MAX_UNIX_SECONDS, TIME_NAME, ExportError, path_name

DEFAULT_PROMETHEUS = "http://localhost:9090"
AGGREGATIONS = ("sum", "mean", "max", "min")


def warn(message: str) -> None:
    tqdm.write(f"{Path(sys.argv[0]).name}: warning: {message}", file=sys.stderr)


def parse_step(value: Any) -> int:
    """'15s', '1m', '1h' or a number of seconds -> whole seconds (> 0)."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(s|m|h)?", text)
    if not match:
        raise ExportError(f"cannot read step {text!r}: use e.g. 15s, 1m or 30")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if seconds < 1 or seconds != int(seconds):
        raise ExportError(f"step {text!r} must be a whole number of seconds >= 1")
    return int(seconds)


# ---------------------------------------------------------------- metric set

def load_metric_set(metric_set: str | os.PathLike | dict, namespace: str | None = None,
                    services: list[str] | None = None) -> dict:
    """Read and check a metric set YAML (or an already loaded dict) -> {'namespace',
    'services', 'rate_window', 'metrics': [{'column', 'query', 'agg', 'fill'[, 'grouped',
    'group_label']}, ...],
    'interpretation': {fault kind: [columns]} ({} when the YAML has none)}."""
    if isinstance(metric_set, dict):
        raw, where = metric_set, "metric set"
    else:
        where = str(metric_set)
        try:
            with open(metric_set) as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ExportError(f"cannot read metric set {where}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ExportError(f"metric set {where} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics"), dict) or not raw["metrics"]:
        raise ExportError(f"{where}: needs a 'metrics' mapping of column name -> PromQL")
    result = {
        "namespace": namespace or raw.get("namespace") or "",
        "services": list(services or raw.get("services") or []),
        "rate_window": str(raw.get("rate_window", "1m")),
        "metrics": [],
    }
    if not result["services"]:
        raise ExportError(f"{where}: no services (give 'services:' or --services)")
    # a service names its folder of the dataset: one path component (faultlog.path_name)
    result["services"] = list(dict.fromkeys(path_name(s, "service") for s in result["services"]))
    for column, spec in raw["metrics"].items():
        column = str(column)
        if TIME_NAME.fullmatch(column.strip().lower()):
            raise ExportError(f"{where}: column '{column}' would be read as a time, not a feature "
                              "(timestamp, time, ts, date, ... are reserved); rename that metric")
        if isinstance(spec, str):
            spec = {"query": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("query"), str):
            raise ExportError(f"{where}: metric '{column}' needs a query string")
        unknown = set(spec) - {"query", "agg", "fill", "grouped", "group_label"}
        if unknown:
            raise ExportError(f"{where}: metric '{column}' has unknown keys {sorted(unknown)}")
        agg = spec.get("agg", "sum")
        if agg not in AGGREGATIONS:
            raise ExportError(f"{where}: metric '{column}': agg must be one of "
                              f"{', '.join(AGGREGATIONS)}, got {agg!r}")
        fill = spec.get("fill")
        if fill is not None and (isinstance(fill, bool) or not isinstance(fill, (int, float))):
            raise ExportError(f"{where}: metric '{column}': fill must be a number")
        metric = {"column": column, "query": spec["query"], "agg": agg, "fill": fill}
        for key in ("grouped", "group_label"):  # detect_live's one query for many services (grouped_query)
            if key in spec:
                if not isinstance(spec[key], str):
                    raise ExportError(f"{where}: metric '{column}': {key} must be a string")
                metric[key] = spec[key]
        render_query(metric, result, "service")  # fails early on a bad placeholder
        result["metrics"].append(metric)
    result["interpretation"] = _interpretation_map(raw.get("interpretation"), result, where)
    return result


def _interpretation_map(raw: Any, metric_set: dict, where: str) -> dict[str, list[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: 'interpretation' must map fault kind -> list of columns")
    columns = [m["column"] for m in metric_set["metrics"]]
    mapping = {}
    for kind, cols in raw.items():
        if kind not in FAULT_KINDS:
            raise ExportError(f"{where}: interpretation: unknown fault kind {kind!r} (expected "
                              f"one of {', '.join(FAULT_KINDS)})")
        if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
            raise ExportError(f"{where}: interpretation: {kind} needs a non-empty list of columns")
        unknown = [c for c in cols if c not in columns]
        if unknown:
            raise ExportError(f"{where}: interpretation: {kind}: unknown column(s) {unknown}")
        mapping[kind] = list(dict.fromkeys(cols))
    return mapping


def render_query(metric: dict, metric_set: dict, service: str) -> str:
    """Fill $namespace, $service and $rate_window into a metric's PromQL (fill_placeholders)."""
    return fill_placeholders(metric["query"], {"namespace": metric_set["namespace"], "service": service,
                                               "rate_window": metric_set["rate_window"]},
                             f"metric '{metric['column']}'")


_QUOTES = "\"'`"
_BARE = re.compile(r"[A-Za-z0-9_:]*")  # a value outside a string literal: a name part, no PromQL syntax
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def fill_placeholders(template: str, values: dict[str, str], where: str,
                      regexes: frozenset[str] = frozenset()) -> str:
    """The one rule for a value put into PromQL (export_metrics.py and detect_live.py): each
    $name / ${name} of `values` (string.Template syntax, $$ for $) is written as a literal for
    the place it stands in, so no value can change the query's structure. Inside a quoted string
    it is escaped for that string, and inside the regex of a =~ or !~ matcher it first matches
    itself only (regex_literal; a name in `regexes` is a regex already); outside a string only
    [A-Za-z0-9_:] is allowed ($rate_window: a duration like 1m). Raises ExportError naming
    `where` for an unknown placeholder or a value that cannot stand where it is."""
    quote_at = _quote_context(template)
    out, last = [], 0
    for m in string.Template.pattern.finditer(template):
        out.append(template[last:m.start()])
        last = m.end()
        if m.group("escaped") is not None:
            out.append("$")
            continue
        name = m.group("named") or m.group("braced")
        if name is None or name not in values:
            shown = m.group(0) if name is None else f"${name}"
            raise ExportError(f"{where}: bad placeholder {shown!r} in query (known: "
                              f"{', '.join('$' + k for k in values)}; write $$ for $)")
        out.append(_literal(str(values[name]), name, quote_at[m.start()], template, name in regexes, where))
    out.append(template[last:])
    return "".join(out)


def _quote_context(text: str) -> list[tuple[str, int] | None]:
    """For each position of a PromQL text: (quote character, position of the opening quote) when
    it lies inside a string literal, else None."""
    state, quote, opened, i = [None] * (len(text) + 1), None, -1, 0
    while i < len(text):
        c = text[i]
        state[i] = (quote, opened) if quote else None
        if quote:
            if c == "\\" and quote != "`":
                state[i + 1: i + 2] = [(quote, opened)]
                i += 1
            elif c == quote:
                quote = None
        elif c in _QUOTES:
            quote, opened = c, i
        i += 1
    return state


def _literal(value: str, name: str, context: tuple[str, int] | None, template: str, is_regex: bool,
             where: str) -> str:
    if context is None:
        pattern = _DURATION if name == "rate_window" else _BARE
        if not pattern.fullmatch(value):
            raise ExportError(f"{where}: ${name} = {value!r} stands outside a quoted string in the query, "
                              "where it may only hold " + ("a duration like 1m" if name == "rate_window"
                                                           else "letters, digits, '_' and ':'"))
        return value
    quote, opened = context
    if template[:opened].rstrip().endswith(("=~", "!~")) and not is_regex:
        value = regex_literal(value)
    if quote == "`":
        if "`" in value:
            raise ExportError(f"{where}: ${name} = {value!r} has a '`' and stands in a `...` string")
        return value
    return _string_literal(value, quote)


# ---------------------------------------------------------------- fleets: shards, grouped queries

def hashmod(value: str, modulus: int) -> int:
    """Prometheus' `hashmod` relabelling exactly: the md5 of the value, its last 8 bytes read as
    a big-endian uint64, modulo `modulus` (relabel.go). `--shard=I/N` keeps the services with
    hashmod(service, N) == I, so N detectors split a fleet with no coordination, and a
    Prometheus relabel rule {action: hashmod, modulus: N} puts the same services in shard I."""
    return int.from_bytes(hashlib.md5(value.encode()).digest()[8:], "big") % modulus


def parse_shard(text: str) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; '' -> None."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(2)) >= 1 or not int(match.group(1)) < int(match.group(2)):
        raise ExportError(f"--shard={text!r}: give I/N with 0 <= I < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def shard_services(services: list[str], shard: tuple[int, int] | None) -> list[str]:
    """The services of shard (I, N): those whose name hashes to I modulo N (hashmod)."""
    if shard is None:
        return list(services)
    index, count = shard
    return [s for s in services if hashmod(s, count) == index]


GROUP_LABEL = "puad_service"  # the label a grouped query adds when the service is part of a value
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|=)\s*"((?:[^"\\]|\\.)*?)"')
_AGG = re.compile(r'\b(sum|min|max|avg|count|group|stddev|stdvar)\s*(?:(by|without)\s*\(([^)]*)\)\s*)?\($')
_PLACEHOLDER = re.compile(r"\$(?:service\b|\{service\})")


def regex_literal(text: str) -> str:
    """text as an RE2 regex matching exactly it (Prometheus' matchers are RE2, anchored)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _string_literal(text: str, quote: str = '"') -> str:
    """text inside a PromQL string quoted with `quote` (" or ')."""
    text = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _parens(text: str) -> dict[int, int]:
    """Position of every '(' outside string literals -> position of its ')'."""
    pairs, stack, quote, i = {}, [], None, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote != "`":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c == "(":
            stack.append(i)
        elif c == ")" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def grouped_query(metric: dict, metric_set: dict, services: list[str]) -> tuple[str, str] | None:
    """One query for the column of every service in `services` -> (PromQL, label whose value is
    the service in its answer); None for a column without $service (a node-level column: the
    same for every service, query it once). Raises ExportError when the query cannot be grouped
    (the caller then queries that column per service).

    The $service matcher is turned into a regex over the services: `L="$service"` becomes
    `L=~"a|b|c"` and the answer is split by L; a matcher with more around the placeholder
    (`pod=~"$service-.*"`) becomes `pod=~"(?P<puad_service>a|b|c)-.*"` and a label_replace()
    copies the service's part of the value into puad_service. Every aggregation around the
    matcher gets that label in its `by` (sum(x) -> sum by (L) (x); sum by (le) (x) -> sum by
    (le, L) (x)), so the answer has one series per service, each the same as the service's
    own query (tested on every query of labshop/metrics-lab.yaml). A metric may give its
    grouped form explicitly with the key `grouped` (placeholders $services, the regex of the
    services, and $group_label); then `group_label` names the label to split by."""
    template = metric["query"]
    if "grouped" in metric:
        names = "|".join(regex_literal(s) for s in services)
        label = metric.get("group_label", "service")
        return fill_placeholders(metric["grouped"], {"namespace": metric_set["namespace"],
                                                     "rate_window": metric_set["rate_window"],
                                                     "services": names, "group_label": label},
                                 f"metric '{metric['column']}' (grouped)", regexes=frozenset({"services"})), label
    if not _PLACEHOLDER.search(template):
        return None
    matchers, label, copy = _service_matchers(metric, template, services)
    edits = [(a, b, text.replace("$", "$$")) for a, b, text, _ in matchers]  # (start, end, replacement)
    edits += _aggregation_edits(metric, template, [a for a, *_ in matchers], label, copy)
    query = template
    for start, end, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        query = query[:start] + text + query[end:]
    return fill_placeholders(query, {"namespace": metric_set["namespace"], "rate_window": metric_set["rate_window"]},
                             f"metric '{metric['column']}'"), label


def _service_matchers(metric: dict, template: str, services: list[str]) -> tuple[list, str, tuple | None]:
    """grouped_query's matchers: each `L op "...$service..."` as (start, end, its regex form,
    copy), the label the answer is split by, and the (source label, regex) a label_replace()
    copies the service from when the matcher holds more than the placeholder (else None)."""
    alternatives = "|".join(regex_literal(s) for s in sorted(services, key=lambda s: (-len(s), s)))
    matchers, label = [], None
    for m in _MATCHER.finditer(template):
        if not _PLACEHOLDER.search(m.group(3)):
            continue
        name, op, value = m.groups()
        before, after = _PLACEHOLDER.split(value, maxsplit=1) if len(_PLACEHOLDER.findall(value)) == 1 else (None, None)
        if before is None:
            raise ExportError(f"metric '{metric['column']}': $service twice in one matcher; give 'grouped'")
        if op == "=" and not before and not after:
            want, regex, copy = name, alternatives, None
        else:
            if op == "=":
                before, after = regex_literal(before), regex_literal(after)
            want = GROUP_LABEL
            regex = f"{before}(?P<{GROUP_LABEL}>{alternatives}){after}"
            copy = (name, regex)
        if label not in (None, want):
            raise ExportError(f"metric '{metric['column']}': $service in matchers of different labels; give 'grouped'")
        label = want
        matchers.append((m.start(), m.end(), f'{name}=~"{_string_literal(regex)}"', copy))
    if not matchers or _PLACEHOLDER.search(_MATCHER.sub("", template)):
        raise ExportError(f"metric '{metric['column']}': $service outside a label matcher; give 'grouped'")
    return matchers, label, next((c for *_, c in matchers if c is not None), None)


def _aggregation_edits(metric: dict, template: str, starts: list[int], label: str,
                       copy: tuple | None) -> list[tuple[int, int, str]]:
    """The edits (start, end, text) that give every aggregation around a matcher (its position
    in `starts`) the label in its `by`, and wrap the innermost one (or the whole query) in the
    label_replace() that copies the service out of a longer matcher."""
    edits = []
    aggs = []
    for open_, close in _parens(template).items():
        agg = _AGG.search(template[:open_ + 1])
        if agg and any(open_ < a < close for a in starts):
            aggs.append((agg, open_, close))
    innermost = min(aggs, key=lambda a: a[2] - a[1]) if aggs else None
    for agg, open_, close in aggs:
        if agg.group(2) == "by":
            labels = [x.strip() for x in agg.group(3).split(",") if x.strip()]
            if label not in labels:
                edits.append((agg.start(3), agg.end(3), ", ".join(labels + [label])))
        elif agg.group(2) == "without":
            if label in [x.strip() for x in agg.group(3).split(",")]:
                raise ExportError(f"metric '{metric['column']}': aggregates without {label}; give 'grouped'")
        else:
            trailing = re.match(r"\s*(by|without)\s*\(([^)]*)\)", template[close + 1:])
            if trailing:
                if trailing.group(1) == "by" and label not in trailing.group(2):
                    start = close + 1 + trailing.start(2)
                    edits.append((start, start, f"{label}, "))
            else:
                edits.append((open_, open_, f" by ({label}) "))
        if copy is not None and (agg, open_, close) == innermost:
            edits += [(open_ + 1, open_ + 1, "label_replace("), (close, close, _label_replace_args(label, *copy))]
    if copy is not None and innermost is None:
        edits += [(0, 0, "label_replace("), (len(template), len(template), _label_replace_args(label, *copy))]
    return edits


def _label_replace_args(label: str, source: str, regex: str) -> str:
    """The arguments after the vector of label_replace(v, label, "${label}", source, regex), with
    every $ doubled for string.Template."""
    return f', "{label}", "${{{label}}}", "{source}", "{_string_literal(regex)}")'.replace("$", "$$")


def split_by_label(series: list[dict], label: str, services: list[str], grid: "Any", agg: str) -> np.ndarray:
    """A grouped answer -> values (len(services), len(grid)) on `grid`, in the order of
    `services`, NaN where none: the finite values of a service's series combined with `agg` at
    each grid point (as one service's own query would be). Series without the label (e.g. `or
    vector(0)`) or of other services are ignored. Vectorised: one scatter for all services."""
    grid = np.asarray(grid, np.int64)
    first, step = int(grid[0]), int(grid[1] - grid[0]) if len(grid) > 1 else 1
    index = {s: i for i, s in enumerate(services)}
    out = np.full((len(services), len(grid)), np.nan)
    keep = [(index[name], s["values"]) for s in series
            if (name := s["metric"].get(label)) in index and len(s["values"])]
    if not keep:
        return out
    tv = np.concatenate([v for _, v in keep])  # (points, 2): time, value (parse_matrix's arrays)
    owner = np.repeat(np.array([i for i, _ in keep]), [len(v) for _, v in keep])
    idx = np.rint((tv[:, 0] - first) / step).astype(np.int64)
    ok = (idx >= 0) & (idx < len(grid)) & np.isfinite(tv[:, 1])
    at, value = (owner[ok], idx[ok]), tv[ok, 1]
    if len({i for i, _ in keep}) == len(keep):  # one series per service: the usual answer
        out[at] = value
        return out
    count = np.zeros(out.shape)
    np.add.at(count, at, 1.0)
    if agg in ("sum", "mean"):
        acc = np.zeros(out.shape)
        np.add.at(acc, at, value)
        acc = acc / np.maximum(count, 1.0) if agg == "mean" else acc
    else:
        acc = np.full(out.shape, -math.inf if agg == "max" else math.inf)
        (np.maximum if agg == "max" else np.minimum).at(acc, at, value)
    return np.where(count > 0, acc, np.nan)


# ---------------------------------------------------------------- HTTP

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")
_SECRET_PARAM = re.compile(r"([?&](?:[A-Za-z0-9_.-]*(?:token|key|secret|password|passwd|pwd|auth|signature|sig))=)[^&#\s]*",
                           re.IGNORECASE)


def redact_url(text: str) -> str:
    """The one rule for a URL in a log: the credentials of every URL in `text` (user:password@,
    and the values of query parameters like token=, api_key=, password=) become '***'."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))


def make_session(token: str | None = None, user: str | None = None,
                 password: str | None = None, verify: bool | str = True) -> requests.Session:
    """A requests session with auth from the arguments or, when they are None, from
    PROMETHEUS_TOKEN / PROMETHEUS_USER / PROMETHEUS_PASSWORD. verify: True, False or a CA
    bundle path."""
    token = token if token is not None else os.environ.get("PROMETHEUS_TOKEN")
    user = user if user is not None else os.environ.get("PROMETHEUS_USER")
    password = password if password is not None else os.environ.get("PROMETHEUS_PASSWORD")
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    session.verify = verify
    return session


def _short_reason(error: Exception) -> str:
    text = str(error)
    if isinstance(error, requests.Timeout):
        return "timed out"
    for needle in ("Connection refused", "Name or service not known", "No route to host",
                   "Connection reset", "Temporary failure in name resolution"):
        if needle in text:
            return needle.lower()
    return text[:200]


def query_range(session: requests.Session, prometheus: str, query: str, start: int, end: int,
                step: int, what: str = "query", timeout: float = 30.0, retries: int = 3,
                backoff: float = 0.5) -> list[dict]:
    """One /api/v1/query_range call -> Prometheus' list of series ({'metric', 'values'}).
    Timeouts, connection errors, 429 and 5xx are retried `retries` times, waiting
    backoff, 2*backoff, 4*backoff ... seconds. `what` names the query in errors."""
    url = prometheus.rstrip("/") + "/api/v1/query_range"
    shown, shown_url = redact_url(prometheus), redact_url(url)  # messages never carry credentials
    params = {"query": query, "start": start, "end": end, "step": step}
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            # POST keeps long queries out of the URL
            response = session.post(url, data=params, timeout=timeout)
        except requests.exceptions.SSLError as e:
            raise ExportError(f"TLS error talking to {shown}: {redact_url(_short_reason(e))} "
                              "(use --ca_cert FILE, or --insecure)") from None
        except (requests.Timeout, requests.ConnectionError) as e:
            problem = f"cannot reach Prometheus at {shown} ({redact_url(_short_reason(e))})"
            continue
        except requests.RequestException as e:  # no scheme, a malformed URL: retrying cannot help
            raise ExportError(f"cannot query {shown}: {redact_url(_short_reason(e))} (give an http:// or "
                              "https:// base URL)") from None
        except OSError as e:  # a --ca_cert that cannot be read
            raise ExportError(f"cannot query {shown}: {e.strerror or e}") from None
        if response.status_code >= 500 or response.status_code == 429:
            problem = (f"Prometheus at {shown} answered HTTP {response.status_code} for "
                       f"{what}: {_error_text(response)}")
            continue
        break
    else:
        raise ExportError(f"{problem} after {retries + 1} tries")

    if response.status_code in (401, 403):
        raise ExportError(f"Prometheus at {shown} refused access (HTTP "
                          f"{response.status_code}): set PROMETHEUS_TOKEN or "
                          "PROMETHEUS_USER/PROMETHEUS_PASSWORD")
    if response.status_code in (400, 422):
        raise ExportError(f"Prometheus rejected {what}: {_error_text(response)}; query: {query}")
    if response.status_code != 200:
        raise ExportError(f"HTTP {response.status_code} from {shown_url} for {what}: is --prometheus "
                          "the base URL of Prometheus?")
    try:
        body = response.json()
    except (ValueError, RecursionError):
        raise ExportError(f"{shown_url} did not answer JSON for {what}: is --prometheus the base "
                          "URL of Prometheus?") from None
    return parse_matrix(body, what, query)


def parse_matrix(body: Any, what: str = "query", query: str = "") -> list[dict]:
    """The one parser of a query_range answer (Prometheus' JSON, decoded) -> its series, each
    {'metric': {label: value}, 'values': float64 array (n, 2) of unix time, value} (NaN and
    +-Inf kept as such). Anything else than Prometheus' shape (not an object, no matrix, a series
    without 'values', a time that is not unix seconds, a value that is not a number) is an
    ExportError naming `what`: a malformed answer never reaches the caller."""
    if not isinstance(body, dict):
        raise ExportError(f"{what}: the answer is a JSON {type(body).__name__}, not Prometheus' object")
    if body.get("status") != "success":
        raise ExportError(f"Prometheus rejected {what}: {str(body.get('error', body))[:300]}; query: {query}")
    for text in body.get("warnings") or []:
        warn(f"Prometheus warning for {what}: {text}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        kind = data.get("resultType") if isinstance(data, dict) else type(data).__name__
        raise ExportError(f"{what}: expected a range vector result, got {kind!r}")
    result = data.get("result")
    result = [] if result is None else result
    if not isinstance(result, list):
        raise ExportError(f"{what}: 'result' is a {type(result).__name__}, not a list of series")
    return _all_series(result, what)


def _all_series(result: list, what: str) -> list[dict]:
    """The answer's series with their points converted in one go (each series' values a view of
    one array: a grouped answer holds thousands of short series). Anything else than
    [unix time, number] points sends the answer through _series, series by series, whose error
    names the series."""
    labels, values = [], []
    for s in result:
        lab = s.get("metric", {}) if isinstance(s, dict) else None
        val = s.get("values") if isinstance(s, dict) else None
        if not isinstance(lab, dict) or not isinstance(val, list) or not all(isinstance(v, str) for v in lab.values()):
            return [_series(s, n, what) for n, s in enumerate(result)]
        labels.append(lab)
        values.append(val)
    points = [p for v in values for p in v]
    try:
        tv = np.array(points, dtype=np.float64) if points else np.zeros((0, 2))
    except (ValueError, TypeError, OverflowError):
        tv = None
    if tv is None or tv.ndim != 2 or tv.shape[1] != 2 or not (np.abs(tv[:, 0]) <= MAX_UNIX_SECONDS).all():
        return [_series(s, n, what) for n, s in enumerate(result)]
    parts = np.split(tv, np.cumsum([len(v) for v in values])[:-1]) if values else []
    return [{"metric": lab, "values": part} for lab, part in zip(labels, parts)]


def _series(s: Any, n: int, what: str) -> dict:
    labels = s.get("metric", {}) if isinstance(s, dict) else None
    values = s.get("values") if isinstance(s, dict) else None
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()) \
            or not isinstance(values, list):
        raise ExportError(f"{what}: series {n} of the answer has no 'metric' object and 'values' list")
    if not values:
        return {"metric": labels, "values": np.zeros((0, 2))}
    try:  # Prometheus sends [time, "value"] pairs: one conversion per series
        tv = np.array(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        tv = None
    if tv is None or tv.ndim != 2 or tv.shape[1] != 2 or not (np.abs(tv[:, 0]) <= MAX_UNIX_SECONDS).all():
        bad = next((p for p in values if not _point(p)), values[0])
        raise ExportError(f"{what}: series {n} of the answer has a point {str(bad)[:80]} that is not "
                          "[unix time, number]")
    return {"metric": labels, "values": tv}


def _point(p: Any) -> bool:
    try:
        return isinstance(p, list) and len(p) == 2 and abs(float(p[0])) <= MAX_UNIX_SECONDS and float(p[1]) is not None
    except (TypeError, ValueError, OverflowError):
        return False


def _error_text(response: requests.Response) -> str:
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        return redact_url(str(error or response.text[:200])[:300])
    except (ValueError, RecursionError):
        return response.text.strip()[:200] or response.reason
