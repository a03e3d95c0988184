"""A self-signed certificate for the TLS tests (server, settings, deploy manifests)."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# `openssl ca` signs with the validity dates given; `openssl req -x509` (OpenSSL 3.0) takes
# a number of days from now only.
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
x509_extensions = self_signed
[anything]
commonName = supplied
[self_signed]
basicConstraints = critical, CA:TRUE
subjectKeyIdentifier = hash
"""


def self_signed(
    directory: Path,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 (cryptography, else openssl CLI),
    valid from not_before (default 5 minutes ago) to not_after (default a day from now),
    whole seconds, UTC. Dates from 2050 on are encoded as GeneralizedTime, earlier ones as
    UTCTime (RFC 5280)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before = not_before or now - datetime.timedelta(minutes=5)
    not_after = not_after or now + datetime.timedelta(days=1)
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key, not_before, not_after)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _with_openssl(cert, key, not_before, not_after)
    return cert, key


def _with_openssl(
    cert: Path, key: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "ca.cnf").write_text(_CA_CONFIG)
        (work / "index.txt").write_text("")
        (work / "serial").write_text("01\n")
        subprocess.run(
            ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(work / "request.csr"), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", str(key),
             "-in", "request.csr", "-out", str(cert), "-notext",
             "-startdate", _asn1(not_before), "-enddate", _asn1(not_after)],
            check=True, capture_output=True, cwd=work,
        )  # fmt: skip


def _asn1(when: datetime.datetime) -> str:
    """A date as `openssl ca` takes it (YYYYMMDDHHMMSSZ; it encodes it as RFC 5280 asks)."""
    return f"{when.astimezone(datetime.UTC):%Y%m%d%H%M%S}Z"


def _with_cryptography(
    cert_path: Path, key_path: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
