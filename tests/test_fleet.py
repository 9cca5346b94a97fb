"""Live detection of a fleet (detect_live.py with grouped queries, batched scoring, shards) and its
deployment files (deploy/k8s, deploy/grafana).

- grouped_query rewrites (no Prometheus) and hashmod/--shard parsing;
- a real Prometheus on loopback scraping fleetsim's exporter of N_SERVICES synthetic services with
  the lab's metric set (1 s scrapes; Prometheus also puts its own hashmod shard label on every
  series, and scrapes the detector's /metrics as job "puad"): every query of
  labshop/metrics-lab.yaml grouped gives the same values as per service; the Detector's polls
  (incremental rows, batched scoring, window cache) give the same scores as one service at a time
  (fetch_window + puad.score_series + Scorer.score); a CPU fault in one service raises only that
  service's alarm; two shards cover every service exactly once, as Prometheus' hashmod splits
  them, and each replica's /metrics has only its services; every PromQL expression of the
  Grafana dashboard returns data from the detector's metrics;
- the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate), the
  ServiceMonitor and PrometheusRule against the Prometheus operator's CRD schemas (deploy/crds),
  and the rule ConfigMap and the PrometheusRule hold chaos/alert-rules.yaml's rules.
A random-weights `test`-preset model (seq_len 5) is enough: the tests check the pipeline, not
the model; per-service scalers and calibrations are fitted on the fleet's first CAL_ROWS seconds.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SERVICES = 60
FAULTY = "svc-0007"
SEQ_LEN = 5
RATE_WINDOW = 5
CAL_ROWS = 40  # normal rows each service's scaler and calibration are fitted on (1 s apart)
QUIET_RECORD_S = 45  # the quiet fleet's normal data to train on (recorded while the module's other tests ran)
QUIET_RUN_S = 20  # its normal running


def test_grouped_query_rewrite():
    from faultlog import ExportError
    from prometheus import grouped_query, hashmod, load_metric_set, parse_shard, regex_literal, shard_services
    ms = load_metric_set(ROOT / "labshop" / "metrics-lab.yaml")
    by = {m["column"]: m for m in ms["metrics"]}
    q, label = grouped_query(by["up"], ms, ["a", "b.c"])
    assert (q, label) == ('max by (service) (up{job="shop",service=~"b\\\\.c|a"})', "service")
    q, _ = grouped_query(by["latency_p99"], ms, ["a"])
    assert q.startswith("histogram_quantile(0.99, sum by (le, service) (rate(") and 'service=~"a"' in q
    assert grouped_query(by["node_load1"], ms, ["a"]) is None  # node level: once for all
    sock = load_metric_set(ROOT / "chaos" / "metrics-sockshop.yaml")
    cpu = next(m for m in sock["metrics"] if m["column"] == "cpu_rate")
    q, label = grouped_query(cpu, sock, ["carts", "carts-db"])
    assert label == "puad_service" and q.startswith("sum by (puad_service) (label_replace(rate(")
    assert '"(?P<puad_service>carts-db|carts)-.*"' in q  # the longest name first
    trailing = {"column": "x", "query": 'sum(rate(x{service="$service"}[1m])) by (le)', "agg": "sum", "fill": None}
    assert grouped_query(trailing, ms, ["a"])[0] == 'sum(rate(x{service=~"a"}[1m])) by (service, le)'
    with pytest.raises(ExportError):
        grouped_query({"column": "x", "query": 'sum(x) + $service', "agg": "sum", "fill": None}, ms, ["a"])
    assert regex_literal("a.b+c") == "a\\.b\\+c"
    explicit = load_metric_set({"services": ["a"], "metrics": {"x": {
        "query": 'sum(x{pod=~"$service-.*"})', "grouped": 'sum by (app) (x{app=~"$services"})', "group_label": "app"}}})
    assert grouped_query(explicit["metrics"][0], explicit, ["a", "b.c"]) == ('sum by (app) (x{app=~"a|b\\\\.c"})', "app")
    # Prometheus' hashmod: md5, last 8 bytes big-endian, mod N (checked against Prometheus below)
    assert [hashmod(s, 7) for s in ("catalogue", "payment", "front-end")] == [
        int.from_bytes(__import__("hashlib").md5(s.encode()).digest()[8:], "big") % 7
        for s in ("catalogue", "payment", "front-end")]
    assert parse_shard("") is None and parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ExportError):
            parse_shard(bad)
    import detect_live
    from config import check_fields
    assert detect_live.LiveOptions(shard="1/4").shard == "1/4"
    check_fields(detect_live.LiveOptions(shard="1/4"), detect_live.LIVE_CHECKS)
    for bad in ("4/4", "1", "a/b"):
        with pytest.raises(Exception, match="--shard"):
            check_fields(detect_live.LiveOptions(shard=bad), detect_live.LIVE_CHECKS)
    names = [f"s{i}" for i in range(100)]
    parts = [shard_services(names, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(names) and all(parts)


def test_grouped_answer_split_by_service():
    """A grouped answer parsed at once (parse_matrix: one conversion for all its series, each
    series' values as they would be alone) and split into one row per service in the order
    asked: several series of one service combined with the column's agg over their finite
    values, NaN where a service has none, other services and unlabelled series ignored."""
    from prometheus import _series, parse_matrix, split_by_label
    result = [{"metric": {"service": "b", "le": "1"}, "values": [[100, "1"], [101, "2"], [102, "NaN"]]},
              {"metric": {"service": "b", "le": "2"}, "values": [[101, "5"], [102, "+Inf"], [103, "7"]]},
              {"metric": {"service": "a"}, "values": [[100, "3"], [103.0004, "4"]]},
              {"metric": {"service": "zz"}, "values": [[100, "9"]]},  # not asked for
              {"metric": {}, "values": [[100, "0"]]},  # `or vector(0)`: no label
              {"metric": {"service": "c"}, "values": []}]
    series = parse_matrix({"status": "success", "data": {"resultType": "matrix", "result": result}})
    for got, s in zip(series, result):
        assert got["metric"] == s["metric"]
        np.testing.assert_array_equal(got["values"], _series(s, 0, "q")["values"])
    grid, nan = np.arange(100, 104), np.nan
    want = {"sum": [1, 7, nan, 7], "mean": [1, 3.5, nan, 7], "max": [1, 5, nan, 7], "min": [1, 2, nan, 7]}
    for agg, b in want.items():
        rows = split_by_label(series, "service", ["c", "b", "a", "d"], grid, agg)
        np.testing.assert_array_equal(rows, [[nan] * 4, b, [3, nan, nan, 4], [nan] * 4], err_msg=agg)
    assert split_by_label(series, "other", ["a"], grid, "sum").shape == (1, 4)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("needs prometheus (apt-get install prometheus)")
    import torch

    import detect_live
    import fleetsim
    import scoring
    from config import PRESETS, Config
    from prometheus import load_metric_set
    from puad import PUAD, score_series
    from utils import Scaler

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fleet")
    names = fleetsim.service_names(N_SERVICES)
    det_port = fleetsim.free_port()
    puad_job = {"job_name": "puad", "static_configs": [{"targets": [f"127.0.0.1:{det_port}"]}]}
    with fleetsim.Fleet(names, tmp, scrape_s=1, extra_jobs=[puad_job], shard_modulus=2) as f:
        metric_set = load_metric_set(ROOT / "labshop" / "metrics-lab.yaml", services=names)
        metric_set["rate_window"] = f"{RATE_WINDOW}s"
        cfg = Config(**PRESETS["test"], seq_len=SEQ_LEN, num_threads=1)
        opts = detect_live.LiveOptions(live_step=1, prometheus=f.prometheus, port=det_port,
                                       live_log=str(tmp / "events.jsonl"))
        n = cfg.seq_len + cfg.smooth - 1
        time.sleep(max(0.0, f.started + CAL_ROWS + n + 2 * RATE_WINDOW + 4 - time.time()))
        torch.manual_seed(0)
        model = PUAD(cfg, len(metric_set["metrics"])).eval()
        session = detect_live.make_session()
        first = detect_live.fetch_fleet(session, f.prometheus, metric_set, metric_set["metrics"], names,
                                        int(time.time()) - 2, CAL_ROWS + n, 1, 10.0)
        states, cals = {}, {}
        for s in names:
            x = first[s][0]
            x = x[~np.isnan(x).any(1)]
            assert len(x) >= CAL_ROWS, f"{s}: {len(x)} complete rows in the first window"
            scaler = Scaler("minmax").fit(x)
            states[s] = detect_live.EntityState(scaler)
            out = score_series(model, scaler.transform(x), cfg.seq_len)
            cals[s] = scoring.Scorer.from_config(cfg).fit(out, scoring.constant_features(x))
        yield dict(fleet=f, names=names, cfg=cfg, opts=opts, model=model, metric_set=metric_set, states=states, cals=cals,
                   session=session, n=n, tmp=tmp)


def make_detector(fleet, names):
    import detect_live
    return detect_live.Detector(fleet["cfg"], fleet["opts"],
                                {"features": [m["column"] for m in fleet["metric_set"]["metrics"]]}, fleet["model"], names, fleet["metric_set"], fleet["metric_set"]["metrics"],
                                {s: fleet["states"][s] for s in names}, {s: fleet["cals"][s] for s in names})


def reference_score(fleet, service, x):
    """One service at a time: the scorer as before batching (puad.score_series + Scorer.score)."""
    from puad import score_series
    out = score_series(fleet["model"], fleet["states"][service].scaler.transform(x), SEQ_LEN)
    return float(fleet["cals"][service].score(out)[-1])


def test_grouped_equals_per_service_and_batched_scores(fleet):
    import detect_live
    f, names, ms, session, n = fleet["fleet"], fleet["names"], fleet["metric_set"], fleet["session"], fleet["n"]
    end = int(time.time()) - 3  # settled data: both ways read the same samples
    grouped = detect_live.fetch_fleet(session, f.prometheus, ms, ms["metrics"], names, end, n, 1, 10.0)
    per = {s: detect_live.fetch_window(session, f.prometheus, ms, ms["metrics"], s, end, n, 1, 10.0) for s in names}
    for s in names:
        np.testing.assert_allclose(grouped[s][0], per[s][0], rtol=1e-12, err_msg=s)
        assert grouped[s][1] == per[s][1] == 0, s
    # sock-shop's grouped queries (pod-name regexes with label_replace, `or vector(0)`, `name`
    # labels) are valid PromQL for this Prometheus (no cAdvisor data here: empty answers)
    from prometheus import grouped_query, load_metric_set
    sock = load_metric_set(ROOT / "chaos" / "metrics-sockshop.yaml")
    for m in sock["metrics"]:
        grouped = grouped_query(m, sock, ["carts", "carts-db", "front-end", "orders"])
        if grouped:
            r = requests.get(f"{f.prometheus}/api/v1/query", params={"query": grouped[0]}, timeout=10).json()
            assert r["status"] == "success", (m["column"], r)
    # the Detector's polls: the second one reuses rows and windows of the first
    det = make_detector(fleet, names)
    det.poll(end - 1)
    det.poll(end)
    assert det.timing["scored"] == len(names) and det.timing["model_windows"] < len(names) * fleet["cfg"].smooth
    for s in names:
        want = reference_score(fleet, s, per[s][0])
        assert det.gauges.score.labels(s)._value.get() == pytest.approx(want, rel=1e-5, abs=1e-6), s
    one = det.scoring.score({names[3]: per[names[3]][0]})[names[3]]
    assert one == pytest.approx(reference_score(fleet, names[3], per[names[3]][0]), rel=1e-5, abs=1e-6)


def test_fault_alarms_only_its_service_and_dashboard(fleet):
    """Thresholds: 2.5 x the largest normal score of the fleet over 12 polls. The random model's
    normal scores jump with the latency quantiles: in five runs the other services peaked at up
    to 1.5 x the largest of 8 normal polls during the fault's 20 polls (2.7 x that of 5 polls was
    seen once), while the faulty service's score rose to 3.8-27 x it; 4 x, the factor before,
    missed the fault when one noisy service set the maximum (145 against 152). The fault is
    polled until its rate window and the score's smoothing hold it (at most 20 polls), then no
    other service may be in alarm."""
    f, names = fleet["fleet"], fleet["names"]
    det = make_detector(fleet, names)
    det.serve()
    try:
        normal = dict.fromkeys(names, 0.0)
        for _ in range(12):
            time.sleep(1)
            det.poll(int(time.time()) - 1)
            normal = {s: max(normal[s], det.gauges.score.labels(s)._value.get()) for s in names}
        threshold = 2.5 * max(normal.values())
        for s in names:
            det.scoring.set_threshold(s, threshold)
        f.exporter.faults[FAULTY] = "cpu"
        try:
            for i in range(20):
                time.sleep(1)
                det.poll(int(time.time()) - 1)
                if i >= RATE_WINDOW and det.alerts.on(FAULTY):
                    break
        finally:
            f.exporter.faults.clear()
        scores = {s: det.gauges.score.labels(s)._value.get() for s in names}
        alarmed = sorted(s for s in names if det.alerts.on(s))
        print(f"\nnormal max {max(normal.values()):.3g}; threshold {threshold:.3g}; fault {scores[FAULTY]:.3g}; "
              f"others max {max(v for s, v in scores.items() if s != FAULTY):.3g}; poll {det.timing}")
        assert alarmed == [FAULTY], alarmed
        event = [json.loads(line) for line in Path(fleet["opts"].live_log).read_text().splitlines()
                 if f'"{FAULTY}"' in line][-1]
        assert event["state"] == "anomalous", event
        assert {"cpu_rate", "process_cpu_rate"} & set(event["top_features"]), event

        # every PromQL of the dashboard answers with data from this detector (Prometheus scrapes it as job puad)
        time.sleep(2)
        dash = json.loads((ROOT / "deploy" / "grafana" / "puad-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        assert len(exprs) >= 8
        for text in ("puad_anomaly_score", "puad_threshold", "puad_anomaly{", "puad_query_errors_total",
                     "puad_skipped_windows_total", "puad_stale", "puad_scoring_latency_seconds_bucket", "puad_feature_score"):
            assert any(text in e for e in exprs), text
        for expr in exprs + [a["expr"] for a in dash["annotations"]["list"]]:
            query = expr.replace("$entity", ".*").replace("$__rate_interval", "30s")
            r = requests.get(f"{f.prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
            assert r["status"] == "success", (expr, r)
            if "ALERTS" not in expr:  # no rule file in this Prometheus: no alerts to show
                assert r["data"]["result"], f"no data for {expr}"
        values = requests.get(f"{f.prometheus}/api/v1/label/entity/values",
                              params={"match[]": "puad_anomaly"}, timeout=10).json()["data"]
        assert sorted(values) == names  # the dashboard's $entity variable
    finally:
        det.close()


def test_two_shards_cover_every_service_once(fleet):
    from prometheus_client import generate_latest

    from prometheus import shard_services
    f, names = fleet["fleet"], fleet["names"]
    shards = [shard_services(names, (i, 2)) for i in range(2)]
    assert sorted(shards[0] + shards[1]) == names and not set(shards[0]) & set(shards[1])
    # the split Prometheus' own hashmod relabelling makes
    r = requests.get(f"{f.prometheus}/api/v1/query", params={"query": "group by (service, shard) (shop_requests_total)"},
                     timeout=10).json()["data"]["result"]
    assert {x["metric"]["service"]: int(x["metric"]["shard"]) for x in r} == {s: i for i in range(2) for s in shards[i]}
    end = int(time.time()) - 2
    scored = []
    for part in shards:
        det = make_detector(fleet, part)
        det.poll(end)
        scored += [s for s in part if det.gauges.score.labels(s)._value.get() == det.gauges.score.labels(s)._value.get()]
        text = generate_latest(det.gauges.registry).decode()
        exposed = {line.split('entity="')[1].split('"')[0] for line in text.splitlines() if 'entity="' in line}
        assert exposed == set(part)  # each replica's /metrics carries only its services
    assert sorted(scored) == names


def test_kubernetes_manifests_and_rules():
    """The built-in kinds validate against Kubernetes' schemas (kubernetes-validate), the Prometheus
    operator's (ServiceMonitor, PrometheusRule) against its CRD schemas vendored in deploy/crds;
    both rule files are chaos/alert-rules.yaml; no ConfigMap carries the checkpoint."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from test_chaos import validation_errors
    docs = [d for p in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PrometheusRule", "Service", "ServiceMonitor", "StatefulSet"], kinds
    crds = ROOT / "deploy" / "crds"
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            assert validation_errors(d, crds) == [], d["kind"]
        else:
            kubernetes_validate.validate(d, "1.30", strict=True)
    broken = json.loads(json.dumps(next(d for d in docs if d["kind"] == "StatefulSet")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)
    for kind, path, bad in (("ServiceMonitor", ("spec", "endpoints", 0), {"port": 9109}),
                            ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"fore": "2m"})):
        broken = json.loads(json.dumps(next(d for d in docs if d["kind"] == kind)))
        part = broken
        for key in path:
            part = part[key]
        part.update(bad)  # a number where the port's name goes; a misspelt field
        assert validation_errors(broken, crds), kind
    plain = yaml.safe_load((ROOT / "chaos" / "alert-rules.yaml").read_text())
    rules = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["alert-rules.yaml"]
    assert yaml.safe_load(rules) == plain
    assert next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]["groups"] == plain["groups"]
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = next(d for d in docs if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert {"targetLabel": "job", "replacement": "puad", "action": "replace"} in monitor["spec"]["endpoints"][0]["relabelings"]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert not any("configMap" in v for v in pod["volumes"])  # the checkpoint comes from the init container
    args = pod["containers"][0]["args"][0]
    import detect_live  # every flag of the manifest is an option detect_live.py reads
    known = set(detect_live.READS) | set(detect_live.LiveOptions.__dataclass_fields__)
    flags = {a.split("=")[0][2:] for a in args.split() if a.startswith("--")}
    assert flags <= known, flags - known
    assert "--shard=${HOSTNAME##*-}/${SHARDS}" in args
    for doc in ("README.md", "docs/fleet.md", "docs/live.md", "chaos/README.md"):
        assert "configmap puad-checkpoint" not in (ROOT / doc).read_text().lower(), doc


def test_batched_scoring_with_local_and_global_entities():
    """Two groups: entities on the global prototypes share a batch, each entity with local
    prototypes (its own beta_l and g_local) has one; the scores are score_series' per entity,
    in the first poll and in the next one (window cache), whatever the order; with level gauges
    too, their recent level taken from the rows before the poll's (score_series' history)."""
    import torch

    import detect_live
    import scoring
    from config import PRESETS, Config
    from puad import PUAD, apply_local_state, latent_memory, level_rows, score_series
    from utils import Scaler
    for level in (None, [True, False, False, True]):
        torch.manual_seed(0)
        cfg = Config(**PRESETS["test"], seq_len=SEQ_LEN, num_threads=1)
        model = PUAD(cfg, 4).eval().set_level(level)
        rng = np.random.default_rng(0)
        names = ["g1", "l1", "g2", "l2"]
        states, cals, series = {}, {}, {}
        for s in names:
            x = rng.normal(size=(40, 4)).cumsum(0)
            local = None
            if s.startswith("l"):
                local = {"beta_l": torch.randn_like(model.pot.beta_l), "g_local": torch.randn_like(model.pot.g_local)}
            states[s] = detect_live.EntityState(Scaler("zscore").fit(x[:30]), local, local is not None)
            if local is not None:
                apply_local_state(model, local)
            out = score_series(model, states[s].scaler.transform(x[:30]), SEQ_LEN, local is not None)
            memory = latent_memory(model, [states[s].scaler.transform(x[:30] + rng.normal(size=(30, 4)))], cfg)
            cals[s] = scoring.Scorer.from_config(cfg).fit(out, scoring.constant_features(x[:30]), memory)
            assert cals[s].latent_ > 0  # each with its own memory: the latent term goes through the batch too
            series[s] = x
        det = detect_live.Detector(cfg, detect_live.LiveOptions(), {"features": list("abcd")}, model, names,
                                   {"rate_window": "1s"}, [], states, cals)
        n = cfg.seq_len + cfg.smooth - 1

        rows = level_rows(cfg, detect_live.LiveOptions().live_step)
        assert det.scoring.level_rows == (rows if level else 0)

        def reference(s, raw, before, use_local):
            if states[s].local is not None:
                apply_local_state(model, states[s].local)
            out = score_series(model, states[s].scaler.transform(raw), SEQ_LEN, use_local, level_rows=rows,
                               history=states[s].scaler.transform(before))
            assert (out.fall is not None) == bool(level)
            np.testing.assert_allclose(det.scoring.last_input[s][1], cals[s].name(out), rtol=1e-5, atol=1e-6)
            return float(cals[s].score(out)[-1])

        for end in (30, 31):
            raws = {s: series[s][end - n:end] for s in names}
            befores = {s: series[s][:end - n] for s in names}
            got = det.scoring.score(raws, befores)
            assert det.scoring.model_windows == (len(names) * cfg.smooth if end == 30 else len(names))
            for s in names:
                assert got[s] == pytest.approx(reference(s, raws[s], befores[s], states[s].use_local), rel=1e-5,
                                               abs=1e-6), (s, end, level)


def test_kubernetes_metric_set_template_is_valid_promql(fleet):
    """deploy/metrics-kubernetes.yaml (docs/byo.md's template: cAdvisor CPU, memory, network,
    threads; kube-state-metrics restarts and readiness; Istio's request rate, errors, latency, the
    callers' latency)
    loads as a metric set, and every query, per service and grouped, is PromQL this Prometheus
    accepts (no cluster here: empty answers)."""
    from prometheus import grouped_query, load_metric_set, render_query
    ms = load_metric_set(ROOT / "deploy" / "metrics-kubernetes.yaml")
    columns = [m["column"] for m in ms["metrics"]]
    for column in ("cpu_rate", "memory_working_set", "net_rx_rate", "restarts", "pods_ready", "request_rate",
                   "error_rate", "latency_p99", "caller_latency_p99"):
        assert column in columns, column
    assert set(sum(ms["interpretation"].values(), [])) <= set(columns)
    for m in ms["metrics"]:
        grouped = grouped_query(m, ms, ms["services"])
        assert grouped is not None, m["column"]  # every column is the service's own
        for query in (render_query(m, ms, ms["services"][0]), grouped[0]):
            r = requests.get(f"{fleet['fleet'].prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
            assert r["status"] == "success", (m["column"], query, r)


@pytest.mark.skipif(shutil.which("prometheus-alertmanager") is None and shutil.which("alertmanager") is None,
                    reason="needs prometheus-alertmanager (apt-get install prometheus-alertmanager)")
def test_quiet_fleet_end_to_end(fleet, tmp_path):
    """fleetsim.quiet_run, shortened (docs/live.md runs `fleetsim.py --quiet` for 30 + 30 minutes),
    on 3 of the module's services (svc-0007's fault is elsewhere): the last QUIET_RECORD_S seconds
    of their normal data (recorded while the module's other tests ran) exported and trained on,
    detect_live.py posting to a real Alertmanager. A CPU and a latency fault (at once, on two
    services) are each caught within 3 polls of the debounce (--alarm_hold) with the right metric
    named first, one firing and one resolved alert each; Alertmanager received exactly the
    detector's posts, every alert raised was resolved, and none is active once the detector has
    stopped (exit 0); test.py's preview of the normal run under the same hold and threshold warns
    that the history is short.
    Quiet here means at most 4 alarms in the 20 s normal run and the fault phase together (18 runs
    with today's SPOT: 0 to 3; one more failed a fault assertion, its log not kept): 45 s of history
    cannot hold a service's normal range (a p99 latency leaves it within a minute), so the detector
    warns and may alarm; the 30-minute fleet is the measure of quiet (docs/live.md). The recording's 14 calibration rows: SPOT fits its exponential tail
    over their median (metrics.spot_threshold)."""
    import fleetsim
    from config import Config
    f, hold = fleet["fleet"], Config.alarm_hold
    time.sleep(max(0.0, f.started + fleetsim.SETTLE_S + QUIET_RECORD_S + 2 - time.time()))  # recorded enough
    end = time.time() - 2
    report = fleetsim.quiet_run(f, fleet["names"][:3], tmp_path, end - QUIET_RECORD_S, end, run_s=QUIET_RUN_S,
                                fault_s=6, holds=(hold,),
                                train_args=("--preset=test", "--epochs=4", "--seq_len=10", "--lr=3e-3",
                                            "--val_frac=0.3"))
    print("\n" + json.dumps(report, indent=1))
    assert report["false_alarms"] + report["others_raised"] <= 4, report
    for fault in report["faults"]:
        said = json.dumps(fault)  # whole: pytest shortens a dict's repr
        assert fault["caught"] and fault["delay_steps"] <= hold + 3, said
        assert fault["named_right"], said
        assert fault["raised"] == 1 and fault["resolved"] == 1, said
    assert report["firing_posts"] == 2 + report["others_raised"] and report["resolved_posts"] >= 2, report
    assert report["received_total"]["firing"] == report["received_total"]["resolved"] >= 2, report
    assert report["detector_exit"] == 0 and report["active_after_stop"] == [], report
    assert report["preview"][hold]["warned_short_history"], report
