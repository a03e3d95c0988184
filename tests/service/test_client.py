"""The client library and its CLI (`python -m service.client`) against the real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import typing
from pathlib import Path

import grpc
import pytest
import typer

from service.client import (
    MAX_TIMEOUT_S,
    Client,
    ClientCertificateError,
    Failure,
    _fail,
    _print_stream,
    decoding_options,
    failure,
    plot_alignment,
)
from service.domain import InvalidArgument
from service.errors import rich_status, status_of
from service.gen.inference.v1 import inference_pb2 as pb
from tests.conftest import ROOT, ServerHandle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(server: ServerHandle, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.client", *args, "--target", server.address],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},  # rich's error boxes: one line per message
    )


def test_decoding_options_leave_optionals_unset() -> None:
    options = decoding_options()
    assert not any(
        options.HasField(name) for name in ("max_new_tokens", "beam_size", "n_best", "top_p")
    )
    options = decoding_options(beam_size=4, n_best=2)
    assert options.beam_size == 4 and options.n_best == 2
    assert not options.HasField("top_p") and not options.HasField("seed")
    assert decoding_options(beam_size=0).HasField("beam_size")  # sent, so the server refuses
    options = decoding_options(top_p=0.9, seed=0, length_penalty=0.0)
    assert options.HasField("top_p") and options.HasField("seed")
    assert options.HasField("length_penalty") and options.length_penalty == 0.0
    for name, value in (("max_new_tokens", -1), ("top_k", -3), ("seed", 2**64)):
        out_of_range: dict[str, typing.Any] = {name: value}
        with pytest.raises(ValueError, match=rf"{name}: must be in \[0, \d+\], got {value}"):
            decoding_options(**out_of_range)


def test_decoding_options_take_one_stop_string_and_refuse_what_float32_loses() -> None:
    assert list(decoding_options(stop="you").stop) == ["you"]
    assert list(decoding_options(stop=["a", "bc"]).stop) == ["a", "bc"]
    assert list(decoding_options(stop=None).stop) == []  # unset, as every other option
    for name, value in (("temperature", 1e39), ("top_p", 1e-50), ("length_penalty", -1e40)):
        too_wide: dict[str, typing.Any] = {name: value}
        with pytest.raises(ValueError, match=rf"{name}: .* 32-bit float"):
            decoding_options(**too_wide)
    # what the server itself refuses, with its limit, still goes out as given
    assert decoding_options(temperature=float("nan")).temperature != 0.0
    assert decoding_options(top_p=1e-30).top_p > 0.0 and decoding_options(top_p=0.0).top_p == 0


class _Failed(grpc.RpcError):
    """A failed call as grpc raises it: a status, its details and the server's request id
    in the trailer (none when no server answered)."""

    def __init__(
        self,
        status: grpc.StatusCode,
        details: str,
        request_id: str = "",
        rich: bytes | None = None,
    ) -> None:
        self._status, self._details, self._id, self._rich = status, details, request_id, rich

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        id_ = (("x-request-id", self._id),) if self._id else ()
        return id_ + ((("grpc-status-details-bin", self._rich),) if self._rich is not None else ())


def test_failure_reads_the_servers_details_and_trusts_no_other() -> None:
    """The reason, facts and bad fields come back; a status that disagrees with the call's
    code or message, an unreadable one, none at all or an error that is no call's: None."""
    error = InvalidArgument("options.top_p", "must be in (0, 1], got 2")
    error.facts = {"model": "en-es"}
    code, message, reason = status_of(error)
    rich = rich_status(code, message, reason, error).SerializeToString()
    assert failure(_Failed(code, message, rich=rich)) == Failure(
        "INVALID_ARGUMENT", {"model": "en-es"}, {"options.top_p": "must be in (0, 1], got 2"}
    )
    assert failure(_Failed(grpc.StatusCode.INTERNAL, message, rich=rich)) is None
    assert failure(_Failed(code, "another message", rich=rich)) is None
    assert failure(_Failed(code, message, rich=b"\xff\xff")) is None
    assert failure(_Failed(code, message, request_id="0123abcd")) is None
    assert failure(grpc.RpcError()) is None


def test_the_token_is_sent_as_a_header_carries_it() -> None:
    """As the server keeps it: a secret file's newline dropped; a space refused (grpc
    itself failed such a call with INTERNAL "Invalid metadata")."""
    with Client("127.0.0.1:1", token=" s3cret\n") as client:
        assert ("authorization", "Bearer s3cret") in client._metadata()
    with Client("127.0.0.1:1", token=" \n") as client:  # blank: no token at all
        assert all(key != "authorization" for key, _ in client._metadata())
    with pytest.raises(ValueError, match="has characters a gRPC header cannot carry"):
        Client("127.0.0.1:1", token="s3 cret")


def test_cli_error_names_the_request_id_the_server_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """INTERNAL says "the server log has the details under this request id": the CLI
    prints the id from the call's trailer."""

    details = "internal error; the server log has the details under this request id"
    with pytest.raises(typer.Exit):
        _fail(_Failed(grpc.StatusCode.INTERNAL, details, "0123abcd"), tls=False)
    assert "(request id: 0123abcd)" in capsys.readouterr().err


_UNVERIFIED = "(the server's certificate could not be verified: "


@pytest.mark.parametrize(
    ("reason", "hint"),
    [
        ("Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
         "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate: OK",
         _UNVERIFIED + "pass the CA that issued it with --ca, and --server-name if the "
         "certificate names another host than --target)"),
        ("Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
         "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
         _UNVERIFIED + "it is outside its validity period, or this machine's clock is off; "
         "the server needs a renewed certificate, and a restart to read it)"),
        ("Custom verification check failed with error: UNAUTHENTICATED: Hostname "
         "Verification Check failed.",
         _UNVERIFIED + "it does not carry the host name of --target; pass a name it carries "
         "with --server-name)"),
        ("Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
         "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification "
         "context: OK",  # a plaintext server
         "(does the server at --target serve TLS? if not, drop --ca, --tls, --cert and --key)"),
        ("ipv4:127.0.0.1:50051: Socket closed",  # a server requiring client certificates
         "(the server closed the connection after the TLS handshake: if it requires client "
         "certificates (mutual TLS), pass --cert and --key, issued by the CA it trusts (its "
         "SERVE_TLS_CLIENT_CA))"),
        # closed before the handshake, as past the server's connection limit
        ("ipv4:127.0.0.1:50051: Handshake read failed (Socket closed)", None),
        ("Failed to connect to remote host: Connection refused", None),
    ],
)  # fmt: skip
def test_cli_says_why_a_tls_handshake_failed(
    reason: str, hint: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed handshake is UNAVAILABLE, as a server that is down: the hint says what to
    change (grpc's details, as grpcio 1.85 words them, say why)."""

    details = f"connections to all backends failing; last error: UNKNOWN: {reason}"
    with pytest.raises(typer.Exit):
        _fail(_Failed(grpc.StatusCode.UNAVAILABLE, details), tls=True)
    assert capsys.readouterr().err.splitlines()[1:] == ([hint] if hint else [])


@pytest.mark.parametrize("tls", [False, True])
def test_cli_does_not_ask_whether_a_server_that_answered_is_up(
    tls: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNAVAILABLE with the server's request id (models loading, a drain) came from a
    server that is up: the hint says to retry, not to check --target or TLS."""

    refused = _Failed(grpc.StatusCode.UNAVAILABLE, "models are loading; retry shortly", "abc123")
    with pytest.raises(typer.Exit):
        _fail(refused, tls=tls)
    assert capsys.readouterr().err.splitlines()[1:] == [
        "(request id: abc123)",
        "(the server refused the call for now: retry, or pass --retries)",
    ]


def test_cli_does_not_ask_for_retries_a_refusal_outlasted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--retries 4` against a server still loading: five refusals, then the hint to
    "pass --retries", which the user had."""
    refused = _Failed(grpc.StatusCode.UNAVAILABLE, "models are loading; retry shortly", "abc123")
    with pytest.raises(typer.Exit):
        _fail(refused, False, False, 4)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "(the server refused the call for now, through --retries 4: retry later)"
    )


@pytest.mark.parametrize(
    ("token", "details", "hint"),
    [
        (False, "missing `authorization: Bearer <token>` metadata",
         "(the server wants a token: --token or SERVE_AUTH_TOKEN)"),
        (True, "invalid bearer token",
         "(the server refused the token given by --token or SERVE_AUTH_TOKEN: check it "
         "against the server's SERVE_AUTH_TOKEN)"),
    ],
)  # fmt: skip
def test_cli_hint_on_a_refused_token_says_whether_one_was_sent(
    token: bool, details: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong token was answered "the server wants a token: --token or
    SERVE_AUTH_TOKEN", as if none had gone out, by a user who had passed one."""
    with pytest.raises(typer.Exit):
        _fail(_Failed(grpc.StatusCode.UNAUTHENTICATED, details, "abc123"), False, token)
    assert capsys.readouterr().err.splitlines()[-1] == hint


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_fails_a_stream_that_ended_before_its_last_chunk(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stream ended with status OK but no finished chunk (cut by the server or a proxy)
    printed its partial text and exited 0, as if answered in full."""
    cut = [pb.TokenChunk(text=" to", token_ids=[5]), pb.TokenChunk(text=" Moses", token_ids=[6])]
    for chunks in (cut, []):
        with pytest.raises(typer.Exit) as ended:
            _print_stream(iter(chunks), "The Lord said", as_json, scores=False)
        assert ended.value.exit_code == 1
        assert "the stream ended before its last chunk" in capsys.readouterr().err
    last = pb.TokenChunk(finished=True, finish_reason=pb.FINISH_REASON_EOS)
    assert _print_stream(iter([*cut, last]), "", as_json, scores=False) is last


def test_client_refuses_a_deadline_grpc_cannot_keep() -> None:
    for timeout in (float("inf"), 0.0, -1.0, float("nan"), MAX_TIMEOUT_S * 2):
        with pytest.raises(ValueError, match="timeout: must be in"):
            Client("127.0.0.1:1", timeout=timeout)
    Client("127.0.0.1:1", timeout=None).close()
    Client("127.0.0.1:1", timeout=MAX_TIMEOUT_S).close()


def test_client_refuses_retries_grpc_cannot_parse() -> None:
    """A float maxAttempts made grpc refuse the service config: every call then failed
    with INVALID_ARGUMENT, as if the server had refused it."""
    for retries in (1.0, 2.5, -1, 5):
        with pytest.raises(ValueError, match="retries: must be a whole number"):
            Client("127.0.0.1:1", retries=retries)  # type: ignore[arg-type]


def test_a_request_id_the_server_would_not_log_is_refused() -> None:
    """The server logs a call under the caller's x-request-id only when it matches
    REQUEST_ID, under a fresh one otherwise: last_request_id then named no logged call (and
    a non-ASCII id failed in grpc itself with INTERNAL "Invalid metadata")."""
    with Client("127.0.0.1:1", timeout=5) as client:
        for bad in ("order 42", "café", "a\n", "x" * 129):
            with pytest.raises(ValueError, match=r"request_id: .* fresh id instead"):
                client.translate("Amen.", request_id=bad)
        assert ("x-request-id", "job-7/a:b+c=d.e_f") in client._metadata("job-7/a:b+c=d.e_f")
        client._metadata("")  # unset: a fresh one
        assert len(client.last_request_id) == 32


def test_last_request_id_is_the_calling_threads() -> None:
    """One client shared by threads: each reads the id of its own latest call (a shared
    attribute named whichever thread had called last, so an error was looked up in the
    server log under another call's id)."""
    with Client("127.0.0.1:1", timeout=5) as client:
        sent, read = threading.Event(), threading.Event()
        seen: list[str] = []

        def other() -> None:
            sent.wait(5)
            client._metadata("thread-b")
            read.set()

        thread = threading.Thread(target=other)
        thread.start()
        client._metadata("thread-a")
        sent.set()
        read.wait(5)
        seen.append(client.last_request_id)
        thread.join(5)
        assert seen == ["thread-a"]
        assert Client("127.0.0.1:1").last_request_id == ""  # no call yet


def test_streams_are_typed_with_the_cancel_their_docstrings_offer() -> None:
    """`.cancel()` type-checks on a stream, and generate(stream=flag) with a bool matches
    an overload (an Iterator return type hid cancel; only Literal streams matched)."""
    from service.client import TokenStream

    with Client("127.0.0.1:1", timeout=5) as client:
        for stream in (client.translate_stream("Amen."), client.generate("x", stream=True)):
            assert isinstance(stream, TokenStream)
            stream.cancel()
    assert typing.get_type_hints(Client.translate_stream)["return"] is TokenStream
    overloads = typing.get_overloads(Client.generate)
    assert any(typing.get_type_hints(o)["stream"] is bool for o in overloads)


@pytest.mark.parametrize("client_cert", [False, True])
def test_cli_does_not_blame_client_certificates_for_a_connection_lost_mid_call(
    client_cert: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS server killed while it answered closes the connection past the handshake
    (grpcio 1.85's words, with no request id): that is no refused or missing --cert."""
    with pytest.raises(typer.Exit):
        _fail(
            _Failed(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),
            tls=True,
            client_cert=client_cert,
        )
    assert capsys.readouterr().err.splitlines()[1:] == []


def test_cli_says_a_refused_client_certificate_was_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With --cert given, a connection closed after the handshake is that certificate
    refused (mutual TLS), not one missing."""
    details = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:x:1: Socket closed"
    with pytest.raises(typer.Exit):
        _fail(_Failed(grpc.StatusCode.UNAVAILABLE, details), tls=True, client_cert=True)
    assert capsys.readouterr().err.splitlines()[1:] == [
        "(the server closed the connection after the TLS handshake: if it requires client "
        "certificates (mutual TLS), it refused --cert, which must be issued by the CA it "
        "trusts (its SERVE_TLS_CLIENT_CA), or chain to it through the intermediate "
        "certificates that follow it in the --cert file, and be within its validity period)"
    ]


def test_a_server_name_without_tls_is_refused() -> None:
    """It names the certificate's host: without TLS there is none, and it was ignored."""
    with pytest.raises(ValueError, match=r"server_name: .* needs TLS"):
        Client("127.0.0.1:1", server_name="localhost")
    Client("127.0.0.1:1", server_name="localhost", tls=True).close()


def test_a_client_certificate_needs_its_key_and_implies_tls(tmp_path: Path) -> None:
    """cert and key go together and must match, checked before the channel exists: a bad
    pair would fail every call as a connection the server closed. Given, they mean TLS."""
    from tests._tls import certificate_authority, client_certificate

    ca = certificate_authority(tmp_path)
    cert, key = client_certificate(tmp_path, ca)
    other_cert, other_key = client_certificate(tmp_path, ca, "other")
    for alone in ({"cert": cert, "key": None}, {"cert": None, "key": key}):
        with pytest.raises(ClientCertificateError, match="cert and key go together"):
            Client("127.0.0.1:1", cert=alone["cert"], key=alone["key"])
    for bad_cert, bad_key in ((cert, other_key), (key, cert), (ca[0], ca[0])):
        with pytest.raises(ClientCertificateError) as info:
            Client("127.0.0.1:1", cert=bad_cert, key=bad_key)
        assert str(info.value).startswith(
            f"{bad_cert} and {bad_key}: not a PEM certificate chain and its unencrypted "
            "private key ("
        )
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", cert=tmp_path / "missing.pem", key=key)
    # A server name needs TLS, which the certificate alone turns on.
    Client("127.0.0.1:1", cert=other_cert, key=other_key, server_name="localhost").close()


def test_cli_client_certificate_flags_go_together(tmp_path: Path) -> None:
    """--cert and --key: both or neither, a matching pair, refused before any call, naming
    the flags."""
    from tests._tls import certificate_authority, client_certificate

    ca = certificate_authority(tmp_path)
    cert, key = client_certificate(tmp_path, ca)
    _, other_key = client_certificate(tmp_path, ca, "other")
    for args, message in (
        (("--cert", str(cert)), "Invalid value for --cert: needs --key too: a client "
         "certificate chain and its private key go together"),
        (("--key", str(key)), "Invalid value for --key: needs --cert too"),
        (("--cert", str(cert), "--key", str(other_key)), "Invalid value for --cert / --key: "
         f"{cert} and {other_key}: not a PEM certificate chain and its unencrypted private key"),
        (("--cert", str(tmp_path / "missing.pem"), "--key", str(key)), "does not exist"),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "service.client", "models", "--target", "127.0.0.1:1", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cli_names_the_option_whose_value_is_not_utf8() -> None:
    """As for the texts: a non-UTF-8 --target or --server-name was blamed on --ca, and
    --stop, --model and a model name got the codec's message, naming no option."""
    for args, name in (
        ((b"models", b"--target", b"host\xff:1"), "--target"),
        ((b"models", b"--tls", b"--server-name", b"\xff", b"--target", b"127.0.0.1:1"),
         "--server-name"),
        ((b"translate", b"Amen.", b"--stop", b"\xff", b"--target", b"127.0.0.1:1"), "--stop"),
        ((b"generate", b"x", b"--model", b"\xff", b"--target", b"127.0.0.1:1"), "--model"),
        ((b"describe", b"\xff", b"--target", b"127.0.0.1:1"), "name"),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "service.client", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert f"{name} is not valid UTF-8" in result.stderr, (args, result.stderr)
        assert "--ca" not in result.stderr and "Traceback" not in result.stderr


def test_plot_alignment_writes_a_png(tmp_path: Path) -> None:
    out = plot_alignment(
        ["▁In", "▁the", "▁beginning", "</s>"],
        ["▁En", "▁el", "▁principio"],
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.8, 0.05, 0.05], [0.0, 0.1, 0.9, 0.0]],
        tmp_path / "a.png",
        title="test",
    )
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="return_alignment"):
        plot_alignment([], [], [], tmp_path / "b.png")
    # a `$` is a dollar sign, not mathtext (unbalanced markup raised, balanced went italic)
    dollars = plot_alignment(
        ["▁$x^{", "▁$\\frac{", "</s>"], ["▁$5"], [[0.5, 0.3, 0.2]], tmp_path / "c.png",
        title="Pay $x^{ and $\\frac{ now",
    )  # fmt: skip
    assert dollars.read_bytes().startswith(PNG_MAGIC)


def test_plot_alignment_leaves_the_programs_matplotlib_backend_alone(tmp_path: Path) -> None:
    """A library call: it switched the embedding program's backend to Agg (a Jupyter
    notebook's inline plots, or a GUI's windows, then no longer showed)."""
    script = (
        "import matplotlib; matplotlib.use('svg')\n"
        "from service.client import plot_alignment\n"
        f"plot_alignment(['a', '</s>'], ['b'], [[0.6, 0.4]], {str(tmp_path / 'a.png')!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)


def test_plotting_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving image leaves matplotlib out (the `plot` extra): the library and the CLI
    say so, the CLI before it calls the server."""
    import importlib.util

    import typer

    from service import client

    real = importlib.util.find_spec
    monkeypatch.setattr(
        client.importlib.util,  # type: ignore[attr-defined]
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else real(name, *args),
    )
    with pytest.raises(ImportError, match=r"transformer-serving\[plot\]"):
        plot_alignment(["a"], ["b"], [[1.0]], tmp_path / "a.png")
    with pytest.raises(typer.BadParameter, match="drawing needs matplotlib"):
        client._check_plot_path(tmp_path / "a.png")


@pytest.mark.e2e
def test_library_round_trip(server: ServerHandle) -> None:
    with Client(server.address) as client:
        response = client.translate(["Amen.", "Jesus wept."], beam_size=2, n_best=2)
        assert [len(t.hypotheses) for t in response.translations] == [2, 2]
        assert len(client.last_request_id) == 32
        info = client.describe_model("en-es", request_id="describe-1")
        assert info.task == "translation" and client.last_request_id == "describe-1"
        reply = client.generate("The Lord said", max_new_tokens=3, request_id="gen-1")
        assert client.last_request_id == "gen-1" and reply.hypotheses[0].output_tokens <= 3
        chunks = list(client.translate_stream("Amen.", request_id="stream-1", max_new_tokens=3))
        assert client.last_request_id == "stream-1" and chunks[-1].finished


@pytest.mark.e2e
def test_cli_translate_with_plot(server: ServerHandle, tmp_path: Path) -> None:
    png = tmp_path / "alignment.png"
    result = _cli(
        server, "translate", "In the beginning God created the heaven and the earth.",
        "--beam-size", "2", "--n-best", "2", "--scores", "--max-new-tokens", "6",
        "--plot-alignment", str(png), "--retries", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0] ") and lines[1].startswith("[1] ")
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "alignment written" in result.stderr


@pytest.mark.e2e
def test_cli_generate_stream_json_and_models(server: ServerHandle) -> None:
    streamed = _cli(server, "generate", "The Lord said", "--stream", "--max-new-tokens", "5")
    assert streamed.returncode == 0, streamed.stderr
    unary = _cli(server, "generate", "The Lord said", "--max-new-tokens", "5")
    assert streamed.stdout.strip() == unary.stdout.strip()
    as_json = _cli(server, "translate", "Amen.", "--json")
    assert json.loads(as_json.stdout)["model"] == "en-es"
    listed = json.loads(_cli(server, "models", "--json").stdout)  # one document
    assert [m["name"] for m in listed["models"]] == ["en-es", "en-lm"]
    models = _cli(server, "models")
    assert models.returncode == 0
    header, *rows = models.stdout.strip().splitlines()
    assert header.startswith("# name\tversion")
    assert [line.split("\t")[0] for line in rows] == ["en-es", "en-lm"]
    described = _cli(server, "describe", "en-lm")
    assert described.returncode == 0, described.stderr
    assert described.stdout.startswith("en-lm\tv1\tgeneration")
    assert "limits: max_input_tokens " in described.stdout
    assert "max_positions 128" in described.stdout
    assert "max_texts_per_request " in described.stdout and "max_beam_size " in described.stdout
    assert "max_batch_tokens " in described.stdout
    missing = _cli(server, "describe", "xx")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    scored = _cli(server, "generate", "The Lord said", "--max-new-tokens", "5", "--scores")
    text, score, normalized = scored.stdout.rstrip("\n").split("\t")
    assert text == unary.stdout.strip() and float(score) == float(normalized) < 0
    plain = _cli(server, "translate", "In the beginning God created the heaven and the earth.")
    as_json = _cli(
        server, "translate", "In the beginning God created the heaven and the earth.", "--json"
    )
    assert "\\u" not in as_json.stdout  # non-ASCII text printed as itself
    reply = json.loads(as_json.stdout)
    assert reply["translations"][0]["hypotheses"][0]["text"] == plain.stdout.strip()


@pytest.mark.e2e
def test_cli_reports_errors(server: ServerHandle, tmp_path: Path) -> None:
    result = _cli(server, "translate", "Amen.", "--beam-size", "99")
    assert result.returncode == 2
    assert "INVALID_ARGUMENT: options.beam_size" in result.stderr
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    folder = tmp_path / "plot.png"
    folder.mkdir()
    refused = [
        (("--max-new-tokens", "-1"), "--max-new-tokens"),
        (("--beam-size", "-1"), "--beam-size"),
        (("--seed", "-1"), "--seed"),
        (("--version", "-1"), "--version"),
        (("--ca", str(tmp_path / "missing.pem")), "--ca"),
        (("--ca", str(not_pem)), "not a PEM certificate"),
        (("--plot-alignment", str(tmp_path / "a.txt")), "must end in one of .png"),
        (("--plot-alignment", str(tmp_path / "no" / "a.png")), "is not a folder"),
        (("--plot-alignment", str(folder)), "is a folder"),
        (("--beam-size", str(2**32)), "less than or equal to 4294967295"),
        (("--top-k", str(2**32)), "less than or equal to 4294967295"),
        (("--version", str(2**64)), "less than or equal to 18446744073709551615"),
        (("--timeout", "inf"), "less than or equal to 604800"),
        (("--retries", "5"), "less than or equal to 4"),
        (("--temperature", "1e39"), "temperature: 1e+39 is outside the range of a 32-bit"),
        (("--token", "a b"), "Invalid value for --token: has characters a gRPC header"),
    ]
    for args, message in refused:
        result = _cli(server, "translate", "Amen.", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    not_utf8 = _cli(server, "translate", "Amen.", b"bad \xff bytes")  # as a shell passes it
    assert not_utf8.returncode == 2 and "texts[1] is not valid UTF-8" in not_utf8.stderr
    assert "Traceback" not in not_utf8.stderr


def test_cli_without_a_server_prints_nothing_on_stdout() -> None:
    """No server: the error on stderr and no stray line on stdout (a stream that never
    began); an empty --target is refused by name, not with grpc's resolver log."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{closed.getsockname()[1]}"
    for target, error in ((down, "error: UNAVAILABLE"), ("", "Invalid value for --target")):
        result = subprocess.run(
            [sys.executable, "-m", "service.client", "generate", "x", "--stream",
             "--target", target, "--timeout", "10"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
        assert result.returncode == 2 and result.stdout == "", result
        assert error in result.stderr and "resolver" not in result.stderr, result.stderr


@pytest.mark.e2e
def test_cli_says_when_an_answer_stopped_at_max_new_tokens(server: ServerHandle) -> None:
    """A cut answer is not passed off as whole: a note on stderr, the text alone on stdout."""
    text = "In the beginning God created the heaven and the earth."
    for args in (("translate", text), ("translate", text, "--stream")):
        cut = _cli(server, *args, "--max-new-tokens", "2")
        assert cut.returncode == 0, cut.stderr
        assert "note: text 1 stopped at max_new_tokens (2 tokens)" in cut.stderr
        assert "note" not in cut.stdout and cut.stdout.strip()
        stopped = _cli(server, *args, "--stop", cut.stdout.strip()[:1])  # finishes by STOP
        assert stopped.returncode == 0 and "note:" not in stopped.stderr, stopped.stderr
    for args in (("generate", "The Lord said"), ("generate", "The Lord said", "--stream")):
        cut = _cli(server, *args, "--max-new-tokens", "2")
        assert "note: the generation stopped at max_new_tokens (2 tokens)" in cut.stderr


@pytest.mark.e2e
def test_cli_streams_print_scores_and_json_and_a_plot(server: ServerHandle, tmp_path: Path) -> None:
    text = "In the beginning God created the heaven and the earth."
    unary = _cli(server, "translate", text, "--scores", "--max-new-tokens", "6")
    streamed = _cli(server, "translate", text, "--stream", "--scores", "--max-new-tokens", "6")
    assert streamed.returncode == 0, streamed.stderr
    words, score = streamed.stdout.rstrip("\n").rsplit("\t", 1)
    assert unary.stdout.startswith(words + "\t")  # unary: text, score, normalized score
    assert float(score) == pytest.approx(float(unary.stdout.split("\t")[1]), abs=1e-3)
    as_json = _cli(server, "translate", text, "--stream", "--json", "--max-new-tokens", "6")
    chunks = [json.loads(line) for line in as_json.stdout.splitlines()]  # JSON Lines
    assert chunks[-1]["finished"] and not any(c.get("finished") for c in chunks[:-1])
    assert "".join(c.get("text", "") for c in chunks) == words
    png = tmp_path / "streamed.png"  # the last chunk carries the alignment and its labels
    plot = _cli(server, "translate", text, "--stream", "--plot-alignment", str(png))
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes().startswith(PNG_MAGIC) and "alignment written" in plot.stderr
