"""Prometheus metrics of a running engine, under vLLM's metric names (so that dashboards built for
vLLM work unchanged), with ``prometheus_client``.

:class:`PrometheusStatLogger` is called on the engine thread after every step (and after requests
are added or aborted); it reads the engine's gauges and the step's :class:`StepStats`. Counters get
``prometheus_client``'s ``_total`` suffix, as vLLM's do (``vllm:prompt_tokens_total``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from .engine.llm_engine import LLMEngine

disable_created_metrics()  # no `*_created` series, as vLLM's /metrics

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class PrometheusStatLogger:
    """The engine's metrics in a registry of their own (``render()`` gives the text format)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self._values = {"model_name": model_name, "engine": "0"}
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(**self._values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(**self._values)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(**self._values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (0 to 1).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.")
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _LATENCY_BUCKETS)  # fmt: skip
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _LATENCY_BUCKETS)  # fmt: skip
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _LATENCY_BUCKETS)  # fmt: skip
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                        _TOKEN_BUCKETS)  # fmt: skip
        self.request_generation = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            _TOKEN_BUCKETS)  # fmt: skip
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Number of tokens per engine step.",
                                          _TOKEN_BUCKETS)  # fmt: skip
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*labels, "finished_reason"], registry=reg)  # fmt: skip
        self._seen = {"queries": 0, "hits": 0, "preemptions": 0}

    def __call__(self, engine: LLMEngine, stepped: bool) -> None:
        """Update from ``engine``: its gauges always, the last step's counts when ``stepped``."""
        sched = engine.scheduler.stats()
        self.running.set(sched.num_running)
        self.waiting.set(sched.num_waiting)
        self.kv_usage.set(sched.kv_cache_usage)
        for key, now, metric in (
            ("queries", sched.prefix_cache_queried_tokens, self.prefix_queries),
            ("hits", sched.prefix_cache_hit_tokens, self.prefix_hits),
            ("preemptions", sched.num_preemptions, self.preemptions),
        ):
            if now > self._seen[key]:
                metric.inc(now - self._seen[key])
            self._seen[key] = now
        if not stepped:
            return
        s = engine.last_step
        self.iteration_tokens.observe(s.num_scheduled_tokens)
        self.prompt_tokens.inc(s.num_prompt_tokens)
        self.generation_tokens.inc(s.num_generation_tokens)
        self.spec_drafts.inc(s.num_drafts)
        self.spec_draft_tokens.inc(s.num_draft_tokens)
        self.spec_accepted.inc(s.num_accepted_tokens)
        for v in s.ttfts:
            self.ttft.observe(v)
        for v in s.inter_token_latencies:
            self.itl.observe(v)
        for reason, e2e, prompt_len, gen_len in s.finished:
            self.e2e.observe(e2e)
            self.request_prompt.observe(prompt_len)
            self.request_generation.observe(gen_len)
            self._success.labels(**self._values, finished_reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
