"""deploy/monitoring: PodMonitor and PrometheusRule against the Prometheus Operator CRD schemas (unknown
fields rejected), the rules through `promtool check rules` and `promtool test rules` (every alert fires
when it should and stays silent otherwise), the Grafana dashboard's structure and queries (each parses
and names only metrics that renderer.metrics.recorder exports), and the ConfigMap that carries the dashboard."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from prometheus_server import require_binary
from renderer.metrics.recorder import RAY_PREFIX
from test_metrics import exposition_after_exercise, sample_names

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "freescale-render-farm.json"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "prometheus-operator-crds-v0.93"
DASHBOARD_UID = "freescale-render-farm"

# Metric names in PromQL: not part of a recording rule's name (level:metric:operations) or a label name.
METRIC_NAME = re.compile(r"(?<![\w:])((?:ray_)?freescale_[a-z0-9_]+)\b(?!\s*[=!]~?)")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$cluster": ".*"}
PREFIXES = {"ray": RAY_PREFIX + "freescale_", "standalone": "freescale_"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def rule_spec() -> dict:
    return load(MONITORING / "prometheusrule.yaml")["spec"]


def rules() -> list[dict]:
    return [rule for group in rule_spec()["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported(prefix: str = "") -> set[str]:
    """Sample names from a live exposition of renderer.metrics.recorder, with Ray's prefix or none."""
    return {prefix + name for name in sample_names(exposition_after_exercise())}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(require_binary("promtool")), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# --- CRD schemas, strict --------------------------------------------------------------------------------

def strict(schema):
    """The schema with unknown fields rejected: additionalProperties false on every object schema that lists
    its properties, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and isinstance(out["properties"], dict) and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str) -> jsonschema.Validator:
    crd = load(CRDS / f"monitoring.coreos.com_{kind.lower()}s.yaml")
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def check_object(obj: dict) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # metadata is a bare object in the CRD schema: check what the API server would
    metadata = obj["metadata"]
    assert set(metadata) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"]) and len(metadata["name"]) <= 63
    for key, value in {**metadata.get("labels", {}), **metadata.get("annotations", {})}.items():
        assert isinstance(key, str) and isinstance(value, str), (key, value)


@pytest.mark.parametrize("name", ["podmonitor.yaml", "prometheusrule.yaml"])
def test_manifests_validate_against_crds(name):
    check_object(load(MONITORING / name))


def test_strict_validation_rejects_unknown_fields():
    podmonitor = load(MONITORING / "podmonitor.yaml")
    for path in ((), ("spec",), ("spec", "podMetricsEndpoints", 0)):
        broken = copy.deepcopy(podmonitor)
        target = broken
        for key in path:
            target = target[key]
        target["portName"] = "metrics"  # a misspelt field that a lax check would let through
        with pytest.raises(AssertionError, match="portName"):
            check_object(broken)
    rule = load(MONITORING / "prometheusrule.yaml")
    rule["spec"]["groups"][1]["rules"][0]["severity"] = "page"
    with pytest.raises(AssertionError, match="severity"):
        check_object(rule)


def test_podmonitor_scrapes_ray_pods():
    spec = load(MONITORING / "podmonitor.yaml")["spec"]
    assert spec["selector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert [endpoint["port"] for endpoint in spec["podMetricsEndpoints"]] == ["metrics"]
    assert "ray.io/cluster" in spec["podTargetLabels"]  # -> ray_io_cluster, which every rule groups by
    for rule in rules():
        assert "ray_io_cluster" in rule["expr"], rule.get("alert") or rule.get("record")


# --- rules ----------------------------------------------------------------------------------------------

@pytest.fixture
def rules_dir(tmp_path):
    """The PrometheusRule's spec as a plain rules file, with the unit tests beside it."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    shutil.copy(MONITORING / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    return tmp_path


def test_promtool_check_rules(rules_dir):
    result = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests(rules_dir):
    result = promtool("test", "rules", "alerts.test.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_firing_and_silent_cases():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == {"FreescaleRenderStalled", "FreescaleRendersFailing", "FreescaleDeviceMemoryNearLimit",
                      "FreescaleGangNotPlaced", "FreescaleRenderWaitingLong"}
    fires, silent = set(), set()
    for test in load(MONITORING / "alerts.test.yaml")["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires == alerts and silent == alerts


def test_rules_name_only_exported_metrics():
    known = exported(RAY_PREFIX)
    records = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            assert name in known, f"{rule.get('alert') or rule.get('record')}: {name} is not exported"
        for name in re.findall(r"[a-z_]+:[a-z_]+:[a-z0-9]+", rule["expr"]):
            assert name in records, name
    for rule in rules():
        assert rule.get("labels", {}).get("severity", "warning") in ("warning", "critical")


# --- dashboard ------------------------------------------------------------------------------------------

def panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    return [(f"{panel['title']} {target['refId']}", target["expr"]) for panel in panels() for target in panel["targets"]]


def substitute(expr: str, prefix: str) -> str:
    expr = expr.replace("${metric_prefix}", prefix)
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] == DASHBOARD_UID and board["title"] and board["tags"]
    assert isinstance(board["schemaVersion"], int) and "id" not in board
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {option["value"] for option in variables["metric_prefix"]["options"]} == set(PREFIXES.values())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    titles = " ".join(panel["title"].lower() for panel in panels())
    for topic in ("throughput", "progress", "eta", "stage duration", "step duration", "by kind", "memory", "failures"):
        assert topic in titles, topic
    queries = " ".join(expr for _, expr in expressions())
    assert "histogram_quantile" in queries


@pytest.mark.parametrize("path", PREFIXES)
def test_dashboard_queries_parse(path, tmp_path):
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}:{path}", "expr": substitute(expr, PREFIXES[path])}
                                            for i, (_, expr) in enumerate(expressions())]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
    result = promtool("check", "rules", "queries.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", PREFIXES)
def test_dashboard_names_only_exported_metrics(path):
    prefix = RAY_PREFIX if path == "ray" else ""
    known = exported(prefix)
    used = set()
    for where, expr in expressions():
        names = METRIC_NAME.findall(substitute(expr, PREFIXES[path]))
        assert names, where
        for name in names:
            assert name in known, f"{where}: {name} is not exported"
        used |= set(names)
    variable = {v["name"]: v for v in dashboard()["templating"]["list"]}["cluster"]
    assert set(METRIC_NAME.findall(variable["query"]["query"].replace("${metric_prefix}", PREFIXES[path]))) <= known
    # every metric shows somewhere (histograms through _bucket)
    families = {name.removesuffix("_bucket") for name in used}
    missing = {name for name in known if not name.endswith(("_sum", "_count")) and name.removesuffix("_bucket") not in families}
    assert not missing, f"not on the dashboard: {sorted(missing)}"


# --- the ConfigMap for Grafana's sidecar ------------------------------------------------------------------

def test_configmap_generator_embeds_the_dashboard():
    kustomization = load(MONITORING / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [f"{DASHBOARD.name}=dashboards/{DASHBOARD.name}"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert generator["options"]["disableNameSuffixHash"] is True


def test_kustomize_build():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found")
    result = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert set(objects) == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    configmap = objects["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {DASHBOARD.name: DASHBOARD.read_text()}  # byte for byte
    assert json.loads(configmap["data"][DASHBOARD.name])["uid"] == DASHBOARD_UID
    import kubernetes_validate

    kubernetes_validate.validate(configmap, kubernetes_validate.utils.latest_version(), strict=True)
    check_object(objects["PodMonitor"])
    check_object(objects["PrometheusRule"])
