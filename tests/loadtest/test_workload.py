"""Target safety (loopback only), request mix, inputs, and the CLI's refusals."""

from __future__ import annotations

import collections
import csv
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loadtest.__main__ import app
from loadtest.workload import (
    TargetRefused,
    Workload,
    check_target,
    is_loopback,
    load_texts,
    parse_mix,
    prompt_of,
    resolve_inputs,
    split_target,
)


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "127.3.2.1:1",
        "localhost:50051",
        "[::1]:50051",
        "ipv4:127.0.0.1:9",
        "dns:///localhost:50051",
        "unix:/tmp/inference.sock",
    ],
)
def test_loopback_targets_allowed(target: str) -> None:
    assert is_loopback(target)
    assert check_target(target, allow_remote=False) == target


@pytest.mark.parametrize(
    "target", ["10.0.0.5:50051", "0.0.0.0:50051", "example.com:443", "[2001:db8::1]:1"]
)
def test_remote_targets_refused_unless_allowed(target: str) -> None:
    assert not is_loopback(target)
    with pytest.raises(TargetRefused, match="--allow-remote"):
        check_target(target, allow_remote=False)
    assert check_target(target, allow_remote=True) == target


def test_split_target() -> None:
    assert split_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_target("[::1]:7") == ("::1", 7)
    assert split_target("dns:///localhost:8") == ("localhost", 8)


def test_cli_refuses_remote_target_before_connecting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--target", "10.1.2.3:50051", "--duration", "1", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "allow-remote" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args", [["--duration", "0"], ["--duration", "1e9"], ["--max-requests", "0"]]
)
def test_cli_refuses_unbounded_runs(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code != 0


def test_parse_mix() -> None:
    assert parse_mix("translate=0.6,stream=0.2,generate=0.2") == pytest.approx(
        {"translate": 0.6, "stream": 0.2, "generate": 0.2}
    )
    assert parse_mix("translate=3,generate=1") == {"translate": 0.75, "generate": 0.25}
    assert parse_mix("stream") == {"stream": 1.0}
    # Each bad spec is refused for its own reason: a negative weight next to a positive
    # one would otherwise still sum to > 0 and slip through as a weight of 0.
    for bad, message in (
        ("chat=1", "unknown request kind"),
        ("translate=-1,stream=2", "must be >= 0"),
        ("translate=-1", "must be >= 0"),
        ("translate=0", "must sum to > 0"),
        ("translate=x", "must be a number"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_mix(bad)


def test_workload_follows_mix_and_is_seeded() -> None:
    texts = [f"word{i} " * (i + 3) for i in range(20)]
    mix = {"translate": 0.6, "stream": 0.2, "generate": 0.2}
    a = Workload(texts, mix, seed=3).take(5000)
    assert a == Workload(texts, mix, seed=3).take(5000)
    counts = collections.Counter(item.kind for item in a)
    assert counts["translate"] / 5000 == pytest.approx(0.6, abs=0.03)
    assert counts["generate"] / 5000 == pytest.approx(0.2, abs=0.03)
    for item in a:
        if item.kind == "generate":
            assert len(item.text.split()) >= 3
        else:
            assert item.text in texts


def test_prompt_is_first_half() -> None:
    assert prompt_of("a b c d e f g h") == "a b c d"
    assert prompt_of("a b") == "a b"


def test_load_pairs_tsv_and_plain_lines(tmp_path: Path) -> None:
    tsv = tmp_path / "pairs.test.tsv"
    # Written like transformer.data.write_pairs: csv dialect, quotes doubled.
    with tsv.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("ref", "source_module", "en", "es"))
        writer.writerow(("Gen.1.1", "kjv", 'In the "beginning"', "En el"))
        writer.writerow(("Gen.1.2", "kjv", "And the earth", "Y la tierra"))
    assert load_texts(tsv) == ['In the "beginning"', "And the earth"]
    plain = tmp_path / "lines.txt"
    plain.write_text("one\n\ntwo\n")
    assert load_texts(plain) == ["one", "two"]
    assert resolve_inputs(tsv) == tsv
    with pytest.raises(FileNotFoundError, match="make data"):
        resolve_inputs(tmp_path / "missing.tsv")


def test_wait_ready_waits_for_serving_health_not_just_a_listener() -> None:
    """A server that listens while its models load (NOT_SERVING) must not be loaded yet."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from loadtest.workload import GrpcCaller

    async def main() -> float:
        server = grpc.aio.server()
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        caller = GrpcCaller(f"127.0.0.1:{port}")
        try:
            await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(TimeoutError, match=r"^health NOT_SERVING$"):  # what it met
                await caller.wait_ready(0.6)

            async def warm_up() -> None:
                await asyncio.sleep(0.4)
                await health.set("", health_pb2.HealthCheckResponse.SERVING)

            started = asyncio.get_running_loop().time()
            task = asyncio.create_task(warm_up())
            await caller.wait_ready(5)
            await task
            return asyncio.get_running_loop().time() - started
        finally:
            await caller.close()
            await server.stop(None)

    assert asyncio.run(main()) >= 0.4


@pytest.mark.parametrize(
    ("last", "code"),
    [("eos", "OK"), ("cancelled", "STREAM_CANCELLED"), (None, "STREAM_UNFINISHED")],
)
def test_a_stream_the_server_cut_short_is_not_a_success(
    tmp_path: Path, last: str | None, code: str
) -> None:
    """A draining server past its grace ends the streams in flight with status OK, their
    tokens so far and finish reason CANCELLED: counted OK, each put a short latency and a
    partial answer into the run's figures and exit code."""
    import asyncio

    import grpc

    from loadtest.workload import GrpcCaller, WorkItem
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    reasons = {"eos": pb.FINISH_REASON_EOS, "cancelled": pb.FINISH_REASON_CANCELLED}

    class Generator(pb_grpc.GeneratorServicer):  # type: ignore[misc]
        async def Generate(self, request: Any, context: Any) -> Any:
            yield pb.TokenChunk(text=" And", token_ids=[7])
            yield pb.TokenChunk(text=" the", token_ids=[8])
            if last is not None:
                yield pb.TokenChunk(
                    finished=True,
                    finish_reason=reasons[last],
                    usage=pb.Usage(input_tokens=3, output_tokens=2),
                )

    async def main() -> Any:
        server = grpc.aio.server()
        pb_grpc.add_GeneratorServicer_to_server(Generator(), server)
        target = f"unix:{tmp_path / 'generator.sock'}"
        server.add_insecure_port(target)
        await server.start()
        caller = GrpcCaller(target)
        try:
            return await caller(WorkItem("generate", "The Lord said"))
        finally:
            await caller.close()
            await server.stop(None)

    outcome = asyncio.run(main())
    assert (outcome.code, outcome.output_tokens, len(outcome.chunk_times)) == (code, 2, 2)
    assert (outcome.detail == "") == (code == "OK")
    if code == "STREAM_CANCELLED":
        assert "CANCELLED" in outcome.detail and "2 tokens" in outcome.detail
