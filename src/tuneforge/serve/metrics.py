"""Serving's own metrics, on a server's registry (`tuneforge.web.Observer`): per served model, time to first
token and tokens in and out; per base model, the engine's waiting requests, batch, loaded adapters and prefix
cache (hits, misses, memory), and the adapters loaded and unloaded while the server runs.

The token counters are totals: Prometheus's `rate()` of `tuneforge_generated_tokens_total` is the
tokens generated a second. The engine's figures are read when the registry is scraped, from every
engine still running (the jobs service holds several, one per base model, and closes them).
"""

from __future__ import annotations

import collections
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine, Generation, Generations

TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GenerationMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.time_to_first_token = Histogram(
            "tuneforge_time_to_first_token_seconds",
            "Time from a request joining the queue to its first generated text, by served model.",
            ["model"],
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tuneforge_prompt_tokens",
            "Prompt tokens of answered requests, by served model.",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            "tuneforge_generated_tokens",
            "Tokens generated for answered requests, by served model; rate() is tokens a second.",
            ["model"],
            registry=registry,
        )
        self.adapter_updates = Counter(
            "tuneforge_adapter_updates",
            "Adapters loaded (/v1/load_lora_adapter) and unloaded (/v1/unload_lora_adapter) while the server runs, "
            "by base model, adapter name and action.",
            ["base", "adapter", "action"],
            registry=registry,
        )
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        registry.register(_EngineCollector(self._engines))

    def watch(self, engine: Engine) -> None:
        """Report `engine`'s queue, batch and adapters while it runs."""
        self._engines.add(engine)

    def adapter_updated(self, base: str, adapter: str, action: str) -> None:
        """`adapter` on `base` was loaded or unloaded (`action`: "load" or "unload")."""
        self.adapter_updates.labels(base, adapter, action).inc()

    def answered(self, model: str, generation: Generation | Generations) -> None:
        # Each prompt once, however many choices it was answered with (they share its prefill).
        completions = generation.completions
        self.time_to_first_token.labels(model).observe(generation.time_to_first_token)
        self.prompt_tokens.labels(model).inc(generation.prompt_tokens)
        self.generated_tokens.labels(model).inc(sum(completion.completion_tokens for completion in completions))


class _EngineCollector:
    """Gauges read from the engines at scrape time, summed by base model's name (two bases may share one)."""

    def __init__(self, engines: weakref.WeakSet[Engine]):
        self.engines = engines

    def collect(self):
        totals: dict[str, collections.Counter] = {}
        for engine in list(self.engines):
            stats = engine.stats()
            if stats["alive"]:
                totals.setdefault(engine.pool.base_name, collections.Counter()).update(
                    waiting=stats["waiting"],
                    running=stats["running"],
                    adapters=len(engine.pool.loaded),
                    hits=stats["prefix_cache_hits"],
                    misses=stats["prefix_cache_misses"],
                    cache_bytes=stats["prefix_cache_bytes"],
                )
        for name, documentation, figure in (
            ("tuneforge_requests_waiting", "Requests queued for a place in a batch.", "waiting"),
            ("tuneforge_batch_size", "Rows (a request's choices) decoding together now.", "running"),
            ("tuneforge_adapters_loaded", "Adapters held in memory.", "adapters"),
            ("tuneforge_prefix_cache_bytes", "Memory held by the prefix cache's keys and values.", "cache_bytes"),
        ):
            gauge = GaugeMetricFamily(name, documentation, labels=["base"])
            for base, figures in totals.items():
                gauge.add_metric([base], figures[figure])
            yield gauge
        for name, documentation, figure in (
            ("tuneforge_prefix_cache_hits", "Prompts that started from keys and values cached before.", "hits"),
            ("tuneforge_prefix_cache_misses", "Prompts looked up in the prefix cache that found none.", "misses"),
        ):
            counter = CounterMetricFamily(name, documentation, labels=["base"])
            for base, figures in totals.items():
                counter.add_metric([base], figures[figure])
            yield counter
