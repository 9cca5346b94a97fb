"""Reliability, round two (issue 34): one rule per concern, each case of the issue a test.

Concerns: a name used as a path; a name put into PromQL; parsing a Prometheus answer; a URL in
a log; reading a CSV; an output folder written as one unit; one-line errors for bad options,
files and checkpoints; chaos.inject's fault record. Prometheus answers a real server can give
come from a real Prometheus on loopback (started here, scraping itself); a small fake server
only for answers no Prometheus gives (`[]`, a value "n/a", a series without "values").
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export_metrics as em  # noqa: E402
import test as evaluate_script  # noqa: E402
import train_safe  # noqa: E402
import utils  # noqa: E402
from test_export_metrics import FakePrometheus, free_port, matrix, points  # noqa: E402
from test_reliability import eval_args, make_dataset, targs  # noqa: E402

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (apt-get install prometheus)")
SECRET = "S3cr3tPW"


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    """A real Prometheus on loopback scraping itself every second (job "self") -> {"url", "first":
    the time of its first sample}."""
    if PROMETHEUS is None:
        pytest.skip("needs prometheus (apt-get install prometheus)")
    import lab
    tmp = tmp_path_factory.mktemp("prom")
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "self", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    procs = lab.Processes(tmp)
    procs.spawn([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"], "prometheus")
    url = f"http://127.0.0.1:{port}"
    try:
        lab.wait_http(f"{url}/-/ready", 60, "prometheus", procs)
        deadline = time.time() + 30
        while not (result := requests.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]):
            assert time.time() < deadline, "Prometheus did not scrape itself in 30 s"
            time.sleep(0.3)
        yield {"url": url, "first": float(result[0]["value"][0])}
    finally:
        procs.stop_all()


def cli_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "export_metrics.py"), "--no_progress", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def one_line_error(result: subprocess.CompletedProcess, prog: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and ": warning:" not in line]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def recent(prom: dict, seconds: int = 6) -> tuple[int, int]:
    """The last `seconds` seconds, all of them recorded by `prom` (waits for them)."""
    time.sleep(max(0.0, prom["first"] + seconds + 3 - time.time()))
    end = int(time.time()) - 1
    return end - seconds, end


# ================================================================ a name used as a path

@pytest.mark.parametrize("name", ["../other/c", "ABSOLUTE"])
def test_export_refuses_a_service_name_that_is_a_path(tmp_path, prom, name):
    """Case 1: --services=../other/c overwrote another dataset's train.csv; an absolute name escaped too."""
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    other = tmp_path / "other" / "c"
    other.mkdir(parents=True)
    (other / "train.csv").write_text("timestamp,x\n1,1\n")
    metrics = tmp_path / "m.yaml"
    metrics.write_text(yaml.safe_dump({"services": ["a"], "metrics": {"x": "vector(1)"}}))
    start, end = recent(prom)
    result = cli_export("--prometheus", prom["url"], "--metrics", str(metrics), "--start", str(start), "--end", str(end),
                        "--step", "1s", "--out", str(tmp_path / "out"), "--services", name)
    assert "would be used as a file name" in one_line_error(result, "export_metrics.py")
    assert (other / "train.csv").read_text() == "timestamp,x\n1,1\n"
    assert not (tmp_path / "abs").exists() and not (tmp_path / "out").exists()


def test_local_path_refuses_an_entity_name_that_is_a_path(tmp_path):
    import puad
    assert puad.local_path(tmp_path / "puad.ckpt", "omi-1").parent == tmp_path
    for name in ("../../x", "/etc/x", ".hidden", ""):
        with pytest.raises(SystemExit, match="would be used as a file name"):
            puad.local_path(tmp_path / "puad.ckpt", name)


# ================================================================ a name put into PromQL

HOSTILE = '"} or vector(7) or up{x="'


@needs_prometheus
@pytest.mark.parametrize("query, option", [
    ('max(up{job="$service"})', f"--services={HOSTILE}"),  # the issue's case: no data (was vector(1))
    ('max(up{job=~"$service"})', "--services=sel."),  # "sel." as a regex would match "self"
    ('max(up{job="$service",n="$namespace"}) or vector(0)', f"--namespace={HOSTILE}")])
def test_export_puts_names_into_promql_as_literals(tmp_path, prom, query, option):
    """Case 2: a service name reached Prometheus as PromQL (`... or vector(1) or ...`)."""
    metrics = tmp_path / "m.yaml"
    metrics.write_text(yaml.safe_dump({"services": ["self"], "metrics": {"up": query}}))
    start, end = recent(prom)
    args = ["--prometheus", prom["url"], "--metrics", str(metrics), "--start", str(start), "--end", str(end), "--step", "1s"]
    assert cli_export(*args, "--out", str(tmp_path / "plain")).returncode == 0  # the plain names work
    result = cli_export(*args, "--out", str(tmp_path / "out"), option)
    if "namespace" in option:
        assert result.returncode == 0, result.stderr
        assert pd.read_csv(tmp_path / "out" / "self" / "train.csv")["up"].eq(0).all()  # 7 if injected
    else:
        assert "returned no data" in one_line_error(result, "export_metrics.py")


@needs_prometheus
@pytest.mark.parametrize("query, namespace, service", [
    ('max(up{job="self",n="$namespace"}) or vector(0)', HOSTILE, "self"),  # node-level: one query for all
    ('max(up{job="$service",n="$namespace"}) or vector(0)', HOSTILE, "self"),  # grouped over the services
    ('max(up{job="$service",job!="x$service"}) or vector(0)', "", HOSTILE)])  # not groupable: per service
def test_detect_live_queries_use_the_same_rule(prom, query, namespace, service):
    """detect_live.py's node-level, grouped and per-service queries go through the same rule: a
    hostile namespace or service matches nothing instead of adding `vector(7)`."""
    import detect_live
    from prometheus import load_metric_set, make_session
    _, end = recent(prom, 6)
    plain = load_metric_set({"services": ["self"], "namespace": "", "metrics": {"a": query.replace('n="$namespace"', 'n=""')}})
    x = detect_live.fetch_rows(make_session(), prom["url"], plain, plain["metrics"], ["self"], end - 5, end, 1, 5.0)
    assert (x == 1).all()
    metric_set = load_metric_set({"services": ["self"], "namespace": namespace, "metrics": {"a": query}})
    x = detect_live.fetch_rows(make_session(), prom["url"], metric_set, metric_set["metrics"], [service], end - 5, end, 1, 5.0)
    assert np.nan_to_num(x).max() == 0, x  # no series matched (an injected one shows as 1 or 7)


def test_placeholder_rule_by_context():
    from faultlog import ExportError
    from prometheus import fill_placeholders
    got = fill_placeholders('sum(x{pod=~"$service-.*",ns="$namespace"}[$rate_window]) $$',
                            {"service": "a.b", "namespace": 'q"\\', "rate_window": "1m"}, "m")
    assert got == 'sum(x{pod=~"a\\\\.b-.*",ns="q\\"\\\\"}[1m]) $'
    assert fill_placeholders("x{a='$service'}", {"service": "it's"}, "m") == "x{a='it\\'s'}"
    with pytest.raises(ExportError, match=r"m: \$service = 'a b' stands outside a quoted string"):
        fill_placeholders("${service}_total", {"service": "a b"}, "m")
    with pytest.raises(ExportError, match=r"duration"):
        fill_placeholders("rate(x[$rate_window])", {"rate_window": "1m]) or vector(1"}, "m")


# ================================================================ parsing a Prometheus answer

MALFORMED = {
    "list": [],
    "n/a": {"status": "success", "data": {"resultType": "matrix",
                                          "result": [{"metric": {}, "values": [[1000, "n/a"]]}]}},
    "no values": {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}}]}},
}


@pytest.mark.parametrize("kind", ["list", "n/a", "no values"])
def test_export_refuses_a_malformed_answer_in_one_line(tmp_path, kind):
    """Case 3 (export): AttributeError, ValueError, KeyError before."""
    fake = FakePrometheus(lambda params: (200, MALFORMED[kind]))
    try:
        result = cli_export("--prometheus", fake.url, "--metrics", str(write_metric_set(tmp_path)),
                            "--start", "1000", "--end", "1100", "--step", "10s", "--out", str(tmp_path / "out"))
    finally:
        fake.close()
    assert "column 'a' (service e1)" in one_line_error(result, "export_metrics.py")
    assert not (tmp_path / "out").exists()


def write_metric_set(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.yaml"
    path.write_text(yaml.safe_dump({"services": ["e1", "e2"], "rate_window": "2s",
                                    "metrics": {c: f'{c}{{s="$service"}}' for c in ("a", "b", "c")}}))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tiny model on features a, b, c of entities e1, e2, and a metric set naming them."""
    tmp = tmp_path_factory.mktemp("live2")
    data = make_dataset(tmp / "data")
    train_safe.main(targs(tmp, data, "--stage=global"))
    return {"tmp": tmp, "data": data, "ckpt": tmp / "puad.ckpt", "metrics": write_metric_set(tmp)}


def detector(live, tmp_path, prometheus: str, *extra: str):
    import detect_live
    return detect_live.setup([f"--ckpt={live['ckpt']}", f"--data={live['data']}", f"--metrics_file={live['metrics']}",
                              "--entities=e1", f"--prometheus={prometheus}", "--live_step=1", "--port=0",
                              "--max_backoff=0.2", "--query_timeout=2", "--num_threads=1",
                              f"--live_log={tmp_path / 'events.jsonl'}", *extra])


def scrape(det) -> dict:
    text = requests.get(f"http://127.0.0.1:{det.gauges.server.server_port}/metrics", timeout=5).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


@pytest.mark.parametrize("kind", ["list", "n/a", "no values"])
def test_live_detector_counts_a_malformed_answer_as_a_failed_poll(live, tmp_path, kind):
    """Case 3 (live): the detector exited 1 and /metrics disappeared; now a failed poll, counted."""
    fake = FakePrometheus(lambda params: (200, MALFORMED[kind]))
    det = detector(live, tmp_path, fake.url, "--max_polls=2")
    det.serve()
    try:
        det.run()
        metrics = scrape(det)
    finally:
        det.close()
        fake.close()
    assert metrics["puad_query_errors_total"] == 2
    assert metrics['puad_stale{entity="e1"}'] == 1


def test_deeply_nested_json_is_refused_in_one_line(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    from faultlog import ExportError
    from prometheus import make_session, query_range

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))  # unread, the close would reset the answer
            body = ("[" * 100_000 + "]" * 100_000).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ExportError, match="did not answer JSON"):
            query_range(make_session(), f"http://127.0.0.1:{server.server_port}", "x", 0, 10, 1, retries=0)
    finally:
        server.shutdown()
        server.server_close()


def test_parse_matrix_keeps_nan_and_inf_and_refuses_the_rest():
    from faultlog import ExportError
    from prometheus import parse_matrix
    ok = parse_matrix({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"a": "b"}, "values": [[1, "1.5"], [2, "NaN"], [3, "+Inf"]]}]}})
    assert ok[0]["metric"] == {"a": "b"} and ok[0]["values"][0].tolist() == [1.0, 1.5]
    assert np.isnan(ok[0]["values"][1, 1]) and np.isinf(ok[0]["values"][2, 1])
    for body in ({"status": "success", "data": {"resultType": "matrix", "result": {}}},
                 {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": [], "values": []}]}},
                 {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": [[1]]}]}},
                 {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": [["x", "1"]]}]}},
                 {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {"a": ["b"]}, "values": []}]}},
                 {"status": "success", "data": []}, "text"):
        with pytest.raises(ExportError):
            parse_matrix(body, "q")


# ================================================================ a URL printed in a log

def test_config_line_redacts_credentials(capsys):
    import detect_live
    from config import Config, print_config
    opts = detect_live.LiveOptions(prometheus=f"http://u:{SECRET}@127.0.0.1:9090",
                                   webhook=f"https://bot:{SECRET}@hooks.example/alerts?token={SECRET}")
    print_config(Config(), detect_live.changed_options(opts))
    out = capsys.readouterr().out
    assert SECRET not in out and "http://***@127.0.0.1:9090" in out and "https://***@hooks.example" in out


def test_failed_poll_and_webhook_warnings_redact_credentials(live, tmp_path, caplog):
    """Case 8: the password appeared in every failed-poll and webhook warning."""
    import detect_live
    dead = free_port()
    det = detector(live, tmp_path, f"http://u:{SECRET}@127.0.0.1:{dead}", "--max_polls=1",
                   f"--webhook=http://hook:{SECRET}@127.0.0.1:{dead}/api/v2/alerts")
    with caplog.at_level(logging.WARNING, logger="puad.live"):
        det.run()
        det.alerts.post([det.alerts.alert("e1", True, detect_live.Reading(2.0, 1.0, 0, []), time.time(), time.time())])
    assert "poll of" in caplog.text and "webhook http://***@127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


def test_export_error_redacts_credentials(tmp_path):
    result = cli_export("--prometheus", f"http://u:{SECRET}@127.0.0.1:{free_port()}", "--metrics",
                        str(write_metric_set(tmp_path)), "--start", "1000", "--end", "1100", "--retries", "0",
                        "--out", str(tmp_path / "out"))
    line = one_line_error(result, "export_metrics.py")
    assert "cannot reach Prometheus at http://***@127.0.0.1" in line and SECRET not in result.stderr


# ================================================================ the live detector's event log

def test_live_log_that_is_a_folder_is_refused_at_start(live, tmp_path):
    """Case 4: --live_log pointing at a folder gave IsADirectoryError at the first state change."""
    (tmp_path / "logdir").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "detect_live.py"), f"--ckpt={live['ckpt']}",
                             f"--data={live['data']}", f"--metrics_file={live['metrics']}", "--entities=e1",
                             f"--prometheus=http://127.0.0.1:{free_port()}", "--port=0", "--max_polls=1",
                             "--num_threads=1", f"--live_log={tmp_path / 'logdir'}"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert f"detect_live.py: error: --live_log={tmp_path / 'logdir'}: cannot append" in result.stderr


def test_live_log_failing_later_is_counted_not_fatal(live, tmp_path, caplog):
    """A full disk or read-only file system after start: the event goes to the warning, counted."""
    import detect_live
    det = detector(live, tmp_path, "http://127.0.0.1:1")
    (tmp_path / "events.jsonl").unlink(missing_ok=True)
    (tmp_path / "events.jsonl").mkdir()  # the log can no longer be appended to
    det.serve()
    try:
        with caplog.at_level(logging.WARNING, logger="puad.live"):
            det.alerts.states["e1"].on = True
            det.alerts.change("e1", detect_live.Reading(9.0, 1.0, 1_700_000_000, ["a"]))
        assert scrape(det)["puad_live_log_errors_total"] == 1
    finally:
        det.close()
    assert "cannot append to --live_log" in caplog.text and '"state": "anomalous"' in caplog.text


def test_never_scored_entity_is_stale_from_the_start(live, tmp_path):
    """Case 13: for its first stale_steps steps a never-scored entity showed stale 0."""
    det = detector(live, tmp_path, "http://127.0.0.1:1", "--stale_steps=1000")
    det.serve()
    try:
        assert scrape(det)['puad_stale{entity="e1"}'] == 1
    finally:
        det.close()


# ================================================================ chaos.inject's fault record

FAKE_KUBECTL = """#!{python}
import json, sys, time
with open({record!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def kubectl(tmp_path: Path) -> tuple[Path, Path]:
    record, path = tmp_path / "calls.jsonl", tmp_path / "kubectl"
    path.write_text(FAKE_KUBECTL.format(python=sys.executable, record=str(record)))
    path.chmod(0o755)
    return path, record


def run_inject(tmp_path, fault_log, duration=1.0, timeout=60, sabotage=None):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump([{"manifest": str(ROOT / "chaos" / "cpu-stress-test.yaml"), "duration": duration}]))
    path, record = kubectl(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "chaos.inject", "--plan", str(plan), "--fault_log",
                                str(fault_log), "--kubectl", str(path), "--inject_timeout=0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    if sabotage:
        deadline = time.time() + 20
        while not record.exists():
            assert time.time() < deadline
            time.sleep(0.05)
        sabotage()
    out, err = process.communicate(timeout=timeout)
    calls = [json.loads(line)[0] for line in record.read_text().splitlines()] if record.exists() else []
    return process.returncode, out, err, calls


@pytest.mark.parametrize("where", ["missing folder", "folder"])
def test_inject_refuses_an_unwritable_fault_log_before_any_fault(tmp_path, where):
    """Case 5: with a fault log in a missing folder the fault was applied, held and deleted, then
    FileNotFoundError; a folder as the fault log gave IsADirectoryError."""
    log = tmp_path / "nowhere" / "faults.csv" if where == "missing folder" else tmp_path
    code, out, err, calls = run_inject(tmp_path, log)
    assert code == 1 and calls == [], (err, calls)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("inject.py: error:")
    assert str(log) in err


def test_inject_prints_the_fault_row_when_the_log_fails_meanwhile(tmp_path):
    log = tmp_path / "faults.csv"

    def sabotage():  # the log goes away while the fault is held
        log.unlink(missing_ok=True)
        log.mkdir()
    code, out, err, calls = run_inject(tmp_path, log, duration=1.5, sabotage=sabotage)
    assert calls == ["apply", "delete"] and code == 1, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "add the fault's row" in line)
    row = line.rsplit(": ", 1)[1].split(",")
    assert row[2:] == ["cpu-stress", "catalogue", "cpu-stress-catalogue"] and row[0] < row[1]


# ================================================================ reading a CSV

def write_entity(folder: Path, train: pd.DataFrame, test: pd.DataFrame | None = None,
                 labels: pd.DataFrame | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    if test is not None:
        test.to_csv(folder / "test.csv", index=False)
    if labels is not None:
        labels.to_csv(folder / "test_label.csv", index=False)
    return folder


def us_stamps(start: pd.Timestamp, n: int, step_s: int = 15) -> list[str]:
    """Like `6/3/2026 9:58:30 AM`: sorted as text, 10:00 comes before 9:58."""
    return [f"{t.month}/{t.day}/{t.year} {t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d} {'AM' if t.hour < 12 else 'PM'}"
            for t in pd.date_range(start, periods=n, freq=f"{step_s}s")]


def test_non_iso_string_timestamps_are_times_not_text(tmp_path, caplog):
    """Case 6: rows already in time order were reordered as text (90 rows moved into the tail)."""
    n = 200
    stamps = us_stamps(pd.Timestamp("2026-06-03 09:58:30"), 2 * n)
    train = pd.DataFrame({"timestamp": stamps[:n], "x": np.arange(n, dtype=float)})
    test = pd.DataFrame({"timestamp": stamps[n:], "x": np.arange(n, 2 * n, dtype=float)})
    labels = pd.DataFrame({"timestamp": stamps[n:], "label": (np.arange(n) % 7 == 0).astype(int)})
    write_entity(tmp_path / "e", train, test, labels.sample(frac=1, random_state=0))
    with caplog.at_level(logging.WARNING, logger="puad"):
        ent = utils.load_entity(tmp_path / "e")
    assert "not increasing" not in caplog.text.split("test_label")[0]  # train and test kept their order
    assert ent.train[:, 0].tolist() == list(range(n)) and ent.test[:, 0].tolist() == list(range(n, 2 * n))
    assert ent.train_ts.dtype.kind == "M" and ent.train_ts[0] == np.datetime64("2026-06-03T09:58:30")
    assert ent.labels.tolist() == (np.arange(n) % 7 == 0).astype(int).tolist()


@pytest.mark.parametrize("stamp", ["soon", "2026-06-03T09:59:00Z"])
def test_a_timestamp_that_is_not_a_time_is_refused(tmp_path, stamp):
    stamps = [f"2026-06-03 10:{m:02d}:00" for m in range(30)]
    stamps[7] = stamp
    write_entity(tmp_path / "e", pd.DataFrame({"timestamp": stamps, "x": np.arange(30.0)}))
    with pytest.raises(utils.DataError, match=rf"train.csv: line 9: timestamp '{stamp}' is missing or not a time"):
        utils.load_entity(tmp_path / "e")


def test_a_duplicated_header_is_refused_naming_the_column(tmp_path):
    """Case 7: the wrong copy was used and the warning named `cpu_rate.1`, a column not in the file."""
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.csv").write_text("timestamp,cpu_rate,mem,cpu_rate\n" + "".join(
        f"{t},{t % 5},{t % 3},{t % 2}\n" for t in range(30)))
    with pytest.raises(utils.DataError, match=r"train.csv: column 'cpu_rate' appears twice in the header "
                                              r"\(columns 2 and 4\)"):
        utils.load_entity(tmp_path / "e")


@pytest.mark.parametrize("name", ["time", "ts", "date", "Datetime", "epoch", "time_ms", "when (ISO)"])
def test_a_timestamp_column_by_another_name_is_not_a_feature(tmp_path, caplog, name):
    """Issue 33 item 4b: a column `time` of epoch seconds was trained as a feature."""
    n = 40
    stamps = (pd.date_range("2026-06-03", periods=n, freq="15s").strftime("%Y-%m-%dT%H:%M:%SZ").tolist()
              if name == "when (ISO)" else np.arange(1_780_000_000, 1_780_000_000 + 15 * n, 15))
    write_entity(tmp_path / "e", pd.DataFrame({name: stamps, "cpu": np.arange(n) % 4, "mem": np.arange(n) % 3}))
    with caplog.at_level(logging.INFO, logger="puad"):
        ent = utils.load_entity(tmp_path / "e")
    assert ent.features == ["cpu", "mem"]
    assert f"column '{name}' taken as the timestamp" in caplog.text
    assert ent.train_ts[1] > ent.train_ts[0]


def test_two_time_columns_or_an_unnamed_column_are_refused(tmp_path):
    write_entity(tmp_path / "a", pd.DataFrame({"timestamp": range(30), "date": range(30), "x": range(30)}))
    with pytest.raises(utils.DataError, match=r"columns \['timestamp', 'date'\] all name a time"):
        utils.load_entity(tmp_path / "a")
    (tmp_path / "b").mkdir()
    pd.DataFrame({"timestamp": range(30), "x": range(30)}).to_csv(tmp_path / "b" / "train.csv")  # index written
    with pytest.raises(utils.DataError, match=r"column 1 of the header has no name"):
        utils.load_entity(tmp_path / "b")


def test_a_truncated_gzip_is_one_line(tmp_path):
    """Case 12: a cut-off .csv.gz raised EOFError."""
    (tmp_path / "e").mkdir()
    pd.DataFrame({"timestamp": range(5000), "x": np.random.default_rng(0).random(5000)}).to_csv(
        tmp_path / "e" / "train.csv.gz", index=False)
    data = (tmp_path / "e" / "train.csv.gz").read_bytes()
    (tmp_path / "e" / "train.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.DataError, match=r"train.csv.gz: cannot parse CSV"):
        utils.load_entity(tmp_path / "e")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two checkpoints (seeds 0 and 1) of the test preset on a tiny dataset of entities e1, e2."""
    tmp = tmp_path_factory.mktemp("trained2")
    data = make_dataset(tmp / "data")
    for seed in (0, 1):
        (tmp / f"s{seed}").mkdir()
        train_safe.main(targs(tmp / f"s{seed}", data, "--stage=global", f"--seed={seed}"))
    return tmp, data


def test_empty_label_file_is_one_line_in_test_and_baselines(trained, tmp_path):
    """Case 12: a 0-byte test_label.csv gave a traceback in test.py and baselines.py."""
    import baselines
    src, data = trained
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "e2" / "test_label.csv").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"test.py: error: .*e2/test_label.csv: cannot parse CSV"):
        evaluate_script.main(eval_args(src / "s0", tmp_path / "data", f"--out_dir={tmp_path}/res"))
    with pytest.raises(SystemExit, match=r"baselines.py: error: .*e2/test_label.csv: cannot parse CSV"):
        baselines.main([f"--data={tmp_path / 'data'}", "--methods=random", f"--out_dir={tmp_path}/b", "--seq_len=10"])


def test_empty_loss_csv_is_one_line_in_plot_loss(tmp_path):
    import plot_loss
    (tmp_path / "loss.csv").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"plot_loss.py: error: .*loss.csv: not a loss_metrics.csv"):
        plot_loss.main([f"--loss_csv={tmp_path / 'loss.csv'}", f"--out_dir={tmp_path}"])


# ================================================================ export: options, fault log, permissions

@pytest.mark.parametrize("option, message", [
    ("--label_margin=nan", "--label_margin=nan: must be a finite number >= 0"),
    ("--timeout=-1", "--timeout=-1.0: must be a number of seconds > 0"),
    ("--retries=-1", "--retries=-1: must be a whole number >= 0"),
    ("--backoff=inf", "--backoff=inf: must be a finite number >= 0")])
def test_export_options_out_of_range_are_one_line(tmp_path, option, message):
    """Case 9: --label_margin=nan hid a fault; --timeout=-1 a traceback; --retries=-1 'error:  after 0 tries'."""
    result = cli_export("--prometheus", f"http://127.0.0.1:{free_port()}", "--metrics", str(write_metric_set(tmp_path)),
                        "--start", "1000", "--end", "1100", "--out", str(tmp_path / "out"), option)
    assert message in one_line_error(result, "export_metrics.py")


def test_export_refuses_a_folder_as_fault_log_in_one_line(tmp_path):
    result = cli_export("--prometheus", f"http://127.0.0.1:{free_port()}", "--metrics", str(write_metric_set(tmp_path)),
                        "--start", "1000", "--end", "1100", "--out", str(tmp_path / "out"), "--fault_log", str(tmp_path))
    assert f"fault log {tmp_path} is a folder" in one_line_error(result, "export_metrics.py")


@needs_prometheus
def test_overwrite_keeps_the_fault_log_inside_out_and_folders_are_readable(tmp_path, prom):
    """Case 10: --out=D --overwrite --fault_log=D/faults.csv deleted the only copy of the fault
    log (the Dataset/lab layout). Case 13: exported folders were mode 0700."""
    start, end = recent(prom, 12)
    out = tmp_path / "D"
    metrics = tmp_path / "m.yaml"
    metrics.write_text(yaml.safe_dump({"services": ["self"], "metrics": {"up": 'max(up{job="$service"})'}}))
    args = ["--prometheus", prom["url"], "--metrics", str(metrics), "--start", str(start), "--end", str(end), "--step", "1s"]
    assert cli_export(*args, "--out", str(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~current_umask()
    assert stat.S_IMODE((out / "self").stat().st_mode) == 0o777 & ~current_umask()
    em.append_fault(out / "faults.csv", start + 6, start + 8, "cpu-stress", "self", "f1")
    before = (out / "faults.csv").read_bytes()
    result = cli_export(*args, "--out", str(out), "--overwrite", "--fault_log", str(out / "faults.csv"))
    assert result.returncode == 0, result.stderr
    assert (out / "faults.csv").read_bytes() == before
    labels = pd.read_csv(out / "self" / "test_label.csv")
    assert labels.loc[labels["timestamp"].between(start + 6, start + 8), "label"].eq(1).all()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ================================================================ test.py's output folder: one unit

def out_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def test_a_later_run_replaces_every_output_of_the_earlier_one(trained, tmp_path):
    """Case 11: a later run with fewer entities or --plots=False left old PNGs and score files."""
    src, data = trained
    out = tmp_path / "res"
    out.mkdir()
    (out / "loss_curve.png").write_bytes(b"plot_loss.py's")  # another tool's file in the same folder
    evaluate_script.main([f"--ckpt={src / 's0' / 'puad.ckpt'}", f"--data={data}", f"--out_dir={out}", "--plots=True"])
    first = out_files(out)
    assert {"scores_e1.csv", "scores_e2.csv", "anomaly_scores_e2.png", "transport_plan.png"} <= first
    evaluate_script.main([f"--ckpt={src / 's1' / 'puad.ckpt'}", f"--data={data}", f"--out_dir={out}",
                          "--plots=False", "--entity=e1"])
    assert out_files(out) == {"loss_curve.png", "metrics.json", "scores_e1.csv", "segments_e1.csv"}
    assert json.loads((out / "metrics.json").read_text())["checkpoint"].endswith("s1/puad.ckpt")
    assert (out / "loss_curve.png").read_bytes() == b"plot_loss.py's"
    assert not [p for p in out.iterdir() if ".run-" in p.name or ".tmp-" in p.name]


KILL_AT = """
import os, sys
sys.path.insert(0, {root!r})
import utils, test
calls, real = [0], os.replace
def replace(a, b):
    if str(b).startswith({out!r}) and ".test.run-" not in str(b):  # a move into the output folder
        calls[0] += 1
        if calls[0] == {k}:
            os._exit(9)  # as kill -9: no clean-up runs
    return real(a, b)
os.replace = replace
test.main({argv!r})
"""


@pytest.mark.parametrize("k", [2, 3])
def test_kill_mid_write_never_leaves_two_runs_under_one_metrics_json(trained, tmp_path, k):
    """Case 11: after kill -9 mid-write, scores_c.csv came from checkpoint B while metrics.json
    named checkpoint A. Killed at the k-th move into the folder, then a clean run of B."""
    src, data = trained
    out = tmp_path / "res"
    args = lambda seed: [f"--ckpt={src / f's{seed}' / 'puad.ckpt'}", f"--data={data}", f"--out_dir={out}",  # noqa: E731
                         "--plots=False"]
    evaluate_script.main(args(0))
    a_scores = (out / "scores_e1.csv").read_bytes()
    result = subprocess.run([sys.executable, "-c", KILL_AT.format(root=str(ROOT), out=str(out), k=k, argv=args(1))],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 9, result.stderr[-2000:]
    if (out / "metrics.json").exists():
        named = json.loads((out / "metrics.json").read_text())["checkpoint"]
        scores = {(out / f"scores_{e}.csv").read_bytes() == a_scores for e in ("e1",) if (out / f"scores_{e}.csv").exists()}
        assert named.endswith("s0/puad.ckpt") and scores <= {True}, "metrics.json of run A beside run B's scores"
    evaluate_script.main(args(1))
    assert json.loads((out / "metrics.json").read_text())["checkpoint"].endswith("s1/puad.ckpt")
    assert (out / "scores_e1.csv").read_bytes() != a_scores
    assert not [p for p in out.iterdir() if ".run-" in p.name or ".tmp-" in p.name]


def test_run_outputs_is_consistent_after_a_crash_at_every_step(tmp_path):
    """utils.run_outputs killed (os._exit in a forked child) after each file operation of its
    commit: metrics.json, when present, stands only beside its own run's files, and the next
    run leaves exactly its own."""
    def run(folder, tag, names, die_at=None):
        ops = [0]
        real_replace, real_unlink = os.replace, Path.unlink

        def step():
            ops[0] += 1
            if die_at is not None and ops[0] == die_at:
                os._exit(9)
        pid = os.fork()
        if pid == 0:
            try:
                os.replace = lambda a, b: (step(), real_replace(a, b))[1]
                Path.unlink = lambda self, missing_ok=False: (step(), real_unlink(self, missing_ok=missing_ok))[1]
                with utils.run_outputs(folder) as stage:
                    for name in names:
                        utils.atomic_write(stage / name, lambda tmp, n=name: Path(tmp).write_text(tag))
            finally:
                os._exit(0)
        return os.waitpid(pid, 0)[1] >> 8

    for die_at in range(1, 40):
        folder = tmp_path / f"f{die_at}"
        assert run(folder, "A", ["metrics.json", "scores_a.csv", "scores_b.csv", "x.png"]) == 0
        code = run(folder, "B", ["metrics.json", "scores_a.csv", "y.png"], die_at)
        files = {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}
        if "metrics.json" in files:
            tag = files["metrics.json"]
            assert all(v == tag for v in files.values()), (die_at, files)
        assert run(folder, "B", ["metrics.json", "scores_a.csv", "y.png"]) == 0
        files = {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}
        assert files == {"metrics.json": "B", "scores_a.csv": "B", "y.png": "B"}, (die_at, files)
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [".test.manifest"]
        if code == 0:  # the crash point lies after the last operation: every later one does too
            break
    assert die_at > 5


# ================================================================ checkpoints and saving

def test_checkpoint_without_scalers_is_one_line(trained, tmp_path):
    """Case 12: a checkpoint without `scalers` gave a KeyError."""
    src, data = trained
    ckpt = torch.load(src / "s0" / "puad.ckpt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "scalers"}, tmp_path / "a.ckpt")
    with pytest.raises(SystemExit, match=r"a.ckpt: not a PUAD shared checkpoint \(no scalers\)"):
        evaluate_script.main(eval_args(tmp_path, data, f"--ckpt={tmp_path / 'a.ckpt'}"))


def test_checkpoint_with_absurd_seq_len_is_one_line_and_allocates_nothing(trained, tmp_path):
    """Case 12: a checkpoint whose seq_len is 1e9 tried a 64 GB allocation."""
    src, data = trained
    ckpt = torch.load(src / "s0" / "puad.ckpt", weights_only=True)
    ckpt["model_args"] = dict(ckpt["model_args"], seq_len=10**9)
    torch.save(ckpt, tmp_path / "b.ckpt")
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"model does not match its own model_args.*seq_len=1000000000"):
        evaluate_script.main(eval_args(tmp_path, data, f"--ckpt={tmp_path / 'b.ckpt'}"))
    assert time.time() - t0 < 30


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = "train_safe.py"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
import train_safe
train_safe.main({argv!r})
"""


def test_a_failed_save_is_one_line_and_keeps_the_old_files(trained, tmp_path):
    """Case 12: a full disk while saving gave a traceback (the old files stayed intact)."""
    src, data = trained
    shutil.copy(src / "s0" / "puad.ckpt", tmp_path / "puad.ckpt")
    before = (tmp_path / "puad.ckpt").read_bytes()
    argv = targs(tmp_path, data, "--stage=global", "--seed=3")
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT), limit=len(before) // 2, argv=argv)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("train_safe.py: error:")
    assert "puad.ckpt: cannot save the checkpoint (File too large); the file there is unchanged" in result.stderr
    assert (tmp_path / "puad.ckpt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.startswith(".puad.ckpt")]


KILLED_SAVE = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
import puad
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # SIGXFSZ kills it mid-write, as kill -9 would
puad.save_checkpoint({path!r}, {{"w": torch.zeros(1_000_000)}})
"""


def test_temp_files_of_a_killed_save_are_removed_by_the_next(tmp_path):
    """Case 13: temp files of up to 15.7 MB were left behind after a killed save."""
    import puad
    target = tmp_path / "puad.ckpt"
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE.format(root=str(ROOT), path=str(target))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGXFSZ, result.stderr[-2000:]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".puad.ckpt")], "the killed save left no temp file"
    puad.save_checkpoint(target, {"b": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["puad.ckpt"]


def test_a_symlinked_ckpt_takes_the_lock_and_stays_a_link(trained, tmp_path):
    """Case 13: a symlinked --ckpt got around the one-run lock and was replaced by a file."""
    src, data = trained
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(src / "s0" / "puad.ckpt", real / "puad.ckpt")
    link = tmp_path / "link.ckpt"
    link.symlink_to(real / "puad.ckpt")
    with utils.output_lock(real / "puad.ckpt.lock"):
        with pytest.raises(SystemExit, match=r"puad.ckpt.lock: another run"):
            train_safe.main(targs(tmp_path, data, "--stage=global", f"--ckpt={link}"))
    before = (real / "puad.ckpt").read_bytes()
    train_safe.main(targs(tmp_path, data, "--stage=global", f"--ckpt={link}", "--seed=5"))
    assert link.is_symlink() and (real / "puad.ckpt").read_bytes() != before


# ================================================================ found by re-running the probe

def test_prometheus_url_without_scheme_is_one_line(tmp_path):
    """--prometheus=localhost:9090 (no scheme) gave requests' InvalidSchema traceback."""
    result = cli_export("--prometheus", "localhost:9090", "--metrics", str(write_metric_set(tmp_path)),
                        "--start", "1000", "--end", "1100", "--out", str(tmp_path / "out"))
    assert "give an http:// or https:// base URL" in one_line_error(result, "export_metrics.py")


def test_export_never_replaces_the_current_folder(tmp_path):
    """--out=.. --overwrite from a subfolder replaced the folder holding it; --out=. and --out=''."""
    (tmp_path / "here").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    fake = FakePrometheus(lambda params: (200, matrix(points(params, lambda t: 1.0))))
    try:
        for out in ("..", ".", ""):
            result = subprocess.run(
                [sys.executable, str(ROOT / "export_metrics.py"), "--prometheus", fake.url, "--metrics",
                 str(write_metric_set(tmp_path)), "--start", "1000", "--end", "1100", "--step", "10s", "--out", out,
                 "--overwrite", "--no_progress"], capture_output=True, text=True, timeout=60, cwd=tmp_path / "here")
            assert "--out" in one_line_error(result, "export_metrics.py")
    finally:
        fake.close()
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "keep.txt", "metrics.yaml"]


def test_outputs_that_are_folders_or_files_are_one_line(trained, tmp_path, capsys):
    """plot_loss.py --out_dir=FILE, baselines.py --out_dir=FILE and --methods=',', train_safe.py
    --loss_csv=FOLDER (refused before training, not after it)."""
    import baselines
    import plot_loss
    src, data = trained
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"plot_loss.py: error: cannot write .*afile/loss_curve.png"):
        plot_loss.main([f"--loss_csv={src / 's0' / 'loss.csv'}", f"--out_dir={tmp_path / 'afile'}"])
    with pytest.raises(SystemExit, match=r"baselines.py: error: cannot write .*afile/random/metrics.json"):
        baselines.main([f"--data={data}", "--methods=random", f"--out_dir={tmp_path / 'afile'}", "--seq_len=10"])
    with pytest.raises(SystemExit) as e:
        baselines.main([f"--data={data}", "--methods=,", f"--out_dir={tmp_path / 'b'}", "--seq_len=10"])
    assert e.value.code == 2 and "--methods: no method given" in capsys.readouterr().err
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"train_safe.py: error: --loss_csv=.*: a folder, not a file"):
        train_safe.main(targs(tmp_path, data, "--stage=global", f"--loss_csv={tmp_path}", "--epochs=50"))
    assert time.time() - t0 < 20 and not (tmp_path / "puad.ckpt").exists()


def test_plot_loss_refuses_a_value_that_is_not_a_number(trained, tmp_path):
    import plot_loss
    src, _ = trained
    df = pd.read_csv(src / "s0" / "loss.csv")
    df["total"] = df["total"].astype(object)
    df.loc[0, "total"] = "abc"
    df.to_csv(tmp_path / "loss.csv", index=False)
    with pytest.raises(SystemExit, match=r"loss.csv: line 2: total 'abc' is not a number"):
        plot_loss.plot_loss(tmp_path / "loss.csv", tmp_path / "x.png")


@pytest.mark.parametrize("env, option, message", [
    ({"PROMETHEUS_URL": "localhost:9090"}, [], "PROMETHEUS_URL='localhost:9090': must be an http"),
    ({}, ["--entities=,"], "--entities=',': no entity"),
    ({}, ["--rate_window=1m30s"], "rate window of")])
def test_detect_live_refuses_at_start_what_would_fail_every_poll(live, tmp_path, env, option, message):
    """An invalid PROMETHEUS_URL (never range-checked) or a rate window like 1m30s raised at the
    first poll; --entities=',' ran a detector of no entity."""
    args = [f"--ckpt={live['ckpt']}", f"--data={live['data']}", f"--metrics_file={live['metrics']}", "--port=0",
            "--max_polls=1", "--live_step=1", "--num_threads=1", f"--live_log={tmp_path / 'e.jsonl'}"]
    result = subprocess.run([sys.executable, str(ROOT / "detect_live.py"), *args, *(option or ["--entities=e1"])],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, **env})
    assert result.returncode == 1 and f"detect_live.py: error: {message}" in result.stderr, result.stderr[-2000:]


def test_an_entity_named_twice_is_loaded_once(tmp_path):
    data = make_dataset(tmp_path / "data")
    assert [e.name for e in utils.load_dataset(data, "e1,e2,e1")] == ["e1", "e2"]


def test_a_csv_with_another_separator_is_named(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.csv").write_text("timestamp;a;b\n" + "".join(f"{t};{t % 3};1\n" for t in range(30)))
    with pytest.raises(utils.DataError, match=r"train.csv: one column 'timestamp;a;b': separated by ';'\?"):
        utils.load_entity(tmp_path / "e")


def test_an_answer_time_out_of_range_is_refused():
    from faultlog import ExportError
    from prometheus import parse_matrix
    with pytest.raises(ExportError, match=r"point \[1e\+300, '1'\] that is not \[unix time, number\]"):
        parse_matrix({"status": "success", "data": {"resultType": "matrix",
                                                     "result": [{"metric": {}, "values": [[1e300, "1"]]}]}}, "q")


def test_a_fault_log_saved_with_a_bom_is_read_and_appended(tmp_path):
    """A fault log saved by a spreadsheet (UTF-8 with BOM) was refused as 'not a fault log'."""
    from faultlog import append_fault, read_fault_log
    log = tmp_path / "faults.csv"
    log.write_bytes(b"\xef\xbb\xbfstart,end,kind,target,name\n2026-11-24T03:20:00Z,2026-11-24T03:25:00Z,cpu-stress,p,x\n")
    append_fault(log, 1_795_490_900, 1_795_491_000, "cpu-stress", "p", "y")
    assert [f["name"] for f in read_fault_log(log)] == ["x", "y"]


def test_interpretation_only_with_an_empty_label_file_is_one_line(tmp_path):
    (tmp_path / "out" / "svc").mkdir(parents=True)
    (tmp_path / "out" / "svc" / "test_label.csv").write_bytes(b"")
    metrics = tmp_path / "m.yaml"
    metrics.write_text(yaml.safe_dump({"services": ["svc"], "metrics": {"x": "x"},
                                       "interpretation": {"cpu-stress": ["x"]}}))
    em.append_fault(tmp_path / "faults.csv", 1000, 1010, "cpu-stress", "svc", "f")
    result = cli_export("--metrics", str(metrics), "--out", str(tmp_path / "out"), "--interpretation_only",
                        "--fault_log", str(tmp_path / "faults.csv"))
    assert "test_label.csv: cannot parse CSV" in one_line_error(result, "export_metrics.py")


def plan_without_time_limit(tmp_path: Path, duration: float) -> Path:
    manifest, plan = tmp_path / "cpu.yaml", tmp_path / "plan.yaml"
    manifest.write_text("\n".join(line for line in (ROOT / "chaos" / "cpu-stress-test.yaml").read_text().splitlines()
                                  if "duration:" not in line))
    plan.write_text(yaml.safe_dump([{"manifest": str(manifest), "duration": duration}]))
    return plan


def test_inject_refuses_a_duration_sleep_cannot_take(tmp_path):
    """A plan entry of 1e308 s applied the fault, then time.sleep overflowed."""
    from chaos import inject
    with pytest.raises(inject.PlanError, match=r"duration must be a number of seconds in \[0, 1e\+06\]"):
        inject.load_plan(plan_without_time_limit(tmp_path, 1e308))


def test_inject_deletes_and_logs_the_fault_whatever_stops_it(tmp_path, monkeypatch):
    """The overflow above left the fault applied and unlogged: any error while a fault is in
    flight now deletes and logs it first."""
    from chaos import inject
    plan = plan_without_time_limit(tmp_path, 30)
    path, record = kubectl(tmp_path)

    def broken_sleep(seconds):
        raise OverflowError("timestamp out of range for platform time_t")
    monkeypatch.setattr(inject.time, "sleep", broken_sleep)
    with pytest.raises(OverflowError):
        inject.run_plan(inject.load_plan(plan), tmp_path / "faults.csv", str(path), inject_timeout=0)
    assert [json.loads(line)[0] for line in record.read_text().splitlines()] == ["apply", "delete"]
    assert [f["name"] for f in em.read_fault_log(tmp_path / "faults.csv")] == ["cpu-stress-catalogue"]


def test_inject_refuses_a_nan_inject_timeout(tmp_path):
    path, record = kubectl(tmp_path)
    result = subprocess.run([sys.executable, "-m", "chaos.inject", "--plan", str(ROOT / "chaos" / "plan-example.yaml"),
                             "--fault_log", str(tmp_path / "f.csv"), "--kubectl", str(path), "--inject_timeout=nan"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "--inject_timeout=nan: must be a number of seconds >= 0" in result.stderr
    assert not record.exists()


def test_a_manifest_never_removes_files_outside_its_folder(tmp_path):
    folder = tmp_path / "res"
    folder.mkdir()
    (tmp_path / "outside.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / ".test.manifest").write_text(json.dumps(["../outside.txt", "sub", "old.csv"]))
    (folder / "old.csv").write_text("old")
    with utils.run_outputs(folder) as stage:
        (stage / "metrics.json").write_text("{}")
    assert (tmp_path / "outside.txt").read_text() == "mine" and (folder / "sub").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [".test.manifest", "metrics.json", "sub"]


def test_test_py_out_dir_that_is_a_file_is_one_line(trained, tmp_path):
    src, data = trained
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"test.py: error: .*afile"):
        evaluate_script.main(eval_args(src / "s0", data, f"--out_dir={tmp_path / 'afile'}"))


def test_export_refuses_a_metric_column_the_loader_would_read_as_a_time():
    """A metric column named `time` or `date` would be exported beside `timestamp`, then read by
    the loader as a second time column: refused when the metric set is loaded."""
    from prometheus import load_metric_set
    for column in ("time", "Date", "ts_ms"):
        with pytest.raises(em.ExportError, match=rf"column '{column}' would be read as a time"):
            load_metric_set({"services": ["s"], "metrics": {column: "x"}})
    assert load_metric_set({"services": ["s"], "metrics": {"cpu_time": "x", "uptime": "y"}})["metrics"]


def test_date_timestamps_give_the_time_step(tmp_path):
    """Dates are times now, not text: the entity's step (SPOT's risk per entity-day) comes from them."""
    stamps = us_stamps(pd.Timestamp("2026-06-03 09:58:30"), 40)
    write_entity(tmp_path / "e", pd.DataFrame({"timestamp": stamps, "x": np.arange(40.0)}))
    assert utils.time_step([utils.load_entity(tmp_path / "e")]) == 15.0
