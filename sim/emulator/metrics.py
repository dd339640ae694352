"""``/metrics`` of an emulated instance, under vLLM's or SGLang's metric names.

Each instance has its own registry (one process serves several instances on
several ports). The names and label names are the real servers' (vLLM's v1
``PrometheusStatLogger``: ``vllm:*`` with ``model_name`` and ``engine``;
SGLang's ``MetricsCollector``: ``sglang:*`` with ``model_name``), so a
dashboard or a router polling them reads the emulator as it reads the real
thing. Only the metrics the engine model can give are exported; latencies
are emulated seconds. Gauges are read from the engine when scraped.

One metric is the emulator's own: ``llmsched_emulator_loop_lag_seconds``
(how late the last step end ran, wall seconds) and its maximum, so a run
whose client or server was CPU-starved says so.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sim.emulator.instance import EmulatedInstance, TokenStream

__all__ = ["METRICS_CONTENT_TYPE", "InstanceMetrics", "SglangMetrics", "VllmMetrics"]

#: Prometheus text exposition, as both servers send it.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class InstanceMetrics:
    """The registry of one instance and the emulator's own loop-lag gauges."""

    #: Set by each server's subclass; the base counts first and later tokens into them.
    ttft: Histogram
    itl: Histogram
    generation: Counter

    def __init__(self, instance: EmulatedInstance, model: str, labels: dict[str, str]) -> None:
        self.instance = instance
        self.model = model
        self.labels = labels
        self.registry = CollectorRegistry(auto_describe=True)
        self._lag = Gauge(
            "llmsched_emulator_loop_lag_seconds",
            "How late the emulator's last step end ran on the event loop (wall seconds).",
            registry=self.registry,
        )
        self._lag_max = Gauge(
            "llmsched_emulator_loop_lag_max_seconds",
            "Worst event-loop lag of a step end since start (wall seconds).",
            registry=self.registry,
        )
        instance.add_hooks(self)

    def refresh(self) -> None:
        """Set the gauges from the engine (called on each scrape)."""
        self._lag.set(self.instance.loop_lag_s)
        self._lag_max.set(self.instance.max_loop_lag_s)

    def render(self) -> bytes:
        """The exposition text."""
        self.refresh()
        return generate_latest(self.registry)

    # Metric families labelled with the server's labels, in this instance's registry.
    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, list(self.labels), registry=self.registry).labels(**self.labels)

    def counter(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, list(self.labels), registry=self.registry).labels(**self.labels)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        family = Histogram(name, doc, list(self.labels), buckets=buckets, registry=self.registry)
        return family.labels(**self.labels)

    # Hooks (EmulatedInstance.add_hooks). Both servers count tokens alike; the rest differs.
    def on_start(self, s: TokenStream) -> None: ...

    def on_first_token(self, s: TokenStream) -> None:
        self.ttft.observe(s.first_token_s - s.arrival_s)
        self.generation.inc()

    def on_token(self, s: TokenStream, gap_s: float) -> None:
        self.itl.observe(gap_s)
        self.generation.inc()

    def on_finish(self, s: TokenStream) -> None: ...


class VllmMetrics(InstanceMetrics):
    """vLLM's names (``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ...)."""

    def __init__(self, instance: EmulatedInstance, model: str) -> None:
        super().__init__(instance, model, {"model_name": model, "engine": "0"})

        self.running = self.gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.waiting = self.gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_usage = self.gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prompt = self.counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation = self.counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.queries = self.counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.hits = self.counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*self.labels, "finished_reason"],
            registry=self.registry,
        )
        self.success = success.labels(**self.labels, finished_reason="length")
        self.ttft = self.histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.itl = self.histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        )
        self.e2e = self.histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _E2E_BUCKETS,
        )
        self.req_prompt = self.histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", _token_buckets()
        )
        self.req_gen = self.histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            _token_buckets(),
        )

    def refresh(self) -> None:
        super().refresh()
        inst = self.instance
        self.running.set(inst.n_running)
        self.waiting.set(inst.n_waiting)
        self.kv_usage.set(inst.kv_usage)

    def on_start(self, s: TokenStream) -> None:
        self.queries.inc(s.prompt_tokens)
        self.hits.inc(s.cached_tokens)

    def on_finish(self, s: TokenStream) -> None:
        self.prompt.inc(s.prompt_tokens)
        self.success.inc()
        self.e2e.observe(s.finish_s - s.arrival_s)
        self.req_prompt.observe(s.prompt_tokens)
        self.req_gen.observe(s.n_tokens)


class SglangMetrics(InstanceMetrics):
    """SGLang's names (``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ...)."""

    def __init__(self, instance: EmulatedInstance, model: str) -> None:
        super().__init__(instance, model, {"model_name": model})

        self.running = self.gauge("sglang:num_running_reqs", "The number of running requests.")
        self.queue = self.gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue."
        )
        self.used = self.gauge("sglang:num_used_tokens", "The number of used tokens.")
        self.token_usage = self.gauge("sglang:token_usage", "The token usage.")
        self.hit_rate = self.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.prompt = self.counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation = self.counter(
            "sglang:generation_tokens", "Number of generation tokens processed."
        )
        self.cached = self.counter("sglang:cached_tokens", "Number of cached prompt tokens.")
        self.requests = self.counter("sglang:num_requests", "Number of requests processed.")
        self.ttft = self.histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.itl = self.histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        )
        self.e2e = self.histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            _E2E_BUCKETS,
        )

    def refresh(self) -> None:
        super().refresh()
        inst = self.instance
        self.running.set(inst.n_running)
        self.queue.set(inst.n_waiting)
        self.used.set(inst.kv_used_tokens)
        self.token_usage.set(inst.kv_usage)
        prompt = inst.prompt_tokens_total
        self.hit_rate.set(inst.cached_tokens_total / prompt if prompt else 0.0)

    def on_start(self, s: TokenStream) -> None:
        self.prompt.inc(s.prompt_tokens)
        self.cached.inc(s.cached_tokens)

    def on_finish(self, s: TokenStream) -> None:
        self.requests.inc()
        self.e2e.observe(s.finish_s - s.arrival_s)


def _token_buckets() -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to 100k tokens (vLLM's 1-2-5 series)."""
    out: list[float] = []
    base = 1
    while base <= 100_000:
        out += [m * base for m in (1, 2, 5) if m * base <= 100_000]
        base *= 10
    return tuple(out)
