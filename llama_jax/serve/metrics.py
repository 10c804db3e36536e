"""The server's Prometheus metrics (`GET /metrics`), with prometheus_client, under vLLM's metric names so that
dashboards and alerts written for vLLM read them:

    vllm:num_requests_running, vllm:num_requests_waiting         requests in slots (prefilling or decoding), queued
    vllm:kv_cache_usage_perc                                      share of the page pool in use (0-1)
    vllm:num_preemptions_total                                    sequences preempted when the pool ran out
    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total prompt tokens looked up in the prefix cache, found
    vllm:prompt_tokens_total, vllm:generation_tokens_total        tokens of finished requests
    vllm:request_success_total{finished_reason}                   finished requests by reason
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds

Each metric carries the `model_name` label: a request's counters and latencies the model it asked for — the base
model or one of its LoRA adapters —, the engine's gauges the base model's. The engine's status (`EngineStatus`)
is read when the metrics are scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama_jax.inference.types import EngineStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Buckets in seconds, as vLLM's (their range covers a CPU's tens of milliseconds and an accelerator's few).
_LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_INTER_TOKEN = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)


class ServerMetrics:
    def __init__(self, status: Callable[[], EngineStatus], model_name: str):
        """`status()`: the engine's, read at each scrape."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(status, model_name))
        labels = ["model_name"]

        def counter(name, text, extra=()):
            return Counter(name, text, labels + list(extra), registry=self.registry)

        def histogram(name, text, buckets):
            return Histogram(name, text, labels, buckets=buckets, registry=self.registry)

        self.model_name = model_name
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens of finished requests.")
        self.success = counter("vllm:request_success", "Finished requests.", ["finished_reason"])
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to the first token.", _LATENCY)
        self.inter_token = histogram("vllm:inter_token_latency_seconds", "Time between tokens.", _INTER_TOKEN)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def tokens(self, model: str, seconds: float, count: int) -> None:
        """`count` tokens of a request to `model` that arrived `seconds` after the ones before them."""
        for _ in range(count):
            self.inter_token.labels(model).observe(seconds / count)

    def finished(self, model: str, prompt_tokens: int, generated: int, seconds: float, reasons: list[str]) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.e2e.labels(model).observe(seconds)
        for reason in reasons:
            self.success.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    """The gauges and counters the engine keeps itself, read at each scrape."""

    def __init__(self, status: Callable[[], EngineStatus], model_name: str):
        self.status, self.model_name = status, model_name

    def collect(self):
        now = self.status()

        def family(kind, name, text, value):
            metric = kind(name, text, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            return metric

        yield family(
            GaugeMetricFamily, "vllm:num_requests_running", "Requests in a slot: prefilling or decoding.", now.running
        )
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests queued for a slot.", now.waiting)
        usage = now.positions_used / now.positions
        yield family(
            GaugeMetricFamily, "vllm:kv_cache_usage_perc", "Share of the KV cache's pages in use (0-1).", usage
        )
        queried = "Prompt tokens looked up in the prefix cache."
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries", queried, now.prefix_queried_tokens)
        hits = "Prompt tokens found in the prefix cache."
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits", hits, now.prefix_hit_tokens)
        preempted = "Sequences preempted because the KV cache pool ran out (recomputed later)."
        yield family(CounterMetricFamily, "vllm:num_preemptions", preempted, now.preemptions)
