"""Static checks of deploy/: Kustomize renders, strict schema validation for a pinned
Kubernetes version, the Prometheus Operator objects, yamllint, promtool, the dashboard's
queries, the images' Dockerfiles, and the metric names against service/metrics.py.

Tools: `make deploy-tools` installs yamllint and promtool, kubernetes-validate comes with
the dev extra, kubectl is installed by hand; a test whose tool is missing skips and says
so. No cluster, no network.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import ENV_PREFIX, Settings, load_settings
from tests.deploy.helpers import (
    CRD_KINDS,
    DEPLOY,
    GPU_ONLY,
    K8S,
    KUBERNETES_VERSION,
    MONITORING,
    OVERLAYS,
    PROMETHEUS_SERIES,
    RULES_FILE,
    RULES_TESTS,
    TLS_ONLY,
    adapter_rules,
    dashboard,
    dashboard_exprs,
    declared_series,
    grafana_to_promql,
    hpa_metrics,
    metric_names,
    one,
    recorded_names,
    render,
    rule_groups,
    rules_exprs,
    run,
    tool,
    used_series,
)

HEALTH_SERVICES = {"", "inference.v1.Translator", "inference.v1.Generator", "inference.v1.Models"}
PRESTOP_MARGIN_S = 5


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment", "inference")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def settings_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = server_container(docs)
    name = container["envFrom"][0]["configMapRef"]["name"]
    return dict(one(docs, "ConfigMap", name)["data"])


# --- Kustomize + schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
        "PodDisruptionBudget", "PrometheusRule", "Service", "Service", "ServiceAccount",
        "ServiceMonitor",
    ]), kinds  # fmt: skip
    assert {d["metadata"].get("namespace") for d in docs} == {"inference"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (make deploy-tools)"
    )
    docs = render(overlay)
    missing_schema = set()
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']} ({overlay})"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            missing_schema.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is invalid for Kubernetes {KUBERNETES_VERSION}: {exc}")
    # Only the Prometheus Operator CRDs lack a schema; they are checked below.
    assert missing_schema == CRD_KINDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_cluster_ip_service_once(overlay: str) -> None:
    docs = render(overlay)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    services = [
        d for d in docs
        if d["kind"] == "Service"
        and selector.items() <= d["metadata"].get("labels", {}).items()
    ]  # fmt: skip
    assert [s["metadata"]["name"] for s in services] == ["inference"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_carries_the_rule_file(overlay: str, tmp_path: Path) -> None:
    rule = one(render(overlay), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text()), (
        "prometheusrule.yaml is stale: python deploy/scripts/sync_rules.py"
    )
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("record" in r) != ("alert" in r) and r["expr"].strip()
    # promtool on the groups as they will reach the cluster.
    promtool = tool("promtool", "apt-get install prometheus")
    extracted = tmp_path / "prometheusrule.rules.yml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    result = run([promtool, "check", "rules", str(extracted)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Deployment's contract with the service ------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_service_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import ENV_PREFIX, Settings, load_settings

    data = settings_data(render(overlay))
    unknown = sorted(
        k for k in data
        if not k.startswith(ENV_PREFIX) or k[len(ENV_PREFIX):].lower() not in Settings.model_fields
    )  # fmt: skip
    assert not unknown, f"ConfigMap keys that are not settings: {unknown}"
    assert "SERVE_MAX_CONNECTION_AGE_S" in data and float(data["SERVE_MAX_CONNECTION_AGE_S"]) > 0
    for key in list(__import__("os").environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()  # validates every value, as the server does
    container = server_container(render(overlay))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.port,
        "metrics": settings.metrics_port,
        "health": settings.health_port,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_grpc_health_on_a_port_clients_cannot_reach(overlay: str) -> None:
    """On the gRPC port, clients stalling health calls or never reading their answers
    could take the bounds a probe needs (and with TLS on, the kubelet cannot speak to it):
    the probes have the health port, which the NetworkPolicy opens to no one (the
    kubelet's probes are not subject to it)."""
    docs = render(overlay)
    container = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health_port = int(settings_data(docs)["SERVE_HEALTH_PORT"])
    assert ports["health"] == health_port != ports["grpc"]
    policy = one(docs, "NetworkPolicy")
    opened = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert opened == {"grpc", "metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) - {"grpc"} <= {
            "periodSeconds", "timeoutSeconds", "failureThreshold", "initialDelaySeconds",
            "successThreshold",
        }, f"{probe} must be a native gRPC probe"  # fmt: skip
        assert spec["grpc"]["port"] == health_port
        assert spec["grpc"].get("service", "") in HEALTH_SERVICES
    # Readiness follows the overall status, which turns NOT_SERVING while draining.
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["startupProbe"]["grpc"].get("service", "") == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tls_component_mounts_the_secret_and_probes_the_health_port(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """components/tls on an overlay: the server reads its certificate from the Secret, and
    the probes (which speak no TLS) keep the plaintext health port."""
    from tests._tls import self_signed

    docs = render(overlay, _with_tls_component(overlay, tmp_path))
    container = server_container(docs)
    data = settings_data(docs)
    health = int(data["SERVE_HEALTH_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == health
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe
    deployment = one(docs, "Deployment")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret"))
    assert volume["secret"]["secretName"] == "inference-tls"
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    cert, key = Path(data["SERVE_TLS_CERT"]), Path(data["SERVE_TLS_KEY"])
    assert cert.parent == key.parent == Path(mount["mountPath"]) and mount["readOnly"]
    assert (cert.name, key.name) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret's
    # The settings start a server, with a certificate where the Secret would be.
    made_cert, made_key = self_signed(tmp_path)
    files = {"SERVE_TLS_CERT": made_cert, "SERVE_TLS_KEY": made_key}
    settings = _settings_of(data, files, monkeypatch)
    assert settings.tls and settings.health_port == health != settings.port


def _with_tls_component(overlay: str, tmp_path: Path, more: str = "") -> Path:
    """A copy of deploy/ with an overlay beside `overlay` adding components/tls (and
    `more` of kustomization.yaml): its folder."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    folder = tmp_path / "deploy" / "k8s" / "overlays" / f"{overlay}-tls"
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - ../{overlay}\ncomponents:\n  - ../../components/tls\n" + more
    )
    return folder


def _settings_of(
    data: dict[str, str], files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings a pod gets from its ConfigMap `data`, with `files` made here where the
    Secret would put them (nothing from this process's own SERVE_ environment)."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in {**data, **files}.items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mutual_tls_as_the_docs_add_it_to_the_tls_component(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/README.md's mutual TLS: its settings snippet, in an overlay with
    components/tls, names the CA where the Secret's `ca.crt` (as its kubectl command
    creates it) is mounted, and the settings serve mutual TLS from there; the probes keep
    the plaintext health port, which asks for no client certificate."""
    from tests._tls import certificate_authority, self_signed

    readme = (DEPLOY / "README.md").read_text()
    [snippet] = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "TLS_CLIENT_CA" in b]
    [secret] = [c for c in re.findall(r"```sh\n(.*?)```", readme, re.S) if "ca.crt" in c]
    docs = render(overlay, _with_tls_component(overlay, tmp_path, textwrap.dedent(snippet)))
    container = server_container(docs)
    data = settings_data(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret"))
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    ca_path = Path(data["SERVE_TLS_CLIENT_CA"])
    assert ca_path.parent == Path(mount["mountPath"])
    assert f"secret generic {volume['secret']['secretName']} " in secret
    assert f"--from-file={ca_path.name}=" in secret
    health = int(data["SERVE_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe
    cert, key = self_signed(tmp_path)
    ca, _ = certificate_authority(tmp_path)
    files = {"SERVE_TLS_CERT": cert, "SERVE_TLS_KEY": key, "SERVE_TLS_CLIENT_CA": ca}
    settings = _settings_of(data, files, monkeypatch)
    assert settings.mtls and settings.health_port == health != settings.port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tls_component_inside_an_overlay(overlay: str, tmp_path: Path) -> None:
    """components/tls added to the overlay's own kustomization.yaml, as deploy/README.md
    says: the overlay's patches run after the component, and must not move a probe back
    to the TLS port (where the kubelet's plaintext probe fails) or leave the Services
    announcing h2c (cleartext HTTP/2) for a port that speaks TLS."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    folder = tmp_path / "deploy" / "k8s" / "overlays" / overlay
    with (folder / "kustomization.yaml").open("a") as file:
        file.write("\ncomponents:\n  - ../../components/tls\n")
    docs = render(overlay, folder)
    container = server_container(docs)
    health = int(settings_data(docs)["SERVE_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe
    for service in (d for d in docs if d["kind"] == "Service"):
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port.get("appProtocol") != "kubernetes.io/h2c", service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_leave_the_probe_targets_to_the_base(overlay: str) -> None:
    """An overlay's Deployment patch may tune a probe's timing, not restate its port or
    service: a restated port silently undoes a component that moved it."""
    patches = (K8S / "overlays" / overlay).glob("*.yaml")
    for path in patches:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"].get("containers", []):
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert "grpc" not in container.get(probe, {}), f"{path.name}: {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_deadline_outlasts_the_startup_probe(overlay: str) -> None:
    """A pod still within its startup budget must not fail the rollout (progress resets
    as each new pod becomes available; pulling the image and scheduling come on top)."""
    docs = render(overlay)
    startup = server_container(docs)["startupProbe"]
    period, failures = startup.get("periodSeconds", 10), startup.get("failureThreshold", 3)
    budget = startup.get("initialDelaySeconds", 0) + period * failures
    deadline = one(docs, "Deployment")["spec"].get("progressDeadlineSeconds", 600)
    assert deadline >= budget + 120, (deadline, budget)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_pre_stop_and_drain(overlay: str) -> None:
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings_data(docs)["SERVE_DRAIN_GRACE_S"])
    assert pre_stop >= 5, "preStop must outlast endpoint propagation"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + PRESTOP_MARGIN_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down(overlay: str) -> None:
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts, "read-only root: /tmp must be a volume"


def test_gpu_only_in_the_gpu_overlay() -> None:
    cpu, gpu = render("cpu"), render("gpu")
    cpu_pod = one(cpu, "Deployment")["spec"]["template"]["spec"]
    gpu_pod = one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(cpu_pod)
    gpu_limits = server_container(gpu)["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) == 1
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert settings_data(gpu)["SERVE_PROVIDER"] == "cuda"
    assert settings_data(cpu)["SERVE_PROVIDER"] == "cpu"
    assert server_container(gpu)["image"].endswith(":gpu")
    assert server_container(cpu)["image"].endswith(":cpu")
    # /tmp (HOME) has room for CUDA's JIT cache at its default 256 MiB cap on a GPU pod.
    tmp = {v["name"]: v for v in gpu_pod["volumes"]}["tmp"]["emptyDir"]
    assert tmp["sizeLimit"].endswith("Mi") and int(tmp["sizeLimit"][:-2]) >= 256 + 64


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_headless_and_cluster_ip(overlay: str) -> None:
    docs = render(overlay)
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    headless = one(docs, "Service", "inference-headless")["spec"]
    cluster = one(docs, "Service", "inference")["spec"]
    assert headless["clusterIP"] == "None"
    assert cluster.get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in cluster
    for spec in (headless, cluster):
        assert spec["selector"] == selector
        assert any(p["name"] == "grpc" and p["port"] == 50051 for p in spec["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_pdb_networkpolicy(overlay: str) -> None:
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "inference",
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    exposed = {r["name"]["as"] for r in adapter_rules()}
    assert hpa_metrics(docs) and hpa_metrics(docs) <= exposed
    assert "replicas" not in one(docs, "Deployment")["spec"], "the HPA owns replicas"
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == selector
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "metrics"}


def test_dashboard_configmap_is_the_json_file() -> None:
    docs = render("cpu")
    cm = one(docs, "ConfigMap", "inference-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert (
        cm["data"]["inference-dashboard.json"]
        == (MONITORING / "grafana-dashboard.json").read_text()
    )


# --- linters and promtool ----------------------------------------------------------------------


def test_yamllint() -> None:
    yamllint = tool("yamllint", "apt-get install yamllint")
    result = run(
        [yamllint, "-s", "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "test", "rules", str(RULES_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_documented() -> None:
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    assert {"InferenceHighP99Latency", "InferenceHighErrorRatio", "InferenceQueueSaturated",
            "InferenceModelNotReady"} <= alerts  # fmt: skip
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")
    }  # fmt: skip
    assert alerts <= firing, f"alerts without a firing unit test: {alerts - firing}"
    readme = (DEPLOY / "README.md").read_text()
    for alert in alerts:
        assert f"#### {alert}" in readme, f"deploy/README.md has no runbook for {alert}"
    for group in rule_groups():
        for r in group["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in ("warning", "critical")
                assert r["annotations"]["runbook_url"].endswith("#" + r["alert"].lower())


def test_the_certificate_alert_warns_when_the_server_does() -> None:
    """InferenceCertificateExpiresSoon's warning and the server's WARNING at start share
    their threshold (service/tls.py)."""
    from service.tls import EXPIRY_WARNING

    rules = [r for g in rule_groups() for r in g["rules"]]
    severities = {
        r["labels"]["severity"]: r["expr"]
        for r in rules if r.get("alert") == "InferenceCertificateExpiresSoon"
    }  # fmt: skip
    assert set(severities) == {"warning", "critical"}
    assert f"< {EXPIRY_WARNING.days} * 86400" in severities["warning"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule)."""
    promtool = tool("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"dashboard:query:{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(dashboard_exprs().values())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_saturation_panel_shows_a_full_batch_beside_an_idle_model(tmp_path: Path) -> None:
    """Each model version has a batch of its own: a pod whose translator's version 2 has 10
    waiting and no free row while its idle version 1 and its idle language model have 2
    each (scraped from a server with max_batch_size 2 and keep_versions 0 under
    translations alone) is saturated for en-es v2, and the panel says so; a sum over the
    models, or over a model's versions, would read 10 waiting beside 2 free rows."""
    promtool = tool("promtool", "apt-get install prometheus")
    exprs = dashboard_exprs()
    waiting = grafana_to_promql(exprs["Waiting sequences and free batch rows [A]"])
    free = grafana_to_promql(exprs["Waiting sequences and free batch rows [B]"])
    versions = (("en-es", "2"), ("en-es", "1"), ("en-lm", "1"))
    series = {
        ("inference_queue_depth", "en-es", "2"): 10,
        ("inference_queue_depth", "en-es", "1"): 0,
        ("inference_queue_depth", "en-lm", "1"): 0,
        ("inference_free_cache_slots", "en-es", "2"): 0,
        ("inference_free_cache_slots", "en-es", "1"): 2,
        ("inference_free_cache_slots", "en-lm", "1"): 2,
    }
    inputs = [
        {"series": f'{name}{{pod="p1",model="{model}",version="{v}"}}', "values": f"{value}x5"}
        for (name, model, v), value in series.items()
    ]
    checks = [
        {
            "expr": expr,
            "eval_time": "2m",
            "exp_samples": [
                {
                    "labels": f'{{pod="p1",model="{model}",version="{v}"}}',
                    "value": series[name, model, v],
                }
                for model, v in versions
            ],
        }
        for name, expr in (("inference_queue_depth", waiting), ("inference_free_cache_slots", free))
    ]
    rules = tmp_path / "none.rules.yml"
    rules.write_text("groups: []\n")
    test = {
        "rule_files": [str(rules)],
        "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": checks}],
    }
    path = tmp_path / "panel.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"]


# --- metric names --------------------------------------------------------------------------------


def test_the_error_ratio_counts_the_server_side_reasons_of_the_service() -> None:
    """The recording rule and the dashboard's ratio count exactly the failures
    service/errors.py calls the server's own: a reason added there and not here would
    never alert."""
    from service.errors import SERVER_SIDE_REASONS

    def reasons(expr: str) -> set[str]:
        found = re.findall(r'inference_request_failures_total\{[^}]*reason=~"([^"]+)"', expr)
        assert len(found) == 1, expr
        return set(found[0].split("|"))

    assert reasons(rules_exprs()["model:inference_requests_errors:ratio_rate5m"]) == set(
        SERVER_SIDE_REASONS
    )
    assert reasons(dashboard_exprs()["Server-side error ratio [A]"]) == set(SERVER_SIDE_REASONS)


def test_used_metrics_are_declared_by_the_service() -> None:
    """Every series of the dashboard, rules and HPA is one service/metrics.py declares."""
    declared = declared_series()
    used = used_series()
    unknown = {
        name: sorted(where) for name, where in used.items()
        if name not in declared and name not in PROMETHEUS_SERIES
    }  # fmt: skip
    assert not unknown, f"series the service does not export: {unknown}"
    assert declared.issuperset(GPU_ONLY | TLS_ONLY)


def test_metric_name_extraction() -> None:
    names = metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{code!~"OK|X"}[5m])))'
        ' / on (pod) group_left b_total > 1e3 and c{x="y"} offset 5m or rec:name:r5m'
    )
    assert names == {"a_bucket", "b_total", "c", "rec:name:r5m"}
    assert metric_names(
        grafana_to_promql('sum(rate(x{ns="$namespace", m=~"$model"}[$__rate_interval]))')
    ) == {"x"}
    assert recorded_names() and all(":" in r for r in recorded_names())


# --- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile_contract(flavour: str) -> None:
    text = (DEPLOY / f"Dockerfile.{flavour}").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    stages = re.split(r"^FROM ", text, flags=re.M)
    runtime = stages[-1]
    assert runtime.startswith("${BASE_IMAGE} AS runtime")
    assert "torch" not in re.sub(r"#.*", "", runtime), "the runtime stage must not install torch"
    assert re.search(r"/opt/export-venv/bin/python -m export", text), "export in the build stage"
    user = re.search(r"^USER (\S+)", runtime, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.M)
    assert entry, "ENTRYPOINT must use the exec (JSON) form so signals reach python"
    # No flags: a flag would beat the settings ConfigMap (SERVE_HOST=:: on an IPv6 cluster).
    assert yaml.safe_load(entry.group(1)) == ["python", "-m", "service"]
    assert re.search(r"^\s+SERVE_HOST=0\.0\.0\.0 \\$", runtime, re.M), "listen on every address"
    if flavour == "gpu":
        assert "onnxruntime-gpu" in text
