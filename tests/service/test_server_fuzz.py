"""Hypothesis fuzzing of requests: the real server answers every one with a deliberate
status (never INTERNAL/UNKNOWN, never a hang) and still serves afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.client import Client
from service.gen.inference.v1 import inference_pb2 as pb
from tests.conftest import ServerHandle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

uint32 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 32, 33, 2**31, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))  # fmt: skip
floats = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.5, -1.0, 1e-30, 1e30]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
# Any text a client can send (protobuf strings are UTF-8: no lone surrogates).
texts = st.one_of(
    st.sampled_from(["", " ", "Amen.", "In the beginning God created", "\x00", "é" * 10]),
    st.text(st.characters(codec="utf-8"), max_size=300),
)


@st.composite
def options(draw: st.DrawFn) -> pb.DecodingOptions:
    message = pb.DecodingOptions(
        max_new_tokens=draw(st.none() | uint32),  # None leaves an optional field unset
        beam_size=draw(st.none() | uint32),
        n_best=draw(st.none() | uint32),
        temperature=draw(floats),
        top_k=draw(uint32),
        stop=draw(st.lists(texts, max_size=10)),
        return_scores=draw(st.booleans()),
        return_alignment=draw(st.booleans()),
    )
    if draw(st.booleans()):
        message.length_penalty = draw(floats)
    if draw(st.booleans()):
        message.top_p = draw(floats)
    if draw(st.booleans()):
        message.seed = draw(st.integers(0, 2**64 - 1))
    return message


models = st.sampled_from(["", "en-es", "en-lm", "fr-de", "x" * 200, "../../etc"])
versions = st.sampled_from([0, 1, 2, 2**64 - 1])


@pytest.fixture(scope="module")
def fuzz_client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.address, timeout=30) as client:
        yield client


def _check(call: Any) -> None:
    try:
        result = call()
        if not isinstance(result, (pb.TranslateResponse, pb.GenerateResponse)):
            list(result)
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        assert code in ALLOWED, f"{code}: {error.details()}"  # type: ignore[attr-defined]


@FUZZ
@given(model=models, version=versions, inputs=st.lists(texts, max_size=10), opts=options())
def test_fuzz_translate(
    fuzz_client: Client, model: str, version: int, inputs: list[str], opts: pb.DecodingOptions
) -> None:
    request = pb.TranslateRequest(model=model, version=version, texts=inputs, options=opts)
    _check(lambda: fuzz_client.translator.Translate(request, timeout=30))


@FUZZ
@given(model=models, version=versions, text=texts, opts=options(), unary=st.booleans())
def test_fuzz_generate_and_streams(
    fuzz_client: Client, model: str, version: int, text: str, opts: pb.DecodingOptions,
    unary: bool,
) -> None:  # fmt: skip
    request = pb.GenerateRequest(model=model, version=version, prompt=text, options=opts)
    if unary:
        _check(lambda: fuzz_client.generator.GenerateUnary(request, timeout=30))
    else:
        _check(lambda: fuzz_client.generator.Generate(request, timeout=30))
    stream = pb.TranslateStreamRequest(model=model, version=version, text=text, options=opts)
    _check(lambda: fuzz_client.translator.TranslateStream(stream, timeout=30))


METHODS = [
    (f"/{service.full_name}/{method.name}", method.server_streaming)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_fuzz_raw_bytes(server: ServerHandle, method: tuple[str, bool], payload: bytes) -> None:
    """Bytes that need not be a valid message at all (bad UTF-8, truncated fields, wrong
    wire types) are answered like any bad input, never UNKNOWN from the parser."""
    path, streaming = method
    with server.channel() as channel:
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        _check(lambda: call(payload, timeout=30))


def test_server_still_serves_after_fuzzing(server: ServerHandle, fuzz_client: Client) -> None:
    """Runs after the fuzz tests in this module (file order)."""
    assert server.alive()
    with server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzz_client.translate("Amen.").translations[0].hypotheses
    assert '"level": "ERROR"' not in server.log()
