"""TLS and bearer-token auth on a real server: calls need the token, health and reflection
stay open, plaintext clients cannot talk to a TLS server, the certificate's expiry is
exported and warned about; with mutual TLS, only clients whose certificate the client CA
issued get through the handshake, and the plaintext health port still answers probes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from tests._tls import certificate_authority, client_certificate, self_signed
from tests.conftest import ServerHandle, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "test-token-0123456789"


HEALTH_PORT = free_port()
# Within the 14 days the server warns about at start.
NOT_AFTER = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)


@pytest.fixture(scope="module")
def secure_server(
    start_server: Callable[..., ServerHandle], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServerHandle, Path]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), not_after=NOT_AFTER)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    server = start_server(
        "--tls-cert", str(cert), "--tls-key", str(key), "--health-port", str(HEALTH_PORT),
        credentials=credentials,
        env={"SERVE_AUTH_TOKEN": TOKEN},  # the token from the environment, not argv
    )  # fmt: skip
    return server, cert


def test_the_health_port_answers_probes_in_plaintext_and_nothing_else(
    secure_server: tuple[ServerHandle, Path],
) -> None:
    """What the kubelet's gRPC probe (no TLS, no token) reaches when the API serves TLS."""
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    server, _ = secure_server
    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.v1.Translator", "inference.v1.Models"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=["x"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        # reflection lists what is there, so `grpcurl -plaintext` needs no proto file
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert services == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert f'"health_port": {HEALTH_PORT}' in server.log()


def test_token_required(secure_server: tuple[ServerHandle, Path]) -> None:
    server, cert = secure_server
    for token in (None, "wrong-token"):
        with Client(server.address, token=token, ca=cert, timeout=10) as client:
            for call in (lambda: client.translate("Amen."), client.list_models, client.reload):
                with pytest.raises(grpc.RpcError) as info:
                    call()  # type: ignore[operator]
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                assert "token" in info.value.details()  # type: ignore[attr-defined]
    with Client(server.address, token=TOKEN, ca=cert, timeout=30) as client:
        assert client.translate("Amen.").translations[0].hypotheses
        assert {m.name for m in client.list_models()} == {"en-es", "en-lm"}
        chunks = list(client.generate("The Lord said", stream=True, max_new_tokens=4))
        assert chunks[-1].finished
        assert list(client.reload().loaded) == []
    assert "unencrypted" not in server.log()  # the token warning is for servers without TLS


def test_health_and_reflection_stay_open(secure_server: tuple[ServerHandle, Path]) -> None:
    server, cert = secure_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(server.address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.v1.Translator"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert "inference.v1.Translator" in services


def test_plaintext_and_untrusted_clients_fail(secure_server: tuple[ServerHandle, Path]) -> None:
    server, _ = secure_server
    with Client(server.address, token=TOKEN, timeout=5) as plaintext:
        with pytest.raises(grpc.RpcError) as info:
            plaintext.translate("Amen.")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with Client(server.address, token=TOKEN, tls=True, timeout=5) as untrusted:
        with pytest.raises(grpc.RpcError) as info:
            untrusted.translate("Amen.")  # system roots do not trust a self-signed cert
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_load_generator_reaches_a_secured_server(
    secure_server: tuple[ServerHandle, Path], tmp_path: Path
) -> None:
    """`python -m loadtest run --ca --token` against TLS with auth: every request succeeds;
    without the token none does."""
    from tests.conftest import ROOT

    server, cert = secure_server

    def load(*extra: str) -> subprocess.CompletedProcess[str]:
        args = ["--target", server.address, "--ca", str(cert), "--rate", "5", "--duration", "1"]
        args += ["--mix", "translate=1", "--max-new-tokens", "4", "--no-progress"]
        return subprocess.run(
            [sys.executable, "-m", "loadtest", "run", *args, *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    ok = load("--token", TOKEN, "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "ok" / "result.json").read_text())["summary"]
    translate = summary["by_kind"]["translate"]
    assert translate["errors"] == {} and translate["ok"] == translate["requests"] >= 3, summary
    refused = load("--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "no request succeeded" in refused.stderr


def test_the_cli_checks_the_certificate_name_it_is_given(
    secure_server: tuple[ServerHandle, Path],
) -> None:
    """--server-name: the name the certificate must carry when the dialled address differs
    (kubectl port-forward); a name the certificate lacks is refused by the handshake."""
    from tests.conftest import ROOT

    server, cert = secure_server

    def models(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.client", "models", "--target", server.address,
             "--ca", str(cert), "--token", TOKEN, "--server-name", name],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    good = models("localhost")
    assert good.returncode == 0 and "en-es" in good.stdout, good.stderr
    wrong = models("not-this-server.example")
    assert wrong.returncode == 2 and "UNAVAILABLE" in wrong.stderr, wrong.stderr
    assert "could not be verified" in wrong.stderr and "--server-name" in wrong.stderr


def test_the_cli_says_why_the_handshake_failed_and_nothing_else(
    secure_server: tuple[ServerHandle, Path], tmp_path: Path
) -> None:
    """A --ca that did not issue the server's certificate: stderr holds our error and its
    hint alone, not grpc's own log line about the handshake before them (the CLI sets
    GRPC_VERBOSITY=ERROR); a GRPC_VERBOSITY the user set stands."""
    from tests.conftest import ROOT

    server, _ = secure_server
    other_ca, _ = self_signed(tmp_path)

    def models(**env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        return subprocess.run(
            [sys.executable, "-m", "service.client", "models", "--target", server.address,
             "--ca", str(other_ca), "--token", TOKEN, "--timeout", "10"],
            capture_output=True, text=True, cwd=ROOT, timeout=120, env=environ | env,
        )  # fmt: skip

    refused = models()
    assert refused.returncode == 2 and refused.stdout == ""
    error, hint = refused.stderr.splitlines()  # nothing else
    assert error.startswith("error: UNAVAILABLE: ") and "CERTIFICATE_VERIFY_FAILED" in error
    assert hint == (
        "(the server's certificate could not be verified: pass the CA that issued it with "
        "--ca, and --server-name if the certificate names another host than --target)"
    )
    verbose = models(GRPC_VERBOSITY="INFO")
    assert verbose.returncode == 2 and "ssl_transport_security" in verbose.stderr
    assert verbose.stderr.splitlines()[-2:] == [error, hint]


def _scrape(server: ServerHandle) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def test_the_certificate_expiry_is_exported_and_warned_about_at_start(
    secure_server: tuple[ServerHandle, Path],
) -> None:
    """inference_tls_certificate_expiry_timestamp_seconds is the served certificate's
    notAfter; one that runs out within 14 days is a WARNING at start, and the server serves."""
    server, cert = secure_server
    expiry = [
        sample
        for family in text_string_to_metric_families(_scrape(server))
        for sample in family.samples
        if sample.name == "inference_tls_certificate_expiry_timestamp_seconds"
    ]
    assert [(s.labels, s.value) for s in expiry] == [({}, NOT_AFTER.timestamp())]
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    [warning] = [e for e in logged if e["logger"] == "service.tls"]
    assert warning["level"] == "WARNING"
    assert f"{cert} expires on {NOT_AFTER:%Y-%m-%d %H:%M:%S} UTC, in " in warning["message"]
    assert "renew it and restart" in warning["message"]
    assert warning["not_after"] == NOT_AFTER.isoformat()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_metrics_of_a_tls_server(
    secure_server: tuple[ServerHandle, Path],
) -> None:
    server, _ = secure_server
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=_scrape(server), capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_cli_trusts_the_system_roots_with_tls_and_names_the_token(
    secure_server: tuple[ServerHandle, Path],
) -> None:
    """--tls without --ca: TLS with the roots grpc trusts by default (here made our
    certificate); a call without the token is told which option carries it."""
    from tests.conftest import ROOT

    server, cert = secure_server

    def models(*extra: str, roots: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "300"}  # rich's error boxes: one line per message
        if roots is not None:
            env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(roots)
        return subprocess.run(
            [sys.executable, "-m", "service.client", "models", "--target", server.address,
             "--timeout", "10", *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=120, env=env,
        )  # fmt: skip

    named = ("--server-name", "localhost")
    trusted = models("--tls", *named, "--token", TOKEN, roots=cert)
    assert trusted.returncode == 0 and "en-es" in trusted.stdout, trusted.stderr
    plaintext = models("--token", TOKEN, roots=cert)
    assert plaintext.returncode == 2 and "pass --ca" in plaintext.stderr, plaintext.stderr
    # A certificate's name without TLS would be ignored, the call sent in plaintext.
    unused = models(*named, "--token", TOKEN, roots=cert)
    assert unused.returncode == 2 and "needs --ca or --tls" in unused.stderr, unused.stderr
    no_token = models("--tls", *named, roots=cert)
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr
    assert "--token or SERVE_AUTH_TOKEN" in no_token.stderr, no_token.stderr


# --- mutual TLS ------------------------------------------------------------------------

MUTUAL_HEALTH_PORT = free_port()


@dataclass(frozen=True)
class Mutual:
    """A server requiring client certificates, and the files its clients need."""

    server: ServerHandle
    server_cert: Path  # what clients trust (--ca)
    client: tuple[Path, Path]  # issued by the server's client CA
    stranger: tuple[Path, Path]  # issued by another CA


@pytest.fixture(scope="module")
def mutual_server(
    start_server: Callable[..., ServerHandle], tmp_path_factory: pytest.TempPathFactory
) -> Mutual:
    folder = tmp_path_factory.mktemp("mtls")
    (folder / "server").mkdir()
    (folder / "other").mkdir()
    cert, key = self_signed(folder / "server")
    ca = certificate_authority(folder)
    client = client_certificate(folder, ca)
    stranger = client_certificate(folder / "other", certificate_authority(folder / "other"))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cert.read_bytes(),
        private_key=client[1].read_bytes(),
        certificate_chain=client[0].read_bytes(),
    )
    server = start_server(
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca[0]),
        "--health-port", str(MUTUAL_HEALTH_PORT),
        credentials=credentials,
        env={"SERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    return Mutual(server, cert, client, stranger)


def test_mutual_tls_serves_a_client_whose_certificate_the_ca_issued(
    mutual_server: Mutual,
) -> None:
    """The certificate gets a client through the handshake; the bearer token is still
    checked on its own (both on: a call needs both); the start log says mutual TLS is on."""
    server, cert = mutual_server.server, mutual_server.server_cert
    client_cert, client_key = mutual_server.client
    with Client(
        server.address, token=TOKEN, ca=cert, cert=client_cert, key=client_key, timeout=30
    ) as client:
        assert client.translate("Amen.").translations[0].hypotheses
        assert {m.name for m in client.list_models()} == {"en-es", "en-lm"}
        assert list(client.generate("The Lord said", stream=True, max_new_tokens=4))[-1].finished
    with Client(server.address, ca=cert, cert=client_cert, key=client_key, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.list_models()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    [listening] = [e for e in logged if e["message"] == "listening"]
    assert (listening["tls"], listening["mtls"], listening["auth"]) == (True, True, True)


def test_mutual_tls_refuses_clients_without_a_certificate_the_ca_issued(
    mutual_server: Mutual,
) -> None:
    """No certificate, or one from another CA: the handshake fails (UNAVAILABLE), for
    health on the gRPC port too (the handshake is the port's); the plaintext health port,
    the probes', asks for none."""
    server, cert, stranger = mutual_server.server, mutual_server.server_cert, mutual_server.stranger
    for client_cert, client_key in ((None, None), stranger):
        with Client(
            server.address, token=TOKEN, ca=cert, cert=client_cert, key=client_key, timeout=10
        ) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.translate("Amen.")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, client_cert  # type: ignore[attr-defined]
    anonymous = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(server.address, anonymous) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{MUTUAL_HEALTH_PORT}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_cli_presents_a_client_certificate_and_says_when_one_is_wanted(
    mutual_server: Mutual,
) -> None:
    """--cert/--key beside --ca reach the server; without them, or with a certificate
    another CA issued, the error's hint names --cert."""
    from tests.conftest import ROOT

    server, cert = mutual_server.server, mutual_server.server_cert

    def models(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.client", "models", "--target", server.address,
             "--ca", str(cert), "--token", TOKEN, "--timeout", "10", *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    client_cert, client_key = (str(p) for p in mutual_server.client)
    served = models("--cert", client_cert, "--key", client_key)
    assert served.returncode == 0 and "en-es" in served.stdout, served.stderr
    missing = models()
    assert missing.returncode == 2 and "UNAVAILABLE" in missing.stderr, missing.stderr
    assert "pass --cert and --key, issued by the CA it trusts" in missing.stderr, missing.stderr
    stranger = models(
        "--cert", str(mutual_server.stranger[0]), "--key", str(mutual_server.stranger[1])
    )
    assert stranger.returncode == 2 and "UNAVAILABLE" in stranger.stderr, stranger.stderr
    assert "it refused --cert" in stranger.stderr, stranger.stderr


def test_the_load_generator_presents_a_client_certificate(
    mutual_server: Mutual, tmp_path: Path
) -> None:
    """`python -m loadtest run` reaches a mutual-TLS server with --cert/--key beside --ca;
    a certificate without its key is refused before the run."""
    from typer.testing import CliRunner

    from loadtest.__main__ import app

    server, cert = mutual_server.server, mutual_server.server_cert
    client_cert, client_key = (str(p) for p in mutual_server.client)
    inputs = tmp_path / "verses.txt"
    inputs.write_text("Amen.\nJesus wept.\n")
    args = [
        "run", "--target", server.address, "--ca", str(cert), "--token", TOKEN,
        "--inputs", str(inputs), "--mix", "translate=1", "--rate", "10", "--arrivals",
        "constant", "--duration", "0.5", "--max-new-tokens", "4", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, [*args, "--cert", client_cert, "--key", client_key, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())["summary"]
    assert summary["ok"] == summary["requests"] >= 4, summary
    result = CliRunner().invoke(app, [*args, "--cert", client_cert, "--out", str(out)])
    assert result.exit_code == 2 and "cert and key go together" in result.output
    # Without a client certificate the handshake fails: the error says what the health
    # checks met, and what to pass.
    result = CliRunner().invoke(app, [*args, "--wait-ready", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "(the last check: UNAVAILABLE: " in result.output
    assert "pass --cert and --key" in result.output
