"""The monitoring objects against a running server (the session `server` fixture of
tests/conftest.py): every series the dashboard, the alert rules and the autoscaler use appears
in a live /metrics scrape, and Debian's Prometheus scrapes the server and answers queries
(every dashboard and rule expression included) through its HTTP API.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.deploy.helpers import (
    GPU_ONLY,
    PROMETHEUS_SERIES,
    TLS_ONLY,
    dashboard_exprs,
    grafana_to_promql,
    rules_exprs,
    tool,
    used_series,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRAPE_INTERVAL_S = 1
PROMETHEUS_TIMEOUT_S = 60.0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def sample_names(exposition: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


@pytest.fixture(scope="module")
def traffic(server: Any) -> Any:
    """The shared server after every kind of call, so that histograms have observations."""
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        translator = pb_grpc.TranslatorStub(channel)
        generator = pb_grpc.GeneratorStub(channel)
        options = pb.DecodingOptions(max_new_tokens=4)
        translator.Translate(
            pb.TranslateRequest(texts=["In the beginning", "And God said"], options=options),
            timeout=60,
        )
        list(translator.TranslateStream(
            pb.TranslateStreamRequest(text="Let there be light", options=options), timeout=60
        ))  # fmt: skip
        list(generator.Generate(pb.GenerateRequest(prompt="The Lord", options=options), timeout=60))
        generator.GenerateUnary(
            pb.GenerateRequest(prompt="And it was", options=options), timeout=60
        )
        # One refused call: a non-OK status in inference_requests_total.
        with pytest.raises(grpc.RpcError):
            translator.Translate(
                pb.TranslateRequest(model="no-such-model", texts=["x"]), timeout=10
            )
        pb_grpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return server


def test_every_used_series_is_in_a_live_scrape(traffic: Any) -> None:
    scraped = sample_names(scrape(traffic.metrics_url))
    used = used_series()
    missing = {
        name: sorted(where) for name, where in used.items()
        if name not in scraped and name not in PROMETHEUS_SERIES | GPU_ONLY | TLS_ONLY
    }  # fmt: skip
    assert not missing, f"used but not in the live scrape of {traffic.metrics_url}: {missing}"
    # The label names the queries aggregate by exist too.
    body = scrape(traffic.metrics_url)
    assert 'inference_requests_total{code="OK",method="Translate",model="en-es"}' in body
    assert 'method="GenerateUnary"' in body
    assert 'code="OK"' in body and any(
        line.startswith("inference_requests_total{") and 'code="OK"' not in line
        for line in body.splitlines()
    ), "a refused call should count with its status name"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error
        return dict(json.loads(exc.read()))


@pytest.fixture(scope="module")
def prometheus(traffic: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's prometheus on a free loopback port, scraping the shared server every second."""
    binary = tool("prometheus", "apt-get install prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(traffic.metrics_url).netloc
    config = work / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {
                    "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                    "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
                },
                "scrape_configs": [
                    {
                        "job_name": "inference",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
        )
    )
    port = _free_port()
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"prometheus exited {process.returncode}: {_tail(work / 'prometheus.log')}"
                )
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready: {_tail(work / 'prometheus.log')}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.is_file() else ""


def _query_until(base: str, query: str, timeout: float = PROMETHEUS_TIMEOUT_S) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        reply = _api(base, "/api/v1/query", query=query)
        assert reply["status"] == "success", reply
        if reply["data"]["result"] or time.monotonic() > deadline:
            return list(reply["data"]["result"])
        time.sleep(0.5)


def test_prometheus_scrapes_the_service(prometheus: str, traffic: Any) -> None:
    up = _query_until(prometheus, 'up{job="inference"} == 1')
    assert up, "target never up"
    result = _query_until(
        prometheus, 'inference_requests_total{job="inference",method="Translate",code="OK"}'
    )
    assert result, "inference_requests_total never reached Prometheus"
    assert float(result[0]["value"][1]) >= 1
    ready = _query_until(prometheus, 'inference_model_ready{model="en-es"}')
    assert ready and float(ready[0]["value"][1]) == 1
    # Histograms aggregate: the dashboard's p99 over the scraped buckets is one series
    # (its value may be NaN: the traffic came before the scrapes, so the rate is 0).
    p99 = _query_until(
        prometheus,
        "histogram_quantile(0.99, sum by (le) "
        "(rate(inference_request_duration_seconds_bucket[1m])))",
        timeout=10,
    )
    assert len(p99) == 1 and p99[0]["metric"] == {}, p99  # _query_until never returns None


def test_prometheus_accepts_every_dashboard_and_rule_query(prometheus: str) -> None:
    _query_until(prometheus, 'up{job="inference"} == 1')
    queries = {f"dashboard: {k}": grafana_to_promql(v) for k, v in dashboard_exprs().items()}
    queries |= {f"rule {k}": v for k, v in rules_exprs().items()}
    errors = {}
    for where, query in queries.items():
        reply = _api(prometheus, "/api/v1/query", query=query)
        if reply.get("status") != "success":
            errors[where] = reply.get("error", reply)
    assert not errors, errors
