"""The edge service's counters and recent latencies, for ``GET /metrics`` (JSON) and Prometheus; thread-safe."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from deploy.rollout.stats import quantiles


class Metrics:
    """Counters and recent latencies (bounded window) for /metrics; thread-safe."""

    def __init__(self, window: int = 20000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.counts = {"requests": 0, "errors": 0, "bad_requests": 0, "fallbacks": 0, "log_errors": 0, "reloads": 0}
        self.counts |= {"reloads_refused": 0, "shadow_runs": 0}
        self._latency: deque[float] = deque(maxlen=window)
        self._models: dict[tuple[str, str], dict[str, Any]] = {}

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def request(self, ms: float | None, status: str = "ok") -> None:
        with self._lock:
            self.counts["requests"] += 1
            if status != "ok":
                self.counts["errors" if status == "error" else "bad_requests"] += 1
            if ms is not None:
                self._latency.append(ms)

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

    def prometheus(self) -> str:
        s = self.snapshot()
        out = [f"# TYPE sensitune_{k}_total counter\nsensitune_{k}_total {s[k]}" for k in self.counts]
        out.append("# TYPE sensitune_request_latency_ms summary")
        out += [f'sensitune_request_latency_ms{{quantile="0.{q[1:]}"}} {v}' for q, v in s["latency_ms"].items() if v]
        out.append("# TYPE sensitune_model_requests_total counter")
        for m in s["models"].values():
            lab = f'role="{m["role"]}",version="{m["version"]}"'
            out.append(f"sensitune_model_requests_total{{{lab}}} {m['requests']}")
            out.append(f"sensitune_model_errors_total{{{lab}}} {m['errors']}")
            out += [
                f'sensitune_model_latency_ms{{{lab},quantile="0.{q[1:]}"}} {v}' for q, v in m["latency_ms"].items() if v
            ]
        return "\n".join(out) + "\n"
