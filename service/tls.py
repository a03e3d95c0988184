"""The validity period of the TLS certificate the gRPC port serves, and the start-up check
that exports it and warns before it runs out; and the start-up check that its private key
is not left readable by every user of the machine.

The server reads its certificate at start only, so a process not restarted after a renewal
serves the old one until clients refuse it. The serving image has no `cryptography`, and
`ssl` shows a certificate's dates only for a peer's, so `read_validity` walks the few DER
elements before the validity of the PEM file's first certificate (the leaf, RFC 5280 4.1):

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
        serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name,
        validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

# What InferenceCertificateExpiresSoon (deploy/monitoring/alerts.rules.yml) warns at, too.
EXPIRY_WARNING = timedelta(days=14)

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _INTEGER, _VERSION = 0x30, 0x02, 0xA0
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18


class CertificateError(ValueError):
    """No certificate whose validity this module can read (the message says why)."""


@dataclass(frozen=True)
class Validity:
    """A certificate's validity period (timezone-aware, UTC)."""

    not_before: datetime
    not_after: datetime


def read_validity(pem: bytes) -> Validity:
    """The validity of the first certificate of a PEM chain (the leaf: a server sends its
    own certificate first). Raises CertificateError."""
    match = _PEM.search(pem)
    if match is None:
        raise CertificateError("no -----BEGIN CERTIFICATE----- block")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error as error:
        raise CertificateError(f"the first certificate is not base64 ({error})") from None
    _, start, stop = _element(der, 0, len(der), "Certificate", _SEQUENCE)
    _, at, end = _element(der, start, stop, "tbsCertificate", _SEQUENCE)
    tag, _, after = _element(der, at, end, "serialNumber")
    if tag == _VERSION:  # absent from a version 1 certificate
        tag, _, after = _element(der, after, end, "serialNumber")
    if tag != _INTEGER:
        raise CertificateError(f"serialNumber: expected tag 0x02, found 0x{tag:02x}")
    for name in ("signature", "issuer"):
        _, _, after = _element(der, after, end, name, _SEQUENCE)
    _, at, end = _element(der, after, end, "validity", _SEQUENCE)
    tag, start, after = _element(der, at, end, "notBefore")
    not_before = _time(tag, der[start:after], "notBefore")
    tag, start, stop = _element(der, after, end, "notAfter")
    return Validity(not_before, _time(tag, der[start:stop], "notAfter"))


def _element(
    der: bytes, at: int, end: int, name: str, expected: int | None = None
) -> tuple[int, int, int]:
    """The DER element at der[at:end] as (tag, start, stop) of its contents."""
    if at + 2 > end:
        raise CertificateError(f"{name}: truncated at byte {at}")
    tag, first = der[at], der[at + 1]
    if expected is not None and tag != expected:
        raise CertificateError(f"{name}: expected tag 0x{expected:02x}, found 0x{tag:02x}")
    start = at + 2
    if first < 0x80:
        length = first
    else:  # long form; 0x80 (indefinite) is BER, not DER
        count = first & 0x7F
        if not 1 <= count <= 4 or start + count > end:
            raise CertificateError(f"{name}: invalid length at byte {at + 1}")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > end:
        raise CertificateError(f"{name}: truncated ({length} bytes announced at byte {at})")
    return tag, start, start + length


def _time(tag: int, value: bytes, name: str) -> datetime:
    """UTCTime YYMMDDHHMMSSZ (RFC 5280 4.1.2.5.1: YY ≥ 50 is 19YY, below 20YY) or
    GeneralizedTime YYYYMMDDHHMMSSZ (4.1.2.5.2), the forms RFC 5280 allows."""
    if tag == _UTC_TIME and re.fullmatch(rb"\d{12}Z", value):
        yy = int(value[:2])
        year, rest = (1900 if yy >= 50 else 2000) + yy, value[2:12]
    elif tag == _GENERALIZED_TIME and re.fullmatch(rb"\d{14}Z", value):
        year, rest = int(value[:4]), value[4:14]
    elif tag in (_UTC_TIME, _GENERALIZED_TIME):
        raise CertificateError(f"{name}: {value!r} is not in the form RFC 5280 requires")
    else:
        raise CertificateError(f"{name}: tag 0x{tag:02x} is neither UTCTime nor GeneralizedTime")
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as error:
        raise CertificateError(f"{name}: {value.decode()} is no date ({error})") from None


def check_served_certificate(path: Path, now: datetime) -> float | None:
    """At start: the notAfter of the certificate in `path` as Unix seconds (None when it
    cannot be read), logged at WARNING when it runs out within EXPIRY_WARNING, at ERROR when
    it is out of its validity. The server starts either way: a client judges validity by
    its own clock, and the plaintext health port and the metrics (the alert) stay useful."""
    try:
        validity = read_validity(path.read_bytes())
    except (OSError, CertificateError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        log.warning(
            "cannot read the validity of the TLS certificate %s (%s): no "
            "inference_tls_certificate_expiry_timestamp_seconds, so no alert warns before "
            "it expires; check its dates with `openssl x509 -noout -dates -in %s`",
            path,
            reason,
            path,
        )
        return None
    extra = {
        "tls_cert": str(path),
        "not_before": validity.not_before.isoformat(),
        "not_after": validity.not_after.isoformat(),
    }
    if validity.not_after <= now:
        log.error(
            "the TLS certificate %s expired on %s: clients refuse the handshake; renew it "
            "and restart the server (it reads the certificate at start only)",
            path,
            f"{validity.not_after:%Y-%m-%d %H:%M:%S} UTC",
            extra=extra,
        )
    elif validity.not_before > now:
        log.error(
            "the TLS certificate %s is not valid before %s: clients whose clocks agree with "
            "this machine's refuse the handshake; check this machine's clock, or serve a "
            "certificate valid now and restart the server",
            path,
            f"{validity.not_before:%Y-%m-%d %H:%M:%S} UTC",
            extra=extra,
        )
    elif validity.not_after - now < EXPIRY_WARNING:
        log.warning(
            "the TLS certificate %s expires on %s, in %.1f days: renew it and restart the "
            "server (it reads the certificate at start only)",
            path,
            f"{validity.not_after:%Y-%m-%d %H:%M:%S} UTC",
            (validity.not_after - now) / timedelta(days=1),
            extra=extra,
        )
    return validity.not_after.timestamp()


def check_key_permissions(path: Path) -> None:
    """At start: warn when the private key in `path` is readable or writable by any user of
    the machine (any of the "other" permission bits set), who could then impersonate the
    server. Group access is left alone: a Kubernetes Secret volume shares the key with the
    pod's fsGroup (k8s/components/tls sets mode 0440). The server starts either way, as
    with the certificate's dates."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IRWXO:
        log.warning(
            "the TLS private key %s is open to every user of this machine (mode %04o): "
            "restrict it, e.g. `chmod 600 %s` (in Kubernetes, the Secret volume's "
            "defaultMode 0440 or 0400)",
            path,
            mode,
            path,
            extra={"tls_key": str(path)},
        )
