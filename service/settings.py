"""Every server setting in one pydantic-settings model.

Sources, highest first: CLI flags (`python -m service --help`), environment variables
(`SERVE_<FIELD>`, e.g. SERVE_MAX_QUEUE=256), a YAML file (`--config file.yaml` or
SERVE_CONFIG), then the defaults below. A bad value fails at start with a message naming
where it came from and what to change, e.g. "SERVE_PORT=70000: must be ≤ 65535".
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.domain import bearer_token

ENV_PREFIX = "SERVE_"
CONFIG_ENV = "SERVE_CONFIG"
# The smallest max_message_bytes: the server's reflection and health answers are bound by
# it too, and reflection sends a proto file's descriptor, with its imports, in one message:
# 3,193 bytes at most for the protos served (inference.proto's), so 16 KiB leaves room for
# them to grow.
MIN_MESSAGE_BYTES = 16 << 10


class SettingsError(ValueError):
    """Settings that cannot start a server; one line per problem, each saying what to change."""


class Settings(BaseSettings):
    """Server configuration (gRPC transport, batching, limits, security, lifecycle)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
        allow_inf_nan=False,
    )

    # --- network -------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the gRPC and metrics servers bind (0.0.0.0 in containers; :: or "
        "[::] for every IPv6 and IPv4 address).",
    )
    port: int = Field(
        50051, ge=0, le=65535, description="gRPC port (0 = any free port, logged at start)."
    )
    metrics_port: int = Field(
        8000, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 = no metrics server)."
    )
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A plaintext port serving grpc.health.v1 (and reflection) alone, for "
        "Kubernetes probes: clients of the gRPC port cannot take its bounds, and the "
        "kubelet's gRPC probes speak no TLS when the gRPC port does; 0 = none.",
    )
    # --- models --------------------------------------------------------------------------
    model_repository: Path = Field(
        Path("models"),
        description="Model repository: <name>/<version>/manifest.json (see export/README.md).",
    )
    keep_versions: int = Field(
        1,
        ge=0,
        le=1000,
        description="Versions of each model served, newest first (0 = every version on disk). "
        "A reload serves a new version beside the running one, which retires once its "
        "in-flight requests finish.",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime execution provider (auto = CUDA when available)."
    )
    cpu_variant: Literal["int8", "fp32"] = Field(
        "fp32",
        description="ONNX variant served on CPU (the GPU always serves fp16). int8 serves "
        "about a sixth more tokens/s here, but its dynamic quantization scales activations "
        "over the whole batch, so an answer can change with what shares its batch.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="onnxruntime intra-op threads per session (0 = the cores this process "
        "may run on, within its cgroup's CPU quota: a container's CPU limit).",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay each decode-step shape as a CUDA graph captured at its "
        "first step (checked against a plain run; falls back to plain runs if it fails).",
    )
    # --- batching ------------------------------------------------------------------------
    max_batch_size: int = Field(
        64, ge=1, le=4096, description="Sequences (rows, beams included) decoded per step."
    )
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        le=1 << 24,
        description="Tokens the running requests may reach (rows × (input + max_new_tokens) "
        "each), an admission budget; the cache itself is rows × the longest row, rows "
        "rounded up to a power of two, up to max_batch_size (so rounded up) × max_positions.",
    )
    max_queue: int = Field(
        256, ge=1, le=1 << 20, description="Waiting sequences before RESOURCE_EXHAUSTED."
    )
    batching: Literal["continuous", "static", "static-hold", "static-padded"] = Field(
        "continuous",
        description="continuous: admit at every step; static: a batch runs to its end "
        "(benchmark baseline); static-hold: static, answers held until the batch ends; "
        "static-padded: static-hold, finished rows computed as padding until then.",
    )
    # --- request limits ------------------------------------------------------------------
    max_input_tokens: int = Field(
        256, ge=1, le=65536, description="Tokens per input text (also capped by the model)."
    )
    default_max_new_tokens: int = Field(
        128,
        ge=1,
        le=65536,
        description="max_new_tokens when a request leaves it unset (lowered where a "
        "model leaves less room after the input).",
    )
    max_new_tokens: int = Field(
        512, ge=1, le=65536, description="Largest max_new_tokens a request may ask for."
    )
    max_texts_per_request: int = Field(
        64, ge=1, le=4096, description="Texts in one Translate call."
    )
    max_beam_size: int = Field(8, ge=1, le=64, description="Largest beam_size (and n_best).")
    max_stop_strings: int = Field(8, ge=0, le=256, description="Stop strings per request.")
    max_stop_chars: int = Field(64, ge=1, le=4096, description="Characters per stop string.")
    max_message_bytes: int = Field(
        4 << 20,
        le=1 << 30,
        description=f"Largest gRPC message, either direction (at least {MIN_MESSAGE_BYTES}: "
        "server reflection's answers must fit).",
    )
    max_calls: int = Field(
        2048,
        ge=1,
        le=1 << 20,
        description="Calls held at once in any state (request arriving, queued, decoding, "
        "streaming, or an answer its caller has not read yet); more are refused "
        "RESOURCE_EXHAUSTED unread. At least max_queue + max_batch_size; keep it above "
        "what the models' queues hold together.",
    )
    max_answer_bytes: int = Field(
        256 << 20,
        ge=MIN_MESSAGE_BYTES,
        le=1 << 40,
        description="Bytes of answers the held calls may have that grpc has not delivered "
        "(it holds an answer until its caller reads it or the connection closes); past it, "
        "new calls are refused RESOURCE_EXHAUSTED unread. max_calls alone lets callers "
        "that read nothing hold max_calls × max_message_bytes; each byte held costs about "
        "3 of memory (the answer, its encoding and grpc's copy).",
    )
    max_reading_calls: int = Field(
        16,
        ge=1,
        le=4096,
        description="Calls reading their request at once; others wait their turn, each "
        "holding up to one 64 KiB HTTP/2 window. Requests in transit hold at most about "
        "this × 2 × max_message_bytes + max_calls × 64 KiB of memory, plus for a moment "
        "up to max(3000, 2 × max_calls) × 64 KiB while a burst waits for the event loop "
        "to take it (grpc cancels what is beyond).",
    )
    request_read_timeout_s: float = Field(
        10.0,
        ge=0.1,
        le=3600.0,
        description="Seconds a request has to arrive once its read turn comes (the wait "
        "for a turn is bounded by the turns ahead and the call's deadline); a slower one is "
        "refused (DEADLINE_EXCEEDED) and its memory freed.",
    )
    # --- lifecycle -----------------------------------------------------------------------
    drain_grace_s: float = Field(
        30.0,
        ge=0.0,
        le=3600.0,
        description="After SIGTERM: seconds in-flight calls may finish; what is left then "
        "ends (a stream with its answer so far, a unary call UNAVAILABLE) and has up to "
        "about 2 s more to reach its client.",
    )
    max_connections: int = Field(
        2048,
        ge=1,
        le=1 << 20,
        description="Connections the gRPC port (and the health port, apart) keeps open at "
        "once; more are closed as they open. Each holds a file descriptor: keep it under "
        "the open-file limit, which the server warns about at start.",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0.0,
        le=86400.0,
        description="Close connections after this age so clients rebalance (0 = never, else ≥ 1).",
    )
    max_connection_age_grace_s: float = Field(
        120.0,
        ge=1.0,
        le=86400.0,
        description="Seconds the calls still running on a connection at its max age may go "
        'on: grpc then cuts the rest (their clients see UNAVAILABLE "max connection age"; '
        "the server cannot tell that from its client going away, and counts them cancelled). "
        "Size it to the longest call your clients make. It also bounds how long grpc holds an "
        "answer its caller never reads.",
    )
    # --- security ------------------------------------------------------------------------
    tls_cert: Path | None = Field(None, description="PEM certificate chain; enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM certificate(s) of the CA(s) whose client certificates the gRPC port "
        "requires (mutual TLS; needs tls_cert and tls_key): a client without one is refused "
        "at the handshake, health and reflection on that port included (probes use "
        "health_port).",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="If set, calls need `authorization: Bearer <token>` (health and "
        "reflection stay open). "
        "Visible ASCII, at most 4096 characters; surrounding whitespace (a secret file's "
        "newline) is dropped. Prefer SERVE_AUTH_TOKEN or the YAML file to the flag, which "
        "`ps` shows.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Threshold of the JSON logs on stderr."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        """`debug` names the same level as `DEBUG` (Python's logging takes either)."""
        return value.upper() if isinstance(value, str) else value

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's `yes`/`true` would pass as 1 for an integer setting."""
        name = info.field_name or ""
        if isinstance(value, bool) and cls.model_fields[name].annotation in (int, float):
            raise ValueError(f"must be a number, got {str(value).lower()}")
        return value

    @field_validator("host")
    @classmethod
    def _unbracketed_host(cls, value: str) -> str:
        """`[::1]` and `::1` name one address: kept bare, bracketed where a port follows."""
        bare = value.strip()
        if bare.startswith("[") and bare.endswith("]"):
            bare = bare[1:-1]
        if not bare:
            raise ValueError("must name an address, e.g. 127.0.0.1, 0.0.0.0 or ::")
        return bare

    def address(self, port: int) -> str:
        """host:port as gRPC and logs write it (an IPv6 host in brackets)."""
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @field_validator("max_message_bytes")
    @classmethod
    def _reflection_fits(cls, value: int) -> int:
        """Below the floor reflection fails (RESOURCE_EXHAUSTED), grpcurl with it."""
        if value < MIN_MESSAGE_BYTES:
            raise ValueError(
                f"must be ≥ {MIN_MESSAGE_BYTES} ({MIN_MESSAGE_BYTES >> 10} KiB): server "
                "reflection's answers (a proto file's descriptor, about 3.2 KB for "
                "inference.proto) and health answers must fit in one message"
            )
        return value

    @field_validator("max_connection_age_s")
    @classmethod
    def _an_age_or_never(cls, value: float) -> float:
        """grpc counts the age in whole ms (under 1 ms it read 0 ms), and an age under a
        second would have clients reconnect for nearly every call."""
        if 0 < value < 1:
            raise ValueError("must be 0 (never) or ≥ 1 s: clients would reconnect for every call")
        return value

    @field_validator("model_repository", mode="before")
    @classmethod
    def _a_repository_is_named(cls, value: Any) -> Any:
        """SERVE_MODEL_REPOSITORY= would serve the working folder: no models, in silence."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: name the folder holding <name>/<version>/ (default models)")
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        """SERVE_TLS_CERT= (a template's empty value) means no file, not the folder "."."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("auth_token")
    @classmethod
    def _header_safe_token(cls, value: SecretStr | None) -> SecretStr | None:
        """The token as a header carries it: surrounding whitespace dropped (clients' is
        too), nothing a header cannot carry. Messages never show the token."""
        if value is None:
            return None
        token = bearer_token(value.get_secret_value())
        if token is None:
            raise ValueError("is empty: unset it to disable auth or give a token")
        return SecretStr(token)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be ≤ "
                f"max_new_tokens ({self.max_new_tokens}); lower it or raise max_new_tokens"
            )
        if self.max_beam_size > self.max_batch_size:
            raise ValueError(
                f"max_beam_size ({self.max_beam_size}) must be ≤ max_batch_size "
                f"({self.max_batch_size}): a beam takes a row per hypothesis; lower "
                "max_beam_size or raise max_batch_size"
            )
        if self.max_batch_tokens < self.max_input_tokens + self.default_max_new_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be ≥ max_input_tokens "
                f"({self.max_input_tokens}) + default_max_new_tokens "
                f"({self.default_max_new_tokens}): the longest input must fit the batch with "
                "the default output length; raise max_batch_tokens or lower the others"
            )
        if self.max_texts_per_request > self.max_queue:
            raise ValueError(
                f"max_texts_per_request ({self.max_texts_per_request}) must be ≤ max_queue "
                f"({self.max_queue}): each text of a Translate call waits in the queue; lower "
                "max_texts_per_request or raise max_queue"
            )
        if self.max_calls < self.max_queue + self.max_batch_size:
            raise ValueError(
                f"max_calls ({self.max_calls}) must be ≥ max_queue + max_batch_size "
                f"({self.max_queue + self.max_batch_size}): calls waiting in a model's queue "
                "or decoding are held calls; raise max_calls or lower the others"
            )
        ports = {"port": self.port, "metrics_port": self.metrics_port}
        if self.health_port and self.health_port in ports.values():
            same = next(name for name, port in ports.items() if port == self.health_port)
            raise ValueError(
                f"health_port ({self.health_port}) must differ from {same}: give it one "
                "of its own, or 0 for none"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_cert is not None and self.tls_key is not None:
            _check_key_pair(self.tls_cert, self.tls_key)
        if self.tls_client_ca is not None:
            if self.tls_cert is None:
                raise ValueError(
                    "tls_client_ca needs TLS on the gRPC port: set tls_cert and tls_key too "
                    "(the server's certificate and key), or unset tls_client_ca"
                )
            _check_client_ca(self.tls_client_ca)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init kwargs) > env > YAML (handed in as defaults by `load_settings`)."""
        return (init_settings, env_settings)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mtls(self) -> bool:
        """Whether the gRPC port requires client certificates (mutual TLS)."""
        return self.tls_client_ca is not None


# OpenSSL's refusals of a well-formed chain whose keys or signatures are too weak.
_TOO_WEAK = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


def _check_key_pair(cert: Path, key: Path) -> None:
    """Read the TLS files as the server will, so a bad one fails here with its name, not
    at bind time as a port that cannot be listened on."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name} {path}: cannot read ({exc.strerror or exc})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password="")
    except ssl.SSLError as exc:
        if exc.reason in _TOO_WEAK:  # OpenSSL's security level 2 (Python's default)
            raise ValueError(
                f"tls_cert {cert}: a key or signature in the chain is too weak "
                f"({exc.reason}): issue it with an RSA key of at least 2048 bits or an ECDSA "
                "key, signed with SHA-256 or stronger"
            ) from None
        raise ValueError(
            f"tls_cert {cert} and tls_key {key} are not a PEM certificate chain and its "
            f"unencrypted private key ({exc.reason or exc})"
        ) from None


def _check_client_ca(path: Path) -> None:
    """Read the client CA as the server will: a file grpc cannot use fails every client's
    handshake, which clients see as a closed connection, saying nothing of why."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"tls_client_ca {path}: cannot read ({exc.strerror or exc})") from None
    reason = "no -----BEGIN CERTIFICATE----- block"
    if b"-----BEGIN CERTIFICATE-----" in pem:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
            return
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
    raise ValueError(
        f"tls_client_ca {path}: not the PEM certificate(s) of the CA(s) that issue client "
        f"certificates ({reason})"
    )


class _OnceLoader(yaml.SafeLoader):
    """Refuses a setting given twice in one file (`max_queue` twice, or `max-queue` beside
    `max_queue`): PyYAML keeps the last in silence."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            key = str(self.construct_object(key_node, deep=deep)).replace("-", "_")
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key} is given twice (first at line {lines[key]}): keep one",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        # Bytes, so that PyYAML decodes them (UTF-8, or UTF-16 after a BOM, as YAML allows)
        # and reports bytes that decode as nothing as a YAMLError, not UnicodeDecodeError.
        with path.open("rb") as file:
            data = yaml.load(file, Loader=_OnceLoader)  # a SafeLoader: no Python tags
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            reason = f" at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"  # type: ignore[attr-defined]
        elif isinstance(exc, yaml.reader.ReaderError) and exc.encoding != "unicode":
            reason = (
                f": not {exc.encoding.upper()} text (byte 0x{exc.character:02x} at offset "
                f"{exc.position}); save it as UTF-8"
            )
        else:  # e.g. a character YAML does not allow: PyYAML's text says which, and where
            reason = ": " + " ".join(str(exc).split())
        raise SettingsError(f"--config {path}: not valid YAML{reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: must be a mapping of setting: value")
    known = sorted(Settings.model_fields)
    lines = []
    for key in sorted(str(k) for k in data if str(k).replace("-", "_") not in known):
        close = difflib.get_close_matches(key.replace("-", "_").lower(), known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        lines.append(
            f"--config {path}: {key} is not a setting: {hint}`python -m service --help` lists them"
        )
    if lines:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines))
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _describe_error(
    error: dict[str, Any], overrides: dict[str, Any], yaml_data: dict[str, Any], yaml_path: Any
) -> str:
    """Name where the bad value came from (flag, env or file) and what the limit is."""
    loc = [str(part) for part in error.get("loc", ())]
    name = loc[0] if loc else ""
    ctx = error.get("ctx") or {}
    kind = error.get("type", "")
    if kind == "less_than_equal":
        rule = f"must be ≤ {ctx.get('le')}"
    elif kind == "greater_than_equal":
        rule = f"must be ≥ {ctx.get('ge')}"
    elif kind == "literal_error":
        rule = f"must be one of {ctx.get('expected')}"
    elif kind == "bool_parsing":
        rule = "must be true or false"
    elif kind == "finite_number":
        rule = "must be a finite number"
    elif kind == "extra_forbidden":
        rule = f"unknown setting; known: {', '.join(sorted(Settings.model_fields))}"
    else:
        rule = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not name:  # a rule relating settings: say where each one it names was set
        named = [n for n in Settings.model_fields if re.search(rf"\b{n}\b", rule)]
        given = [w for n in named if (w := _source(n, overrides, yaml_data, yaml_path))]
        return f"{rule} (given: {'; '.join(given)})" if given else rule
    where = _source(name, overrides, yaml_data, yaml_path)
    if where is None:
        where = f"{name}={'<hidden>' if name in _SECRETS else repr(error.get('input'))}"
    return f"{where}: {rule}"


def _source(
    name: str, overrides: dict[str, Any], yaml_data: dict[str, Any], yaml_path: Any
) -> str | None:
    """The flag, environment variable or YAML line that set `name` (None: its default)."""
    env_key = _env_key(f"{ENV_PREFIX}{name.upper()}")

    def shown(value: Any) -> str:
        return "<hidden>" if name in _SECRETS else str(value)

    if name in overrides:
        return f"--{name.replace('_', '-')} {shown(overrides[name])}"
    if env_key is not None:
        return f"{env_key}={shown(os.environ[env_key])}"
    if name in yaml_data:
        return f"{name}: {shown(yaml_data[name])} in {yaml_path}"
    return None


# Settings whose values no message shows.
_SECRETS = frozenset({"auth_token"})


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from flags (overrides; None = not given), env and the YAML file.

    Raises SettingsError with one line per problem.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    _refuse_ambiguous_env()
    _refuse_service_links(given)
    _refuse_unknown_env()
    path = config
    config_key = _env_key(CONFIG_ENV)
    if path is None and config_key is not None and os.environ[config_key]:
        path = Path(os.environ[config_key])
    yaml_data = _read_yaml(path) if path is not None else {}
    # YAML sits below env: feed it through a subclass's defaults, so env and flags win.
    try:
        settings = _with_defaults(yaml_data)(**given)
    except ValidationError as exc:
        lines = [
            _describe_error(dict(err), given, yaml_data, path)  # type: ignore[arg-type]
            for err in exc.errors()
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    return settings


# SERVE_ variables that are not settings: the YAML file's path, the client's server
# address (service.client), and `make serve`'s extra flags (make puts a variable given on
# its command line in the environment).
_OTHER_ENV = {CONFIG_ENV, f"{ENV_PREFIX}TARGET", f"{ENV_PREFIX}ARGS"}


# What Kubernetes puts in a pod's environment for each Service in its namespace (unless
# enableServiceLinks is false, as in deploy/k8s): a Service named serve-<x> gives
# SERVE_<X>_SERVICE_HOST, ..._SERVICE_PORT[_<NAME>], ..._PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR],
# and ..._PORT=tcp://<ip>:<port>.
_SERVICE_LINK = re.compile(
    r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_URL = re.compile(r"(tcp|udp|sctp)://[^\s]+:\d+")


def _service_link(key: str, value: str) -> bool:
    name = key.upper()
    if _SERVICE_LINK.fullmatch(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(value) is not None


def _refuse_service_links(given: dict[str, Any]) -> None:
    """A Service named `serve`, `serve-metrics` or `serve-health` makes Kubernetes set
    SERVE_PORT, SERVE_METRICS_PORT or SERVE_HEALTH_PORT to tcp://<ip>:<port>: say so,
    rather than "not an integer" (unless a flag sets that port: it wins over the
    environment)."""
    for name in ("port", "metrics_port", "health_port"):
        if name in given:
            continue
        key = f"{ENV_PREFIX}{name.upper()}"
        value = next((v for k, v in os.environ.items() if k.upper() == key), "")
        if _SERVICE_LINK_URL.fullmatch(value):
            service = key.removesuffix("_PORT").lower().replace("_", "-")
            raise SettingsError(
                f"invalid settings:\n  {key}={value}: Kubernetes sets this for a Service "
                f"named {service} in the namespace (service links); set enableServiceLinks: "
                "false in the pod spec (deploy/k8s does), or rename that Service"
            )


def _env_key(name: str) -> str | None:
    """The environment variable that sets `name`, spelt in any case as the settings read
    it (serve_port sets port), or None."""
    return next((key for key in os.environ if key.upper() == name), None)


def _refuse_ambiguous_env() -> None:
    """SERVE_PORT and serve_port name one setting: with both set, which one wins depends on
    the environment's order, and a message would name either."""
    names = [f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields] + [CONFIG_ENV]
    lines = []
    for name in names:
        keys = sorted(key for key in os.environ if key.upper() == name)
        if len(keys) > 1:
            lines.append(
                f"{' and '.join(keys)} set the same setting (the names are read in any "
                "case): keep one"
            )
    if lines:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines))


def _refuse_unknown_env() -> None:
    """A misspelt SERVE_ variable would be ignored and its default served in silence."""
    fields = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    unknown = sorted(
        key
        for key, value in os.environ.items()
        if key.upper().startswith(ENV_PREFIX)
        and key.upper() not in fields | _OTHER_ENV
        and not _service_link(key, value)
    )
    if not unknown:
        return
    names = sorted(name.upper() for name in Settings.model_fields)
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key[len(ENV_PREFIX) :].upper(), names, n=1)
        hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
        lines.append(f"{key} is not a setting: {hint}`python -m service --help` lists them")
    raise SettingsError("invalid settings:\n  " + "\n  ".join(lines))


def _with_defaults(values: dict[str, Any]) -> type[Settings]:
    """A Settings subclass whose defaults are `values` (the YAML layer, below env)."""
    if not values:
        return Settings

    class _YamlSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, values))

    return _YamlSettings


class _DictSource(PydanticBaseSettingsSource):
    """The parsed YAML file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)
