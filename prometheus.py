"""The Prometheus client of export_metrics.py and detect_live.py: sessions with auth, query_range
with retries, metric sets (the YAML of column -> PromQL) and steps like 15s.

Auth: bearer token from PROMETHEUS_TOKEN, or basic auth from PROMETHEUS_USER and
PROMETHEUS_PASSWORD. TLS certificates are verified (a CA bundle path, or verify=False).
"""
from __future__ import annotations

import os
import re
import string
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from tqdm import tqdm

from faultlog import FAULT_KINDS, ExportError

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
    'services', 'rate_window', 'metrics': [{'column', 'query', 'agg', 'fill'}, ...],
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
    for column, spec in raw["metrics"].items():
        column = str(column)
        if column == "timestamp":
            raise ExportError(f"{where}: 'timestamp' is reserved, rename that metric")
        if isinstance(spec, str):
            spec = {"query": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("query"), str):
            raise ExportError(f"{where}: metric '{column}' needs a query string")
        unknown = set(spec) - {"query", "agg", "fill"}
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
    """Fill $namespace, $service and $rate_window into a metric's PromQL."""
    try:
        return string.Template(metric["query"]).substitute(
            namespace=metric_set["namespace"], service=service,
            rate_window=metric_set["rate_window"])
    except (KeyError, ValueError) as e:
        raise ExportError(f"metric '{metric['column']}': bad placeholder {e} in query "
                          f"(known: $namespace, $service, $rate_window; write $$ for $)") from None


# ---------------------------------------------------------------- HTTP

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
    params = {"query": query, "start": start, "end": end, "step": step}
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            # POST keeps long queries out of the URL
            response = session.post(url, data=params, timeout=timeout)
        except requests.exceptions.SSLError as e:
            raise ExportError(f"TLS error talking to {prometheus}: {_short_reason(e)} "
                              "(use --ca_cert FILE, or --insecure)") from None
        except (requests.Timeout, requests.ConnectionError) as e:
            problem = f"cannot reach Prometheus at {prometheus} ({_short_reason(e)})"
            continue
        if response.status_code >= 500 or response.status_code == 429:
            problem = (f"Prometheus at {prometheus} answered HTTP {response.status_code} for "
                       f"{what}: {_error_text(response)}")
            continue
        break
    else:
        raise ExportError(f"{problem} after {retries + 1} tries")

    if response.status_code in (401, 403):
        raise ExportError(f"Prometheus at {prometheus} refused access (HTTP "
                          f"{response.status_code}): set PROMETHEUS_TOKEN or "
                          "PROMETHEUS_USER/PROMETHEUS_PASSWORD")
    if response.status_code in (400, 422):
        raise ExportError(f"Prometheus rejected {what}: {_error_text(response)}; query: {query}")
    if response.status_code != 200:
        raise ExportError(f"HTTP {response.status_code} from {url} for {what}: is --prometheus "
                          "the base URL of Prometheus?")
    try:
        body = response.json()
    except ValueError:
        raise ExportError(f"{url} did not answer JSON for {what}: is --prometheus the base "
                          "URL of Prometheus?") from None
    if body.get("status") != "success":
        raise ExportError(f"Prometheus rejected {what}: {body.get('error', body)}; query: {query}")
    for text in body.get("warnings") or []:
        warn(f"Prometheus warning for {what}: {text}")
    data = body.get("data") or {}
    if data.get("resultType") != "matrix":
        raise ExportError(f"{what}: expected a range vector result, got {data.get('resultType')!r}")
    return data.get("result") or []


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("error") or response.text[:200])
    except ValueError:
        return response.text.strip()[:200] or response.reason
