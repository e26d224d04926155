"""Prometheus metrics of one server app, on its own CollectorRegistry (several apps can live
in one process, e.g. in tests, without clashing on the global registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "gpt_engine_"
# latency buckets from CPU-tiny (ms) to GPU-large-under-load (tens of s)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request arrival to last token",
                             buckets=_E2E, registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
                              registry=r)
        self.spec_rate = Gauge(PREFIX + "spec_decode_acceptance_rate", "Draft tokens accepted / proposed",
                               registry=r)
        self.spec_length = Gauge(PREFIX + "spec_decode_mean_accepted_length",
                                 "Tokens a verification step emits on average (accepted drafts + 1)", registry=r)
        # the engine's own running totals (stats key -> counter), as vLLM's prefix_cache_* and num_preemptions
        self.engine_counters = {
            "prefix_cache_query_tokens": Counter(PREFIX + "prefix_cache_queries",
                                                 "Prompt tokens looked up in the prefix cache", registry=r),
            "prefix_cache_hit_tokens": Counter(PREFIX + "prefix_cache_hits",
                                               "Prompt tokens found in the prefix cache", registry=r),
            "num_preemptions": Counter(PREFIX + "num_preemptions", "Sequences preempted (KV cache full)",
                                       registry=r),
            # speculative decoding, as vLLM's spec_decode_* (the rates follow from these)
            "spec_num_drafts": Counter(PREFIX + "spec_decode_num_drafts", "Verification steps that carried drafts",
                                       registry=r),
            "spec_num_draft_tokens": Counter(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed",
                                             registry=r),
            "spec_num_accepted_tokens": Counter(PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                                registry=r),
        }
        self._seen = dict.fromkeys(self.engine_counters, 0)

    def render(self, stats: dict | None) -> bytes:
        """Prometheus text; the gauges and the engine's counters are read from engine.stats() now
        rather than kept in sync."""
        if stats:
            self.running.set(stats.get("num_running", 0))
            self.waiting.set(stats.get("num_waiting", 0))
            self.kv_usage.set(stats.get("kv_usage", 0.0))
            self.spec_rate.set(stats.get("spec_acceptance_rate", 0.0))
            self.spec_length.set(stats.get("spec_mean_accepted_length", 0.0))
            for key, counter in self.engine_counters.items():
                # a counter only goes up: it takes what the engine's total gained since the last scrape
                total = stats.get(key, 0)
                if total > self._seen[key]:
                    counter.inc(total - self._seen[key])
                    self._seen[key] = total
        return generate_latest(self.registry)
