"""Shared by the deploy tests: paths, tool lookup, rendering, and the metric names that the
dashboard, the Prometheus rules and the autoscaler (through prometheus-adapter) depend on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
MONITORING = DEPLOY / "monitoring"
RULES_FILE = MONITORING / "alerts.rules.yml"
RULES_TESTS = MONITORING / "tests" / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ADAPTER_CONFIG = MONITORING / "prometheus-adapter-config.yaml"
# The Kubernetes version the manifests are validated against (kubernetes-validate schemas).
KUBERNETES_VERSION = "1.31.0"
# Written by Prometheus itself for every target, not by the service.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Exported only where a GPU is in use (absent from a CPU server's scrape).
GPU_ONLY = frozenset({"inference_gpu_memory_used_bytes", "inference_cuda_graphs"})
# Exported only where the gRPC port serves TLS (the tests' shared server does not).
TLS_ONLY = frozenset({"inference_tls_certificate_expiry_timestamp_seconds"})
# Kinds without a schema in kubernetes-validate (Prometheus Operator CRDs), checked otherwise.
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})


def tool(name: str, hint: str = "make deploy-tools") -> str:
    """Path of a command-line tool (the venv's bin first), or skip the test saying why."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file():
        return str(venv_bin)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@cache
def _render(kubectl: str, folder: str) -> str:
    result = run([kubectl, "kustomize", folder])
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed:\n{result.stderr}")
    return result.stdout


def render(overlay: str, folder: Path | None = None) -> list[dict[str, Any]]:
    """The overlay rendered by `kubectl kustomize` (or a standalone `kustomize build`);
    `folder`: a kustomization elsewhere instead."""
    path = str(folder or K8S / "overlays" / overlay)
    if shutil.which("kubectl"):
        text = _render(shutil.which("kubectl") or "kubectl", path)
    elif shutil.which("kustomize"):
        result = run(["kustomize", "build", path])
        assert result.returncode == 0, result.stderr
        text = result.stdout
    else:
        pytest.skip("neither kubectl nor kustomize is installed (make deploy-tools)")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]  # fmt: skip
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- PromQL ----------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "bool", "offset", "inf", "nan", "atan2"}
)  # fmt: skip
_LABEL_VALUES = re.compile(
    r"label_values\(\s*(?:(?P<metric>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,\s*)?\w+\s*\)"
)


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values that keep the query valid PromQL."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")
    # namespace="$namespace" -> "" matches series without the label (a local scrape).
    return re.sub(r"\$\{?(\w+)\}?", lambda m: "" if m.group(1) == "namespace" else ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, labels left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"'(?:[^'\\]|\\.)*'", "''", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    names = set()
    for match in _IDENT.finditer(expr):
        word = match.group(0)
        rest = expr[match.end() :].lstrip()
        if rest.startswith("("):  # function or aggregation
            continue
        if word.lower() in _KEYWORDS:
            continue
        # a number's exponent (1e3) or a duration unit cannot start an identifier here
        before = expr[: match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue
        names.add(word)
    return names


# --- what the monitoring objects use -----------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES_FILE.read_text())["groups"])


def rules_exprs() -> dict[str, str]:
    """rule name (record or alert) -> expr."""
    out = {}
    for group in rule_groups():
        for rule in group["rules"]:
            out[rule.get("record") or rule["alert"]] = rule["expr"]
    return out


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return panels


def dashboard_exprs() -> dict[str, str]:
    """'panel title [refId]' -> expr, templating queries included (as their metric)."""
    out = {}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            out[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    return out


def dashboard_variable_metrics() -> dict[str, str]:
    """Templating variable -> the metric its label_values() query reads."""
    out = {}
    for var in dashboard()["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.fullmatch(query.strip())
        assert match, f"variable {var['name']}: unsupported query {query!r}"
        assert match.group("metric"), f"variable {var['name']}: label_values without a metric"
        out[var["name"]] = match.group("metric")
    return out


def adapter_rules() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"])


def adapter_series(hpa_metric: str) -> set[str]:
    """Series behind an HPA custom metric, through the prometheus-adapter rule exposing it."""
    found = set()
    for rule in adapter_rules():
        series = metric_names(rule["seriesQuery"])
        name = rule.get("name", {})
        exposed = name.get("as") or next(iter(series))
        if exposed == hpa_metric:
            found |= series
    return found


def hpa_metrics(docs: list[dict[str, Any]]) -> set[str]:
    names = set()
    for doc in docs:
        if doc["kind"] != "HorizontalPodAutoscaler":
            continue
        for metric in doc["spec"].get("metrics", []):
            if metric["type"] in ("Pods", "Object", "External"):
                names.add(metric[metric["type"].lower()]["metric"]["name"])
    return names


def used_series(include_hpa: bool = True) -> dict[str, set[str]]:
    """Series name -> where it is used (dashboard, rules, HPA via the adapter)."""
    used: dict[str, set[str]] = {}
    recorded = recorded_names()
    for where, expr in dashboard_exprs().items():
        for name in metric_names(expr) - recorded:
            used.setdefault(name, set()).add(f"dashboard: {where}")
    for var, name in dashboard_variable_metrics().items():
        used.setdefault(name, set()).add(f"dashboard variable ${var}")
    for where, expr in rules_exprs().items():
        for name in metric_names(expr) - recorded:
            used.setdefault(name, set()).add(f"rule {where}")
    if include_hpa:
        for path, metric in hpa_source_metrics():
            series = adapter_series(metric)
            assert series, f"HPA metric {metric} ({path}) has no prometheus-adapter rule"
            for name in series:
                used.setdefault(name, set()).add(f"HPA {path}: {metric}")
    return used


def hpa_source_metrics() -> list[tuple[str, str]]:
    """(file, metric) of every HPA (or HPA patch) under deploy/k8s, without rendering."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "HorizontalPodAutoscaler":
                for metric in hpa_metrics([doc]):
                    found.append((str(path.relative_to(DEPLOY)), metric))
    assert found, "no HorizontalPodAutoscaler under deploy/k8s"
    return found


def declared_series() -> set[str]:
    """Every sample name service/metrics.py can expose (histogram and counter suffixes)."""
    from service.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif family.type == "counter":
            names |= {f"{base}_total"}
        else:
            names.add(base)
    return names
