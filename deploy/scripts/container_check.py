"""Checks run *inside* the serving container (its network may be `none`), fed on stdin:

    podman exec -i CONTAINER python - health [TIMEOUT_S] < deploy/scripts/container_check.py
    podman exec -i CONTAINER python - translate TEXT      < deploy/scripts/container_check.py
    podman exec -i CONTAINER python - metrics NAME...     < deploy/scripts/container_check.py

Uses only what the image carries (grpcio, grpcio-health-checking, service.gen). Exit 0 = ok.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TARGET = os.environ.get("CHECK_TARGET", "127.0.0.1:50051")
METRICS_URL = os.environ.get("CHECK_METRICS_URL", "http://127.0.0.1:8000/metrics")
SERVICES = ("", "inference.v1.Translator", "inference.v1.Generator", "inference.v1.Models")


def health(timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    status: dict[str, str] = {}
    with grpc.insecure_channel(TARGET) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = {}
            try:
                for name in SERVICES:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                    status[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if all(s == "SERVING" for s in status.values()):
                    print(f"health: SERVING {sorted(status)}")
                    return 0
            except grpc.RpcError as exc:
                status = {"rpc": f"{exc.code().name}"}
            time.sleep(0.5)
    print(f"health: not SERVING after {timeout_s}s: {status}", file=sys.stderr)
    return 1


def translate(text: str) -> int:
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(TARGET) as channel:
        reply = pb_grpc.TranslatorStub(channel).Translate(
            pb.TranslateRequest(texts=[text], options=pb.DecodingOptions(max_new_tokens=16)),
            timeout=60,
        )
    hypothesis = reply.translations[0].hypotheses[0]
    print(
        f"translate: {reply.model}:{reply.version} {text!r} -> {hypothesis.text!r} "
        f"({reply.usage.input_tokens} in, {reply.usage.output_tokens} out)"
    )
    return 0 if reply.model and reply.usage.output_tokens > 0 else 1


def metrics(names: list[str]) -> int:
    with urllib.request.urlopen(METRICS_URL, timeout=10) as response:
        body = response.read().decode()
    sample_names = {
        line.split("{")[0].split(" ")[0]
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    missing = [n for n in names if n not in sample_names]
    if missing:
        print(f"metrics: missing {missing}", file=sys.stderr)
        return 1
    print(f"metrics: {len(sample_names)} series names, {names} present")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "health":
        return health(float(args[0]) if args else 120.0)
    if command == "translate":
        return translate(" ".join(args) or "In the beginning God created the heaven and the earth.")
    if command == "metrics":
        return metrics(args)
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
