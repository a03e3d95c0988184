"""`python -m loadtest.stream_cost`: what one streamed message costs a grpc.aio server, in
CPU time, apart from any model: the figure behind joining a lagging stream's tokens into
one message (service/scheduler.py `_coalesce`).

A server process whose Generate only yields `--tokens` small TokenChunks, `--per-message`
token ids each, serves `--streams` calls at a time from a client in this process; the
server's CPU time (user + system, from /proc) over the measured calls is divided by the
messages it sent. Linux only (it reads /proc).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False)


def _serve(tokens: int, per_message: int, ports: Any) -> None:
    import grpc

    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    class Generator(pb_grpc.GeneratorServicer):
        async def Generate(
            self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[pb.TokenChunk]:
            for first in range(0, tokens, per_message):
                ids = list(range(first, min(first + per_message, tokens)))
                yield pb.TokenChunk(text=" word" * len(ids), token_ids=ids)
            yield pb.TokenChunk(finished=True)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GeneratorServicer_to_server(Generator(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(port: int, pid: int, streams: int, calls: int, repeats: int) -> list[dict]:
    import grpc

    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)

        async def one() -> int:
            return sum([1 async for _ in stub.Generate(pb.GenerateRequest(prompt="x"))])

        await asyncio.gather(*(one() for _ in range(streams)))  # connections and warm-up
        out = []
        for _ in range(repeats):
            cpu, start, messages = _cpu_seconds(pid), time.perf_counter(), 0
            for _ in range(calls):
                messages += sum(await asyncio.gather(*(one() for _ in range(streams))))
            cpu = _cpu_seconds(pid) - cpu
            out.append(
                {
                    "messages": messages,
                    "seconds": time.perf_counter() - start,
                    "server_cpu_s": cpu,
                    "cpu_us_per_message": cpu / messages * 1e6,
                }
            )
        return out


def measure(
    tokens: int, per_message: int, streams: int, calls: int, repeats: int
) -> list[dict[str, Any]]:
    """One dict per repeat: messages sent, wall seconds, server CPU seconds, µs/message."""
    context = multiprocessing.get_context("spawn")  # no grpc state carried into the child
    ports = context.Queue()
    server = context.Process(target=_serve, args=(tokens, per_message, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        assert server.pid is not None
        return asyncio.run(_measure(port, server.pid, streams, calls, repeats))
    finally:
        server.kill()
        server.join()


@app.command()
def main(
    tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens per call.")] = 32,
    per_message: Annotated[
        str, typer.Option(help="Token ids per message, a comma list (one run each).")
    ] = "1,4",
    streams: Annotated[int, typer.Option(min=1, max=1024, help="Calls at a time.")] = 64,
    calls: Annotated[int, typer.Option(min=1, help="Rounds of --streams calls measured.")] = 10,
    repeats: Annotated[int, typer.Option(min=1, help="Measurements per setting.")] = 3,
) -> None:
    """The server CPU time per streamed message, at each --per-message."""
    try:
        sizes = [int(n) for n in per_message.split(",") if n.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"--per-message must be integers: {error}") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"--per-message needs sizes >= 1, got {per_message!r}")
    from loadtest.provenance import git_commit, machine, versions

    m = machine()
    kept = {k: v for k, v in versions().items() if k in ("grpcio", "protobuf")}
    typer.echo(
        f"machine: {m.get('Model name', 'unknown CPU')}, {m.get('usable_cores')} usable cores, "
        f"load average {' '.join(m.get('loadavg_at_start', []))}; Python {m.get('python')}, "
        + ", ".join(f"{k} {v}" for k, v in kept.items())
        + f"; commit {git_commit()}"
    )
    typer.echo(f"command: {shlex.join(['python', '-m', 'loadtest.stream_cost', *sys.argv[1:]])}")
    typer.echo("| tokens/message | messages | server CPU µs/message | server CPU µs/token |")
    typer.echo("|---:|---:|---:|---:|")
    for size in sizes:
        for run in measure(tokens, size, streams, calls, repeats):
            per_token = run["server_cpu_s"] / (streams * calls * tokens) * 1e6
            typer.echo(
                f"| {size} | {run['messages']} | {run['cpu_us_per_message']:.1f} "
                f"| {per_token:.1f} |"
            )


if __name__ == "__main__":
    app()
