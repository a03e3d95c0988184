"""The metric declarations: buckets that read quantiles honestly, and no sample for what
is not known."""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Histogram

from service.metrics import BATCH_SIZE_BUCKETS, DURATION_BUCKETS, Metrics


def _quantile(buckets: tuple[float, ...], values: list[float], q: float) -> float:
    """histogram_quantile as Prometheus computes it (linear within the bucket)."""
    registry = CollectorRegistry()
    histogram = Histogram("h", "h", buckets=buckets, registry=registry)
    for value in values:
        histogram.observe(value)
    bounds = [*buckets, float("inf")]
    counts = [registry.get_sample_value("h_bucket", {"le": _le(b)}) or 0.0 for b in bounds]
    rank = q * counts[-1]
    for i, count in enumerate(counts):
        if count >= rank:
            lower, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], counts[i - 1])
            return lower + (bounds[i] - lower) * (rank - below) / (count - below)
    raise AssertionError("unreachable")


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def test_duration_buckets_resolve_quantiles_and_carry_round_objectives() -> None:
    ratios = [b / a for a, b in itertools.pairwise(DURATION_BUCKETS)]
    assert max(ratios) < 1.3  # doubling buckets read a p90 40 % high
    assert DURATION_BUCKETS[0] <= 0.0005 and DURATION_BUCKETS[-1] >= 120.0
    for objective in (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0):
        assert objective in DURATION_BUCKETS
    # latencies spread over 0.30-0.36 s: p90 0.354 s; doubling buckets read 0.48 s
    values = [0.30 + 0.06 * i / 999 for i in range(1000)]
    assert abs(_quantile(DURATION_BUCKETS, values, 0.9) - 0.354) / 0.354 < 0.13
    doubling = tuple(0.0005 * 2**k for k in range(19))
    assert _quantile(doubling, values, 0.9) > 0.45


def test_batch_size_buckets_count_small_batches_exactly() -> None:
    assert BATCH_SIZE_BUCKETS[:16] == tuple(float(k) for k in range(1, 17))
    assert BATCH_SIZE_BUCKETS[-1] >= 512 and list(BATCH_SIZE_BUCKETS) == sorted(BATCH_SIZE_BUCKETS)
    # steps of 4 rows in a batch of 4: the median reads within the (3, 4] bucket
    assert 3.0 < _quantile(BATCH_SIZE_BUCKETS, [4.0] * 100, 0.5) <= 4.0


def test_the_certificate_expiry_has_no_sample_until_set() -> None:
    """Without TLS, no sample: a label-less Gauge's 0 would read as a long-expired
    certificate (and fire InferenceCertificateExpiresSoon)."""
    metrics = Metrics()
    name = "inference_tls_certificate_expiry_timestamp_seconds"
    assert metrics.registry.get_sample_value(name) is None
    metrics.tls_certificate_expiry.value = 1.9e9
    assert metrics.registry.get_sample_value(name) == 1.9e9
