"""Prometheus metrics (`kimi_engine_*`), in a registry of the app's own so that two apps in one process
(tests) do not share counters."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds: TTFT spans a demo-model prefill (ms) to a long Kimi prompt under load (minutes);
# TPOT a CPU demo step (ms) to a loaded multi-GPU step.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, host):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("kimi_engine_requests_running", "Sequences the engine is decoding", registry=r)
        self.waiting = Gauge("kimi_engine_requests_waiting", "Sequences queued for a batch slot", registry=r)
        # Read at scrape time: the engine's scheduler knows; an engine without one runs one request at a
        # time behind the host's lock, so the host's own count of taken slots stands in.
        self.running.set_function(lambda: self._engine_count(host, "num_running", running=True))
        self.waiting.set_function(lambda: self._engine_count(host, "num_waiting", running=False))
        self.prompt_tokens = Counter("kimi_engine_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("kimi_engine_prompt_tokens_cached",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("kimi_engine_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("kimi_engine_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("kimi_engine_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("kimi_engine_time_per_output_token_seconds",
                              "Mean seconds between a request's tokens after its first", buckets=_TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("kimi_engine_request_duration_seconds", "Request arrival to its last token",
                             buckets=_E2E_BUCKETS, registry=r)

    @staticmethod
    def _engine_count(host, name: str, running: bool) -> float:
        engine = host.engine
        if engine is None:
            return 0
        if hasattr(engine, name):
            return getattr(engine, name)
        taken = host.slots_taken
        return min(taken, 1) if running else max(taken - 1, 0)


class RequestTimer:
    """One request's timings: TTFT at its first output, TPOT, duration and token counts when it ends."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start = metrics, time.perf_counter()
        self.first: float | None = None

    def first_output(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)

    def finish(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, longest: int | None = None) -> None:
        """Counts what finished paths report (an aborted path reports nothing, so counts nothing).
        longest: the most tokens one path generated (TPOT is per path; paths decode side by side)."""
        longest = completion_tokens if longest is None else longest
        end = time.perf_counter()
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.cached_tokens.inc(cached_tokens)
        m.generation_tokens.inc(completion_tokens)
        m.e2e.observe(end - self.start)
        if self.first is not None and longest > 1:
            m.tpot.observe((end - self.first) / (longest - 1))
