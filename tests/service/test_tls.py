"""The served certificate's validity: read by a DER walk (the serving image has no
`cryptography`) from certificates openssl makes, refused with a reason for anything else,
and checked at start (exported, warned about before it runs out)."""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.tls import (
    EXPIRY_WARNING,
    CertificateError,
    check_key_permissions,
    check_served_certificate,
    read_validity,
)
from tests._tls import self_signed


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def _pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (short or long form length)."""
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | 2]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _certificate(validity: bytes, version: bool = True) -> bytes:
    """A certificate's DER down to its validity (what the walk reads; the rest is filler)."""
    name = _tlv(0x30, _tlv(0x31, _tlv(0x30, _tlv(0x06, b"\x55\x04\x03") + _tlv(0x0C, b"x"))))
    tbs = (
        (_tlv(0xA0, _tlv(0x02, b"\x02")) if version else b"")
        + _tlv(0x02, b"\x01")
        + _tlv(0x30, _tlv(0x06, b"\x2a\x86\x48\xce\x3d\x04\x03\x02"))
        + name
        + _tlv(0x30, validity)
        + name
        + _tlv(0x30, b"\x00" * 200)  # subjectPublicKeyInfo: long-form lengths follow
    )
    return _tlv(0x30, _tlv(0x30, tbs) + _tlv(0x30, b"") + _tlv(0x03, b"\x00"))


@pytest.mark.parametrize(
    ("not_before", "not_after", "tags"),
    [
        # UTCTime both sides of RFC 5280's pivot: 50 is 1950, 49 is 2049.
        (datetime(1950, 1, 1, tzinfo=UTC), datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
         (b"\x17\x0d500101000000Z", b"\x17\x0d491231235959Z")),
        # From 2050 on, GeneralizedTime.
        (datetime(2050, 1, 1, tzinfo=UTC), datetime(2051, 6, 15, 12, 0, 0, tzinfo=UTC),
         (b"\x18\x0f20500101000000Z", b"\x18\x0f20510615120000Z")),
    ],
)  # fmt: skip
def test_reads_the_dates_of_openssl_certificates(
    tmp_path: Path, not_before: datetime, not_after: datetime, tags: tuple[bytes, bytes]
) -> None:
    cert, _ = self_signed(tmp_path, not_before, not_after)
    der = _der(cert)
    assert all(tag in der for tag in tags), "the certificate is not encoded as the case needs"
    assert read_validity(cert.read_bytes()) == (validity := read_validity(_pem(der)))
    assert (validity.not_before, validity.not_after) == (not_before, not_after)


def test_reads_the_leaf_of_a_chain(tmp_path: Path) -> None:
    """A chain file holds the server's own certificate first: that is the one clients check."""
    (tmp_path / "leaf").mkdir()
    (tmp_path / "issuer").mkdir()
    leaf, _ = self_signed(tmp_path / "leaf", not_after=datetime(2030, 1, 2, tzinfo=UTC))
    issuer, _ = self_signed(tmp_path / "issuer", not_after=datetime(2029, 1, 1, tzinfo=UTC))
    chain = b"# a comment before\n" + leaf.read_bytes() + issuer.read_bytes()
    assert read_validity(chain).not_after == datetime(2030, 1, 2, tzinfo=UTC)


def test_a_version_1_certificate_has_no_version_field() -> None:
    validity = _tlv(0x17, b"250101000000Z") + _tlv(0x18, b"20500101000000Z")
    for version in (True, False):
        read = read_validity(_pem(_certificate(validity, version)))
        assert read.not_before == datetime(2025, 1, 1, tzinfo=UTC)
        assert read.not_after == datetime(2050, 1, 1, tzinfo=UTC)


_TIMES = _tlv(0x17, b"250101000000Z") + _tlv(0x17, b"260101000000Z")


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (b"", "no -----BEGIN CERTIFICATE----- block"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no -----BEGIN"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "not base64"),
        (_pem(b"garbage"), "Certificate: expected tag 0x30, found 0x67"),
        (_pem(_certificate(_TIMES)[:40]), "truncated"),
        (_pem(b"\x30\x80" + _certificate(_TIMES)[2:]), "Certificate: invalid length"),
        (_pem(_certificate(_tlv(0x04, b"250101000000Z") + _TIMES)),
         "notBefore: tag 0x04 is neither UTCTime nor GeneralizedTime"),
        (_pem(_certificate(_tlv(0x17, b"2501010000Z") + _TIMES)),  # no seconds
         "notBefore: b'2501010000Z' is not in the form RFC 5280 requires"),
        (_pem(_certificate(_TIMES[:15] + _tlv(0x18, b"20261301000000Z"))),
         "notAfter: 20261301000000Z is no date (month must be in 1..12)"),
        (_pem(_certificate(_TIMES[:15] + _tlv(0x18, b"20260101000000.5Z"))),  # a fraction
         "notAfter: b'20260101000000.5Z' is not in the form RFC 5280 requires"),
        (_pem(_certificate(_TIMES[:15])), "notAfter: truncated at byte"),
    ],
)  # fmt: skip
def test_anything_else_is_refused_with_a_reason(pem: bytes, reason: str) -> None:
    with pytest.raises(CertificateError) as info:
        read_validity(pem)
    assert reason in str(info.value)


# --- the check at start ----------------------------------------------------------------


def _check(path: Path, now: datetime, caplog: pytest.LogCaptureFixture) -> float | None:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.tls"):
        return check_served_certificate(path, now)


def test_the_check_warns_before_expiry_and_errs_outside_the_validity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start, end = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 3, 1, 12, tzinfo=UTC)
    cert, _ = self_signed(tmp_path, start, end)

    assert _check(cert, end - EXPIRY_WARNING - timedelta(seconds=1), caplog) == end.timestamp()
    assert caplog.records == []  # more than 14 days left: nothing to say

    assert _check(cert, end - timedelta(days=3), caplog) == end.timestamp()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert f"{cert} expires on 2030-03-01 12:00:00 UTC, in 3.0 days" in record.getMessage()
    assert "renew it and restart" in record.getMessage()

    assert _check(cert, end, caplog) == end.timestamp()
    [record] = caplog.records
    assert record.levelname == "ERROR" and "expired on 2030-03-01 12:00:00 UTC" in record.message
    assert "renew it and restart" in record.message

    assert _check(cert, start - timedelta(minutes=1), caplog) == end.timestamp()
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert "is not valid before 2030-01-01 00:00:00 UTC" in record.message
    assert "clock" in record.message


def test_a_certificate_it_cannot_read_is_named_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = tmp_path / "tls.crt"
    garbage.write_bytes(_pem(b"garbage"))
    for path, why in ((garbage, "expected tag 0x30"), (tmp_path / "gone.crt", "No such file")):
        assert _check(path, datetime.now(UTC), caplog) is None
        [record] = caplog.records
        assert record.levelname == "WARNING"
        assert f"TLS certificate {path} (" in record.message and why in record.message
        assert "inference_tls_certificate_expiry_timestamp_seconds" in record.message


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o440, False), (0o644, True)])
def test_a_private_key_open_to_every_user_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    """Any local user who can read the key can impersonate the server; the group may (a
    Kubernetes Secret volume shares it with the pod's fsGroup)."""
    _, key = self_signed(tmp_path)
    key.chmod(mode)
    with caplog.at_level(logging.INFO, logger="service.tls"):
        check_key_permissions(key)
    assert [r.levelname for r in caplog.records] == (["WARNING"] if warned else [])
    if warned:
        assert f"{key} is open to every user of this machine (mode 0644)" in caplog.text
        assert f"chmod 600 {key}" in caplog.text
