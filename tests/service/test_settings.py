"""Settings: defaults, precedence (flags > env > YAML > defaults) and messages that say
what to change."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SERVE_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_spec() -> None:
    s = load_settings()
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 50051, 8000)
    assert s.model_repository == Path("models")
    assert s.provider == "auto" and s.cpu_variant == "fp32" and s.batching == "continuous"
    assert s.auth_token is None and not s.tls
    assert s.default_max_new_tokens <= s.max_new_tokens


def test_batching_modes_map_to_the_scheduler() -> None:
    from service.scheduler import MODES, SchedulerConfig

    for mode in MODES:
        assert SchedulerConfig.from_settings(load_settings(batching=mode)).mode == mode


def test_every_field_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no description"


def test_precedence_flags_over_env_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 1111\nmax_queue: 10\nmax_texts_per_request: 4\nlog_level: DEBUG\nmax-beam-size: 3\n"
    )
    monkeypatch.setenv("SERVE_MAX_QUEUE", "20")
    monkeypatch.setenv("SERVE_LOG_LEVEL", "WARNING")
    s = load_settings(config, log_level="ERROR")
    assert s.port == 1111  # YAML
    assert s.max_queue == 20  # env beats YAML
    assert s.log_level == "ERROR"  # flag beats env
    assert s.max_beam_size == 3  # dashes allowed in YAML keys
    monkeypatch.setenv("SERVE_CONFIG", str(config))
    assert load_settings().port == 1111


def test_a_misspelt_environment_variable_is_refused_with_the_name_it_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ignored, SERVE_MAX_BATCH=3 would serve the default batch size in silence."""
    monkeypatch.setenv("SERVE_MAX_BATCH", "3")
    monkeypatch.setenv("serve_zzz", "1")
    with pytest.raises(SettingsError) as error:
        load_settings()
    lines = str(error.value).splitlines()[1:]
    assert lines[0].strip().startswith("SERVE_MAX_BATCH is not a setting: did you mean")
    assert "SERVE_MAX_BATCH_SIZE?" in lines[0]
    assert lines[1].strip().startswith("serve_zzz is not a setting: `python -m service --help`")
    # Not settings, yet not mistakes: the client's address and `make serve`'s extra flags.
    monkeypatch.delenv("SERVE_MAX_BATCH")
    monkeypatch.delenv("serve_zzz")
    monkeypatch.setenv("SERVE_TARGET", "127.0.0.1:50052")
    monkeypatch.setenv("SERVE_ARGS", "--port 1")
    # What Kubernetes injects for a Service named serve-cache in the namespace.
    links = {
        "SERVE_CACHE_SERVICE_HOST": "10.0.0.7",
        "SERVE_CACHE_SERVICE_PORT": "6379",
        "SERVE_CACHE_SERVICE_PORT_REDIS": "6379",
        "SERVE_CACHE_PORT": "tcp://10.0.0.7:6379",
        "SERVE_CACHE_PORT_6379_TCP": "tcp://10.0.0.7:6379",
        "SERVE_CACHE_PORT_6379_TCP_PROTO": "tcp",
        "SERVE_CACHE_PORT_6379_TCP_PORT": "6379",
        "SERVE_CACHE_PORT_6379_TCP_ADDR": "10.0.0.7",
    }
    for key, value in links.items():
        monkeypatch.setenv(key, value)
    assert load_settings(port=1234).port == 1234
    # A Service named serve-metrics sets a real setting's variable: said so, not "not an
    # integer".
    monkeypatch.setenv("SERVE_METRICS_PORT", "tcp://10.0.0.9:9090")
    with pytest.raises(SettingsError, match=r"Service named serve-metrics .*enableServiceLinks"):
        load_settings()
    assert load_settings(metrics_port=9100).metrics_port == 9100  # a flag wins over it
    monkeypatch.delenv("SERVE_METRICS_PORT")
    # A misspelt port setting is no service link, though its name ends the same way.
    monkeypatch.setenv("SERVE_METRIC_PORT", "8001")
    with pytest.raises(SettingsError, match="SERVE_METRIC_PORT is not a setting"):
        load_settings()


def test_the_config_variable_is_read_in_any_case_and_one_spelling_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """serve_port sets port, so serve_config names the YAML file (it was taken for a known
    variable and ignored: the defaults served in silence); two spellings of one variable
    are refused rather than one picked by the environment's order, and named wrongly."""
    config = tmp_path / "serve.yaml"
    config.write_text("port: 1111\n")
    monkeypatch.setenv("serve_config", str(config))
    assert load_settings().port == 1111
    monkeypatch.setenv("serve_config", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match=r"missing\.yaml: cannot read"):
        load_settings()
    monkeypatch.delenv("serve_config")
    monkeypatch.setenv("SERVE_PORT", "1234")
    monkeypatch.setenv("serve_port", "70000")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        "  SERVE_PORT and serve_port set the same setting (the names are read in any case): "
        "keep one"
    ]


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({"SERVE_PORT": "70000"}, {}, "SERVE_PORT=70000: must be ≤ 65535"),
        ({}, {"port": 70000}, "--port 70000: must be ≤ 65535"),
        ({"SERVE_MAX_QUEUE": "0"}, {}, "SERVE_MAX_QUEUE=0: must be ≥ 1"),
        ({"SERVE_PROVIDER": "tpu"}, {}, "SERVE_PROVIDER=tpu: must be one of"),
        ({"SERVE_BATCHING": "dynamic"}, {}, "'static-hold' or 'static-padded'"),
        ({"SERVE_DRAIN_GRACE_S": "soon"}, {}, "SERVE_DRAIN_GRACE_S=soon"),
        ({"SERVE_CUDA_GRAPHS": "maybe"}, {}, "SERVE_CUDA_GRAPHS=maybe: must be true or false"),
        ({}, {"cuda_graphs": "perhaps"}, "--cuda-graphs perhaps: must be true or false"),
        ({}, {"default_max_new_tokens": 600}, "default_max_new_tokens (600) must be ≤"),
        ({"SERVE_MAX_BATCH_SIZE": "2"}, {}, "max_beam_size (8) must be ≤ max_batch_size (2)"),
        ({"SERVE_MAX_QUEUE": "2"}, {}, "max_texts_per_request (64) must be ≤ max_queue (2)"),
        ({"SERVE_MAX_CALLS": "100"}, {}, "max_calls (100) must be ≥ max_queue + max_batch_size"),
        ({}, {"request_read_timeout_s": 0}, "--request-read-timeout-s 0: must be ≥ 0.1"),
        ({}, {"max_connection_age_s": 0.0004}, "--max-connection-age-s 0.0004: must be 0 (never)"),
        ({"SERVE_MAX_CONNECTION_AGE_GRACE_S": "0"}, {}, "SERVE_MAX_CONNECTION_AGE_GRACE_S=0"),
        (
            {"SERVE_MAX_MESSAGE_BYTES": "16383"},
            {},
            "SERVE_MAX_MESSAGE_BYTES=16383: must be ≥ 16384 (16 KiB): server reflection's "
            "answers (a proto file's descriptor, about 3.2 KB for inference.proto) and health "
            "answers must fit in one message",
        ),
        ({}, {"max_message_bytes": 1024}, "--max-message-bytes 1024: must be ≥ 16384 (16 KiB)"),
        ({}, {"health_port": 8000}, "health_port (8000) must differ from metrics_port"),
        ({"SERVE_HEALTH_PORT": "50051"}, {}, "health_port (50051) must differ from port"),
        ({}, {"tls_cert": Path("/nonexistent.pem")}, "tls_cert and tls_key go together"),
        (
            {"SERVE_TLS_CLIENT_CA": "/ca.pem"},
            {},
            "tls_client_ca needs TLS on the gRPC port: set tls_cert and tls_key too (the "
            "server's certificate and key), or unset tls_client_ca (given: "
            "SERVE_TLS_CLIENT_CA=/ca.pem)",
        ),
        ({"SERVE_HOST": "[]"}, {}, "SERVE_HOST=[]: must name an address"),
        ({"SERVE_AUTH_TOKEN": " "}, {}, "SERVE_AUTH_TOKEN=<hidden>: is empty"),
        ({"SERVE_AUTH_TOKEN": "a b"}, {}, "SERVE_AUTH_TOKEN=<hidden>: has characters a gRPC"),
        ({}, {"auth_token": "tök"}, "--auth-token <hidden>: has characters a gRPC header"),
        ({"serve_port": "70000"}, {}, "serve_port=70000: must be ≤ 65535"),  # as spelt
        ({"SERVE_DRAIN_GRACE_S": "nan"}, {}, "SERVE_DRAIN_GRACE_S=nan: must be a finite number"),
        ({"SERVE_DRAIN_GRACE_S": "inf"}, {}, "SERVE_DRAIN_GRACE_S=inf: must be a finite number"),
        (
            {"SERVE_MAX_BATCH_TOKENS": "300"},
            {},
            "max_batch_tokens (300) must be ≥ max_input_tokens (256) + default_max_new_tokens "
            "(128)",
        ),
    ],
)
def test_bad_values_say_what_to_change(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flags: dict[str, Any], expected: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings(**flags)
    assert expected in str(info.value)


def test_log_level_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"
    assert load_settings(log_level="Warning").log_level == "WARNING"
    with pytest.raises(SettingsError, match="--log-level verbose: must be one of"):
        load_settings(log_level="verbose")


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1:50051"), ("::", "[::]:50051"), ("[::1]", "[::1]:50051")],
)
def test_an_ipv6_host_is_bracketed_before_its_port(
    monkeypatch: pytest.MonkeyPatch, host: str, address: str
) -> None:
    monkeypatch.setenv("SERVE_HOST", host)
    assert load_settings().address(50051) == address


def test_rules_relating_settings_say_where_each_was_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A rule broken by several settings names each one's source, not only its value."""
    config = tmp_path / "serve.yaml"
    config.write_text("max_input_tokens: 300\n")
    monkeypatch.setenv("SERVE_MAX_BATCH_TOKENS", "400")
    with pytest.raises(SettingsError) as info:
        load_settings(config, default_max_new_tokens=120)
    message = str(info.value)
    assert message.endswith(
        "(given: SERVE_MAX_BATCH_TOKENS=400; max_input_tokens: 300 in "
        f"{config}; --default-max-new-tokens 120)"
    )
    monkeypatch.setenv("SERVE_HEALTH_PORT", "8000")  # a default is no source: not listed
    monkeypatch.delenv("SERVE_MAX_BATCH_TOKENS")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).endswith("or 0 for none (given: SERVE_HEALTH_PORT=8000)")


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("max_batch_size: 0\n")
    with pytest.raises(SettingsError, match=r"max_batch_size: 0 in .*bad.yaml: must be ≥ 1"):
        load_settings(config)
    config.write_text("max_bach_size: 8\n")
    with pytest.raises(SettingsError, match=r"max_bach_size is not a setting: did you mean max_ba"):
        load_settings(config)
    config.write_text("PORT: 8\n")  # YAML keys keep their case (environment variables do not)
    with pytest.raises(SettingsError, match=r"PORT is not a setting: did you mean port\?"):
        load_settings(config)
    config.write_text("port: 50051\nmax_queue: [1\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert str(info.value).startswith(f"--config {config}: not valid YAML at line 3, column 1")
    assert "\n" not in str(info.value) and "unicode string" not in str(info.value)
    config.write_bytes(b"port: 5\x07\n")  # a character YAML refuses: PyYAML's reason kept
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert "not valid YAML: unacceptable character #x0007" in str(info.value)
    assert "\n" not in str(info.value)
    # Bytes that are not UTF-8 (a file saved as Latin-1): a message, not UnicodeDecodeError
    config.write_bytes(b"port: 5\nhost: caf\xe9\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert str(info.value) == (
        f"--config {config}: not valid YAML: not UTF-8 text (byte 0xe9 at offset 17); "
        "save it as UTF-8"
    )
    config.write_bytes("port: 1234\n".encode("utf-16"))  # YAML allows UTF-16 with a BOM
    assert load_settings(config).port == 1234
    # A setting given twice, in either spelling: PyYAML kept the last in silence
    for text in ("max_queue: 5\nport: 1\nmax_queue: 7\n", "max_queue: 5\nport: 1\nmax-queue: 7\n"):
        config.write_text(text)
        with pytest.raises(SettingsError) as info:
            load_settings(config)
        assert str(info.value) == (
            f"--config {config}: not valid YAML at line 3, column 1: max_queue is given "
            "twice (first at line 1): keep one"
        )
    # YAML's booleans are no numbers: `port: true` would have served on port 1
    for line, name in (("port: true", "port"), ("max_batch_size: yes", "max_batch_size")):
        config.write_text(line + "\n")
        with pytest.raises(SettingsError, match=rf"{name}: True in .*: must be a number, got true"):
            load_settings(config)
    config.write_text("auth_token: 12345\n")  # an integer: refused, and not shown
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert "auth_token: <hidden> in" in str(info.value) and "12345" not in str(info.value)
    config.write_text("- a list\n")
    with pytest.raises(SettingsError, match="must be a mapping"):
        load_settings(config)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_tls_files_are_read_and_matched_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad certificate or key fails with its name, not at bind time as a busy port."""
    from tests._tls import self_signed

    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, other_key = self_signed(tmp_path / "other")
    assert load_settings(tls_cert=cert, tls_key=key).tls
    missing = tmp_path / "missing.pem"
    with pytest.raises(SettingsError, match=rf"tls_cert {missing}: cannot read \(No such file"):
        load_settings(tls_cert=missing, tls_key=key)
    with pytest.raises(SettingsError, match=rf"tls_key {tmp_path}: cannot read"):
        load_settings(tls_cert=cert, tls_key=tmp_path)  # a folder
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("x")
    for pair in ((garbage, key), (cert, garbage), (cert, other_key), (key, cert)):
        with pytest.raises(SettingsError, match="are not a PEM certificate chain and its"):
            load_settings(tls_cert=pair[0], tls_key=pair[1])
    assert load_settings(tls_cert=other_cert, tls_key=other_key).tls
    if shutil.which("openssl") is not None:  # a well-formed pair, refused as too weak
        weak_cert, weak_key = tmp_path / "weak.pem", tmp_path / "weak.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-keyout",
             str(weak_key), "-out", str(weak_cert), "-subj", "/CN=localhost", "-days", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        with pytest.raises(SettingsError, match=r"too weak \(EE_KEY_TOO_SMALL\): issue it with"):
            load_settings(tls_cert=weak_cert, tls_key=weak_key)
    monkeypatch.setenv("SERVE_TLS_CERT", "")  # a template's empty value: no TLS
    monkeypatch.setenv("SERVE_TLS_KEY", " ")
    assert not load_settings().tls
    assert not load_settings(tls_cert="", tls_key="").tls  # flags: the same


def test_the_client_ca_is_read_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutual TLS: a client CA grpc could not use fails every handshake, which clients see
    as a closed connection; the settings name the file and why instead."""
    from tests._tls import certificate_authority, self_signed

    cert, key = self_signed(tmp_path)
    ca, ca_key = certificate_authority(tmp_path)
    assert load_settings(tls_cert=cert, tls_key=key, tls_client_ca=ca).mtls
    assert not load_settings(tls_cert=cert, tls_key=key).mtls
    missing = tmp_path / "missing.pem"
    with pytest.raises(SettingsError, match=rf"tls_client_ca {missing}: cannot read \(No such"):
        load_settings(tls_cert=cert, tls_key=key, tls_client_ca=missing)
    with pytest.raises(SettingsError, match=rf"tls_client_ca {tmp_path}: cannot read"):
        load_settings(tls_cert=cert, tls_key=key, tls_client_ca=tmp_path)  # a folder
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for path, why in (
        (ca_key, "no -----BEGIN CERTIFICATE----- block"),  # the CA's key, not its certificate
        (garbled, ""),
    ):
        with pytest.raises(SettingsError) as info:
            load_settings(tls_cert=cert, tls_key=key, tls_client_ca=path)
        assert (
            f"tls_client_ca {path}: not the PEM certificate(s) of the CA(s) that issue client "
            f"certificates ({why}" in str(info.value)
        )
    monkeypatch.setenv("SERVE_TLS_CLIENT_CA", " ")  # a template's empty value: no mutual TLS
    assert not load_settings(tls_cert=cert, tls_key=key).mtls
    assert not load_settings().mtls


def test_an_empty_model_repository_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """SERVE_MODEL_REPOSITORY= (a template's empty value) named the working folder: the
    server started with no model, a warning its only sign."""
    monkeypatch.setenv("SERVE_MODEL_REPOSITORY", " ")
    with pytest.raises(SettingsError, match=r"SERVE_MODEL_REPOSITORY= : is empty: name the"):
        load_settings()
    monkeypatch.delenv("SERVE_MODEL_REPOSITORY")
    with pytest.raises(SettingsError, match=r"--model-repository : is empty"):
        load_settings(model_repository="")


def test_auth_token_is_secret_and_kept_as_a_header_carries_it() -> None:
    s = load_settings(auth_token="s3cret")
    assert "s3cret" not in repr(s)
    assert s.auth_token is not None and s.auth_token.get_secret_value() == "s3cret"
    # a secret file's trailing newline: clients send the token without it
    s = load_settings(auth_token=" s3cret\n")
    assert s.auth_token is not None and s.auth_token.get_secret_value() == "s3cret"
    # one clients could not send reliably: grpc refuses headers past 8 KiB at random
    assert load_settings(auth_token="t" * 4096).auth_token is not None
    with pytest.raises(SettingsError, match=r"--auth-token <hidden>: is 8,000 characters, over"):
        load_settings(auth_token="t" * 8000)


def test_cli_help_and_errors() -> None:
    run = [sys.executable, "-m", "service"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0
    for flag in ("--port", "--max-queue", "--auth-token", "--config", "SERVE_MAX_QUEUE"):
        assert flag in help_text.stdout
    assert "--tls-client-ca" in help_text.stdout and "SERVE_TLS_CLIENT_CA" in help_text.stdout
    # A boolean setting is a string flag: its help says what it reads, not "<str>".
    assert re.search(r"--cuda-graphs +true\|false", help_text.stdout), help_text.stdout
    bad = subprocess.run([*run, "--port", "70000"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "--port 70000: must be ≤ 65535" in bad.stderr
    # An empty path flag (`--tls-cert "$CERT"` with CERT unset) is unset, not the folder "."
    empty = [*run, "--tls-cert", "", "--tls-key", "", "--port", "70000"]
    bad = subprocess.run(empty, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "tls" not in bad.stderr, bad.stderr


def test_cuda_graphs_reach_the_engine_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch goes from env or flag to the engines the scheduler builds (on by default)."""
    from service.scheduler import engine_options_from_settings

    assert engine_options_from_settings(load_settings()).cuda_graphs is True
    monkeypatch.setenv("SERVE_CUDA_GRAPHS", "false")
    assert engine_options_from_settings(load_settings()).cuda_graphs is False
    assert engine_options_from_settings(load_settings(cuda_graphs="true")).cuda_graphs is True


def test_the_input_limit_reaches_the_engine_options() -> None:
    """The engines size their source shapes (and warm-up memory) by the server's limit."""
    from service.scheduler import engine_options_from_settings

    assert engine_options_from_settings(load_settings()).max_input_tokens == 256
    options = engine_options_from_settings(load_settings(max_input_tokens=100))
    assert options.max_input_tokens == 100
