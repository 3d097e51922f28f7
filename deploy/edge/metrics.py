"""The edge service's counters and latencies: Prometheus exposition through `prometheus_client` (one
`CollectorRegistry` per service, never the process-global one, so two services or tests never mix counts), and
a JSON view with recent-window quantiles for ``GET /metrics``; thread-safe."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deploy.edge.rollout.stats import quantiles

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
COUNTS = (
    "requests errors bad_requests fallbacks log_errors reloads reloads_refused shadow_runs "
    "refused_unauthorized refused_limits feedback_refused sync_errors registry_bad_replies models_refused "
    "frames_over_camera_quota"  # frames a camera's quota kept out of the frame store (deploy.edge.frame_store)
).split()
# ms: the model takes 1-30 ms on an edge CPU; the tail buckets show queueing and oversized frames
_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """Counters and latencies of one service, for /metrics (JSON) and ``?format=prometheus``.

    Prometheus gets counters and latency histograms (quantiles are computed by the scraper); the JSON view keeps a
    bounded window of recent latencies for p50/p90/p99 at a glance.
    """

    def __init__(self, window: int = 20000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._window = window
        self.counts = dict.fromkeys(COUNTS, 0)
        self._counters = {k: Counter(f"sensitune_{k}", f"edge service: {k.replace('_', ' ')}", registry=self.registry)
                          for k in COUNTS}  # fmt: skip
        self._latency: deque[float] = deque(maxlen=window)
        self._request_hist = Histogram(
            "sensitune_request_latency_ms", "server time per answered /predict request (ms)",
            buckets=_BUCKETS_MS, registry=self.registry,
        )  # fmt: skip
        labels = ("role", "version")
        self._model_requests = Counter(
            "sensitune_model_requests", "inferences per model", labels, registry=self.registry
        )
        self._model_errors = Counter(
            "sensitune_model_errors", "failed inferences per model", labels, registry=self.registry
        )
        self._model_hist = Histogram(
            "sensitune_model_latency_ms", "preprocessing + inference per model (ms), queueing excluded", labels,
            buckets=_BUCKETS_MS, registry=self.registry,
        )  # fmt: skip
        self._models: dict[tuple[str, str], dict[str, Any]] = {}

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1
        self._counters[key].inc()

    def request(self, ms: float | None, status: str = "ok") -> None:
        self.count("requests")
        if status != "ok":
            self.count("errors" if status == "error" else "bad_requests")
        if ms is not None:
            with self._lock:
                self._latency.append(ms)
            self._request_hist.observe(ms)

    def model(self, role: str, version: str, ms: float | None) -> None:
        with self._lock:
            m = self._models.setdefault(
                (role, version), {"requests": 0, "errors": 0, "lat": deque(maxlen=self._window)}
            )
            m["requests"] += 1
            if ms is None:
                m["errors"] += 1
            else:
                m["lat"].append(ms)
        self._model_requests.labels(role, version).inc()
        if ms is None:
            self._model_errors.labels(role, version).inc()
        else:
            self._model_hist.labels(role, version).observe(ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.counts,
                "latency_ms": quantiles(self._latency),
                "models": {
                    f"{role}:{version}": {
                        "role": role,
                        "version": version,
                        "requests": m["requests"],
                        "errors": m["errors"],
                        "latency_ms": quantiles(m["lat"]),
                    }
                    for (role, version), m in self._models.items()
                },
            }

    def prometheus(self) -> bytes:
        """The text exposition format of this service's registry."""
        return generate_latest(self.registry)
