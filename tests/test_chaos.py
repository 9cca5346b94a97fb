"""Chaos Mesh manifests against the CRD schemas, and the fault runner chaos/inject.py with a
stand-in kubectl."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHAOS = REPO / "chaos"
CRD_DIR = REPO.parent / "shared" / "chaos-mesh-crds"
sys.path.insert(0, str(REPO))

from chaos import inject  # noqa: E402
from faultlog import read_fault_log  # noqa: E402

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the Schedule CRD is ~1 MB
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# ---------------------------------------------------------------- manifests vs CRDs

def yaml_files() -> list[Path]:
    return sorted(CHAOS.glob("*.yaml"))


def manifests() -> list[Path]:
    """chaos/*.yaml files that are Kubernetes objects (the plan and metric set are not)."""
    return [p for p in yaml_files()
            if isinstance(doc := yaml.safe_load(p.read_text()), dict) and "apiVersion" in doc]


def strict(schema: dict) -> dict:
    """Reject unknown fields, as `kubectl apply` (strict field validation) does: objects that
    list their properties get additionalProperties: false."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


@lru_cache(maxsize=None)
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict:
    """{(apiVersion, kind): openAPIV3Schema} from the CRD files of crd_dir, indexed without
    parsing the big files twice."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schemas[(f"{group}/{version['name']}", kind)] = strict(
                        version["schema"]["openAPIV3Schema"])
    return schemas


def validation_errors(manifest: dict, crd_dir: Path = CRD_DIR) -> list[str]:
    """What is wrong with a manifest against its CRD's schema in crd_dir (strict: unknown fields too)."""
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    schema = crd_schemas(crd_dir).get(key)
    if schema is None:
        return [f"no served CRD for apiVersion={key[0]} kind={key[1]}"]
    # OpenAPI 3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMaximum etc.)
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(manifest)]


needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"CRD schemas not found at {CRD_DIR}")


def test_chaos_folder_holds_the_expected_files():
    names = {p.name for p in manifests()}
    assert {"cpu-stress-test.yaml", "pause-catalogue.yaml"} <= names  # the seed's names
    assert len(names) >= 9
    for path in yaml_files():
        if path.name in names:
            continue
        doc = yaml.safe_load(path.read_text())
        # anything else must be a plan (a list), a metric set (has metrics) or Prometheus rules (groups)
        assert isinstance(doc, list) or (isinstance(doc, dict) and ("metrics" in doc or "groups" in doc)), path


@needs_crds
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_matches_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert validation_errors(manifest) == []
    assert manifest["metadata"]["namespace"] == "sock-shop"
    spec = manifest["spec"]
    if manifest["kind"] == "Schedule":
        spec = spec[manifest["spec"]["type"][0].lower() + manifest["spec"]["type"][1:]]
    assert spec["selector"]["namespaces"] == ["sock-shop"]
    assert spec["selector"]["labelSelectors"]["name"] in ("catalogue", "payment")


def test_every_fault_kind_exists_for_catalogue_and_payment():
    found = set()
    for path in manifests():
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] != "Schedule":
            kind, target, name = inject.fault_identity(manifest, path.name)
            assert name == manifest["metadata"]["name"]
            found.add((kind, target))
    assert found == {(k, t) for k in ("cpu-stress", "memory-stress", "pod-failure", "network-delay")
                     for t in ("catalogue", "payment")}
    assert inject.fault_identity(yaml.safe_load((CHAOS / "cpu-stress-test.yaml").read_text()))[:2] \
        == ("cpu-stress", "catalogue")
    assert inject.fault_identity(yaml.safe_load((CHAOS / "pause-catalogue.yaml").read_text()))[:2] \
        == ("pod-failure", "catalogue")
    stress = yaml.safe_load((CHAOS / "cpu-stress-test.yaml").read_text())
    assert stress["spec"]["stressors"]["cpu"]["workers"] == 2


def _break_cpu_workers(m):
    m["spec"]["stressors"]["cpu"]["workers"] = "two"


def _break_mode(m):
    m["spec"]["mode"] = "everything"


def _break_unknown_field(m):
    m["spec"]["stressor"] = m["spec"].pop("stressors")  # typo


def _break_missing_selector(m):
    del m["spec"]["selector"]


def _break_version(m):
    m["apiVersion"] = "chaos-mesh.org/v1beta1"


def _break_pod_action(m):
    m["spec"]["action"] = "pod-explode"


def _break_delay_type(m):
    m["spec"]["delay"] = "200ms"


@needs_crds
@pytest.mark.parametrize("source,breaker", [
    ("cpu-stress-test.yaml", _break_cpu_workers),
    ("cpu-stress-test.yaml", _break_mode),
    ("cpu-stress-test.yaml", _break_unknown_field),
    ("cpu-stress-test.yaml", _break_missing_selector),
    ("cpu-stress-test.yaml", _break_version),
    ("pause-catalogue.yaml", _break_pod_action),
    ("network-delay-catalogue.yaml", _break_delay_type),
], ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_broken_manifest_fails(source, breaker):
    manifest = copy.deepcopy(yaml.safe_load((CHAOS / source).read_text()))
    breaker(manifest)
    assert validation_errors(manifest)


# ---------------------------------------------------------------- plans

def test_plan_example_loads():
    plan = inject.load_plan(CHAOS / "plan-example.yaml")
    assert plan and all(e["manifest"].is_file() and e["duration"] > 0 for e in plan)


@pytest.mark.parametrize("entry,message", [
    ({"manifest": str(CHAOS / "cpu-stress-test.yaml"), "duration": 3600}, "longer than"),
    ({"manifest": str(CHAOS / "schedule-cpu-stress-catalogue.yaml"), "duration": 5}, "Schedule"),
    ({"manifest": str(CHAOS / "cpu-stress-test.yaml"), "duration": -1}, "duration"),
    ({"manifest": str(CHAOS / "missing.yaml")}, "cannot read"),
    ({"manifest": str(CHAOS / "cpu-stress-test.yaml"), "durration": 5}, "unknown keys"),
    ({"manifest": str(CHAOS / "cpu-stress-test.yaml"), "duration": 5, "pause_after": float("nan")}, "pause_after"),
    ({"manifest": str(CHAOS / "cpu-stress-test.yaml"), "duration": 5, "pause_after": float("inf")}, "pause_after"),
])
def test_bad_plan_is_refused(tmp_path, entry, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump([entry]))
    with pytest.raises(inject.PlanError, match=message):
        inject.load_plan(plan)


def test_binary_plan_or_manifest_is_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(inject.PlanError, match=r"plan .*binary.yaml is not a text"):
        inject.load_plan(binary)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump([{"manifest": str(binary), "duration": 5}]))
    with pytest.raises(inject.PlanError, match=r"entry 1: .*binary.yaml is not a text"):
        inject.load_plan(plan)


# ---------------------------------------------------------------- runner with a stand-in kubectl

FAKE_KUBECTL = """#!{python}
import json, os, sys, time
with open({record!r}, "a") as f:
    f.write(json.dumps({{"t": time.time(), "args": sys.argv[1:]}}) + "\\n")
if sys.argv[1] == "apply":
    time.sleep(float(os.environ.get("FAKE_APPLY_SECONDS", "0")))
"""


@pytest.fixture
def kubectl(tmp_path):
    """A stand-in kubectl that records its arguments -> (path, function reading the calls)."""
    record = tmp_path / "kubectl-calls.jsonl"
    path = tmp_path / "bin" / "kubectl"
    path.parent.mkdir()
    path.write_text(FAKE_KUBECTL.format(python=sys.executable, record=str(record)))
    path.chmod(0o755)

    def calls() -> list[dict]:
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines() if line]
    return path, calls


def write_plan(tmp_path, entries) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump([{**e, "manifest": str(CHAOS / e["manifest"])} for e in entries]))
    return plan


def run_inject(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "chaos.inject", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kwargs)


def test_runner_applies_waits_deletes_and_logs(tmp_path, kubectl):
    kubectl_path, calls = kubectl
    plan = write_plan(tmp_path, [
        {"manifest": "cpu-stress-test.yaml", "duration": 1.5, "pause_after": 0.5},
        {"manifest": "network-delay-payment.yaml", "duration": 1, "name": "delay-200ms"},
    ])
    log = tmp_path / "faults.csv"
    process = run_inject("--plan", plan, "--fault_log", log, "--kubectl", kubectl_path)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err

    made = calls()
    verbs = [(c["args"][0], Path(c["args"][c["args"].index("-f") + 1]).name) for c in made]
    assert verbs == [("apply", "cpu-stress-test.yaml"), ("wait", "cpu-stress-test.yaml"),
                     ("delete", "cpu-stress-test.yaml"),
                     ("apply", "network-delay-payment.yaml"), ("wait", "network-delay-payment.yaml"),
                     ("delete", "network-delay-payment.yaml")]
    assert "--for=condition=AllInjected" in made[1]["args"]
    assert 1.5 <= made[2]["t"] - made[1]["t"] < 3.0  # held for the plan's duration
    assert made[3]["t"] - made[2]["t"] >= 0.5  # pause_after

    header, *lines = log.read_text().splitlines()
    assert header == "start,end,kind,target,name"
    assert len(lines) == 2
    rows = read_fault_log(log)
    assert [(r["kind"], r["target"], r["name"]) for r in rows] == [
        ("cpu-stress", "catalogue", "cpu-stress-catalogue"),
        ("network-delay", "payment", "delay-200ms")]
    for row, line, wait_call, delete_call in zip(rows, lines, made[1::3], made[2::3]):
        start, end = line.split(",")[:2]
        assert ISO.match(start) and ISO.match(end)
        assert row["start"] < row["end"]
        assert math.floor(wait_call["t"]) <= row["start"] <= wait_call["t"] + 1
        assert delete_call["t"] <= row["end"] <= delete_call["t"] + 2
    assert 1 <= rows[0]["end"] - rows[0]["start"] <= 4
    assert 1 <= rows[1]["end"] - rows[1]["start"] <= 3


def test_dry_run_calls_nothing(tmp_path, kubectl):
    kubectl_path, calls = kubectl
    plan = write_plan(tmp_path, [{"manifest": "pause-catalogue.yaml", "duration": 60}])
    log = tmp_path / "faults.csv"
    env = {"PATH": f"{kubectl_path.parent}{os.pathsep}{os.environ['PATH']}"}
    process = run_inject("--plan", plan, "--fault_log", log, "--dry-run", env=env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "pod-failure" in out and "catalogue" in out and "pod-failure-catalogue" in out
    assert calls() == []
    assert not log.exists()


@pytest.mark.parametrize("signum,apply_seconds", [
    (signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 30)],
    ids=["sigint-while-holding", "sigterm-while-holding", "sigint-during-apply"])
def test_signal_deletes_fault_in_flight(tmp_path, kubectl, signum, apply_seconds):
    kubectl_path, calls = kubectl
    log = tmp_path / "faults.csv"
    log.write_text("start,end,kind,target,name\n2026-11-24T03:20:00Z,2026-11-24T03:25:00Z,"
                   "cpu-stress,payment,earlier\n")
    plan = write_plan(tmp_path, [
        {"manifest": "memory-stress-catalogue.yaml", "duration": 60},
        {"manifest": "cpu-stress-payment.yaml", "duration": 60}])
    process = run_inject("--plan", plan, "--fault_log", log, "--kubectl", kubectl_path,
                         env={"FAKE_APPLY_SECONDS": str(apply_seconds)})
    wanted = "apply" if apply_seconds else "wait"
    deadline = time.time() + 20
    while not any(c["args"][0] == wanted for c in calls()):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.time()
    process.send_signal(signum)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 128 + signum, err

    made = calls()
    assert [c["args"][0] for c in made] == (["apply", "delete"] if apply_seconds
                                            else ["apply", "wait", "delete"])
    assert Path(made[-1]["args"][made[-1]["args"].index("-f") + 1]).name == "memory-stress-catalogue.yaml"
    assert made[-1]["t"] >= sent
    rows = read_fault_log(log)
    assert len(rows) == 2 and rows[0]["name"] == "earlier"
    assert (rows[1]["kind"], rows[1]["target"]) == ("memory-stress", "catalogue")
    assert rows[1]["start"] <= sent <= rows[1]["end"] <= made[-1]["t"] + 2
    assert rows[1]["end"] - rows[1]["start"] <= 4  # the real end, not the planned 60 s
    assert log.read_text().endswith("\n")
