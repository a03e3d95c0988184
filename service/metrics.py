"""Prometheus metrics of the inference service: the only place they are declared.

Names, labels and meanings follow the team's metrics spec (prefix `inference_`). Every
metric lives on one `CollectorRegistry` owned by a `Metrics` object, so tests (and several
servers in one process) create fresh ones instead of fighting over the global registry.
Durations are histograms in seconds with buckets from 0.5 ms to 125 s, ten per decade
(Renard's R10 series: 1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8), because the client
defaults (5 ms-10 s) cut off long generations and hide sub-millisecond steps, and doubling
buckets read quantiles up to 40 % high. The round values (0.1, 0.25, 0.5, 1, 2.5, 5, 10 s)
are bucket bounds, for latency objectives.
The client's `*_created` timestamp series are turned off: they would double the series an
operator stores and no dashboard or alert here reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
disable_created_metrics()

# The `model` label of a call naming a model not served, or refused before its request was
# read: what callers send never becomes a label value.
UNKNOWN_MODEL_LABEL = "unknown"

_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
# 0.5 ms to 125 s, ten a decade: a quantile read from them is within about 13 % of the truth.
DURATION_BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 6) for e in range(-4, 3) for m in _R10 if 5e-4 <= m * 10.0**e <= 125
)
# Rows per decode step: every size up to 16, then about a quarter apart, up to 512.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (
    *(float(k) for k in range(1, 17)),
    *(20.0, 24.0, 32.0, 40.0, 48.0, 64.0, 80.0, 96.0, 128.0),
    *(160.0, 192.0, 256.0, 320.0, 384.0, 512.0),
)
RATIO_BUCKETS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(14))  # 1 .. 8192


class Metrics:
    """All service metrics on one registry (default: a new, private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "inference_request_duration_seconds",
            'Whole RPC duration by gRPC status name (latency objectives read code="OK": '
            "refusals answered at once would flatter them).",
            ["method", "model", "code"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "inference_queue_duration_seconds",
            "From a sequence's arrival in the queue to the engine taking it in (its encoding "
            "or prefill starts), or to its leaving the queue unserved (cancelled, deadline, "
            "shutdown, a failed engine).",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "inference_time_to_first_token_seconds",
            "From a sequence's arrival in the queue to the end of the step that generated its "
            "first token (none for a sequence whose first step gave EOS). A beam search's "
            "tokens are final only as they settle: its first settled token, observed for "
            "streams (a unary beam search's come together at its end).",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "inference_inter_token_latency_seconds",
            "Between the ends of the steps that generated two consecutive tokens of one "
            "sequence (per token: a stream that fell behind gets several in one message). "
            "A beam search's between settled tokens (0 between tokens that settle together), "
            "observed for streams.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.decode_step_duration = Histogram(
            "inference_decode_step_duration_seconds",
            "One engine step (admission work included).",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Rows (sequences and beams) per decode step.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_padding_ratio = Histogram(
            "inference_batch_padding_ratio",
            "Rows of a decode step that hold no sequence / rows it ran.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.admission_padding_ratio = Histogram(
            "inference_admission_padding_ratio",
            "Padding tokens / tokens of the batch a translator encodes (or a generator "
            "prefills) for the sequences that join one step.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.request_input_tokens = Histogram(
            "inference_request_input_tokens",
            "Input tokens per sequence admitted to a batch.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_output_tokens = Histogram(
            "inference_request_output_tokens",
            "Output tokens per sequence that reached the engine: a finished one's "
            "usage.output_tokens (every returned hypothesis; none past a stop string), one "
            "cut short (cancelled, deadline) the steps it decoded.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "inference_requests",  # exposed as inference_requests_total
            "Finished RPCs by gRPC status name.",
            ["method", "model", "code"],
            registry=r,
        )
        self.request_failures = Counter(
            "inference_request_failures",  # exposed as inference_request_failures_total
            "Calls that did not end OK, by why (one word; what a status code alone cannot "
            "tell apart). The server's side: queue_full, too_many_calls, "
            "response_too_large, deadline_unmeetable, deadline_exceeded, loading, draining, "
            "retired, engine_failed, internal. The caller's: invalid_argument, "
            "model_not_found, unauthenticated, request_too_large, request_timeout, "
            "request_cut (grpc ended a call whose request had not arrived whole: its client "
            "went away, or it was over 2 x the max message size), cancelled (its client "
            "cancelled or went away, or grpc cut it at its connection's max age and grace).",
            ["method", "model", "reason"],
            registry=r,
        )
        self.input_tokens = Counter(
            "inference_input_tokens",
            "Input tokens of the sequences admitted to a batch.",
            ["model"],
            registry=r,
        )
        self.output_tokens = Counter(
            "inference_output_tokens",
            "Output tokens: finished sequences' usage.output_tokens (every returned "
            "hypothesis), and the steps decoded by those cut short (cancelled, deadline).",
            ["model"],
            registry=r,
        )
        self.open_calls = Gauge(
            "inference_open_calls",
            "Calls the server holds, in any state (request arriving, queued, decoding, "
            "streaming, or an answer its caller has not read yet); SERVE_MAX_CALLS bounds "
            "it, and calls over it are refused.",
            registry=r,
        )
        self.open_calls_limit = Gauge(
            "inference_open_calls_limit",
            "SERVE_MAX_CALLS: the open calls (inference_open_calls) past which new calls are "
            "refused (too_many_calls); InferenceOpenCallsNearLimit compares the two.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth",
            "Sequences waiting for admission.",
            ["model", "version"],
            registry=r,
        )
        self.running_sequences = Gauge(
            "inference_running_sequences",
            "Sequences in the running batch.",
            ["model", "version"],
            registry=r,
        )
        self.running_rows = Gauge(
            "inference_running_rows",
            "Rows of the running batch: one per greedy or sampled sequence, beam_size per "
            "beam search (what a step's cost grows with; the autoscaler's signal).",
            ["model", "version"],
            registry=r,
        )
        self.free_cache_slots = Gauge(
            "inference_free_cache_slots",
            "Rows the running batch can still take (max_batch_size - running rows; 0 while "
            "a batch runs in the static batching modes, which take none in until it ends).",
            ["model", "version"],
            registry=r,
        )
        self.model_ready = Gauge(
            "inference_model_ready",
            "1 when the model version serves; 0 while its folder fails to load, after its "
            "engine stopped, and once a drain has ended (during one it finishes its calls "
            "and reads 1; health reads NOT_SERVING); no series once it is retired.",
            ["model", "version"],
            registry=r,
        )  # fmt: skip
        self.estimated_queue_wait = Gauge(
            "inference_estimated_queue_wait_seconds",
            "Admission estimate of the queue wait of a request arriving now (one row, "
            "costing the token budget what recent requests did).",
            ["model", "version"],
            registry=r,
        )
        self.cuda_graphs = Gauge(
            "inference_cuda_graphs",
            "1 while a GPU model version's decode steps replay as CUDA graphs, 0 once they "
            "fell back to plain runs (the log says why); absent on CPU or with graphs off.",
            ["model", "version"],
            registry=r,
        )
        self.gpu_memory_used = GpuMemoryCollector()
        r.register(self.gpu_memory_used)
        self.tls_certificate_expiry = UnsetGauge(
            "inference_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate the gRPC port serves (its chain's first, the "
            "leaf), in Unix seconds: the server reads it at start only, so a process not "
            "restarted after a renewal serves the old one until clients refuse it. No sample "
            "without TLS, or when its dates could not be read (the log says why).",
        )
        r.register(self.tls_certificate_expiry)

    def observe_request(
        self, method: str, model: str, code: str, seconds: float, reason: str | None = None
    ) -> None:
        """One finished RPC (called by the transport); `reason` is why it failed, None
        when it ended OK."""
        self.request_duration.labels(method=method, model=model, code=code).observe(seconds)
        self.requests.labels(method=method, model=model, code=code).inc()
        if reason is not None:
            self.request_failures.labels(method=method, model=model, reason=reason).inc()


class UnsetGauge(Collector):
    """A gauge without labels and without a sample until `value` is set: a label-less
    prometheus_client Gauge always exposes one (0 at first), which an alert would read."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value: float | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class GpuMemoryCollector(Collector):
    """inference_gpu_memory_used_bytes{device}: read at scrape time from `read` (NVML, set
    by the server when a model runs on CUDA); no samples while `read` is None (CPU)."""

    NAME = "inference_gpu_memory_used_bytes"
    HELP = "GPU memory in use on the device, all processes (NVML), by CUDA device id."

    def __init__(self) -> None:
        self.read: Callable[[], dict[str, int]] | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])
        if self.read is not None:
            try:
                for device, used in sorted(self.read().items()):
                    family.add_metric([device], float(used))
            except Exception as error:  # a failing driver must not break the scrape
                log.warning("cannot read GPU memory: %s", error)
        yield family


__all__ = [
    "BATCH_SIZE_BUCKETS",
    "DURATION_BUCKETS",
    "RATIO_BUCKETS",
    "TOKEN_BUCKETS",
    "GpuMemoryCollector",
    "Metrics",
    "UnsetGauge",
]
