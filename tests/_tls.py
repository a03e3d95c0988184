"""Certificates for the TLS tests (server, settings, deploy manifests): a self-signed
server certificate and, for mutual TLS, a client CA and the client certificates it issues
(cryptography, else the openssl CLI)."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import pytest

# The server's certificate (self-signed, for localhost), a CA that issues client
# certificates, or a client certificate such a CA issued.
Kind = Literal["server", "ca", "client"]

# `openssl ca` signs with the validity dates given; `openssl req -x509` (OpenSSL 3.0) takes
# a number of days from now only. Each kind's extensions are in the section <kind>_ext.
_CA_CONFIG = """\
[ca]
default_ca = tests
[tests]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = anything
copy_extensions = copy
[anything]
commonName = supplied
[server_ext]
basicConstraints = critical, CA:TRUE
subjectKeyIdentifier = hash
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


def self_signed(
    directory: Path,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1, valid from not_before (default 5
    minutes ago) to not_after (default a day from now), whole seconds, UTC. Dates from 2050
    on are encoded as GeneralizedTime, earlier ones as UTCTime (RFC 5280)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    _make(cert, key, "server", "localhost", None, not_before, not_after)
    return cert, key


def certificate_authority(directory: Path, name: str = "tests client CA") -> tuple[Path, Path]:
    """A CA certificate and its key (ca.pem, ca.key in `directory`), to issue client
    certificates with; valid from 5 minutes ago for a day."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    _make(cert, key, "ca", name, None)
    return cert, key


def client_certificate(
    directory: Path, ca: tuple[Path, Path], name: str = "client"
) -> tuple[Path, Path]:
    """A client certificate (CN=name, extended key usage clientAuth) that `ca` (its
    certificate and key) issued, and its key: <name>.pem, <name>.key in `directory`."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _make(cert, key, "client", name, ca)
    return cert, key


def _make(
    cert: Path,
    key: Path,
    kind: Kind,
    name: str,
    issuer: tuple[Path, Path] | None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> None:
    """Write a P-256 key and its certificate, issued by `issuer` or (None) self-signed."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before = not_before or now - datetime.timedelta(minutes=5)
    not_after = not_after or now + datetime.timedelta(days=1)
    try:
        _with_cryptography(cert, key, kind, name, issuer, not_before, not_after)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _with_openssl(cert, key, kind, name, issuer, not_before, not_after)


def _with_openssl(
    cert: Path,
    key: Path,
    kind: Kind,
    name: str,
    issuer: tuple[Path, Path] | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> None:
    server_names = ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    signer = ["-cert", str(issuer[0]), "-keyfile", str(issuer[1])] if issuer else []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "ca.cnf").write_text(_CA_CONFIG)
        (work / "index.txt").write_text("")
        (work / "serial").write_text("01\n")
        subprocess.run(
            ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(work / "request.csr"), "-subj", f"/CN={name}",
             *(server_names if kind == "server" else [])],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["openssl", "ca", "-batch", "-config", "ca.cnf", "-extensions", f"{kind}_ext",
             *(signer or ["-selfsign", "-keyfile", str(key)]),
             "-in", "request.csr", "-out", str(cert), "-notext",
             "-startdate", _asn1(not_before), "-enddate", _asn1(not_after)],
            check=True, capture_output=True, cwd=work,
        )  # fmt: skip


def _asn1(when: datetime.datetime) -> str:
    """A date as `openssl ca` takes it (YYYYMMDDHHMMSSZ; it encodes it as RFC 5280 asks)."""
    return f"{when.astimezone(datetime.UTC):%Y%m%d%H%M%S}Z"


def _with_cryptography(
    cert_path: Path,
    key_path: Path,
    kind: Kind,
    name: str,
    issuer: tuple[Path, Path] | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = subject, key
    if issuer is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer[0].read_bytes()).subject
        loaded = serialization.load_pem_private_key(issuer[1].read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signing_key = loaded
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if kind == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    elif kind == "ca":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)  # as openssl writes it: the server warns of a key others can read
