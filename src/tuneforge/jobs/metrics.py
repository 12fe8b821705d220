"""The jobs service's metrics, read from the store when the registry is scraped: jobs by status, and the
tokens every job has trained (a total: Prometheus's `rate()` of it is the training tokens a second).

The store is shared by every server and worker on it, so any one `tuneforge api` reports them all.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .store import Store


class JobMetrics:
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        by_status, trained_tokens = self.store.job_totals()
        jobs = GaugeMetricFamily("tuneforge_jobs", "Fine-tuning jobs in the store, by status.", labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield CounterMetricFamily(
            "tuneforge_trained_tokens", "Tokens trained by the store's jobs; rate() is tokens a second.", trained_tokens
        )
