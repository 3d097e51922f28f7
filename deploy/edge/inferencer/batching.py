"""Micro-batching across cameras: frames for one model that arrive close together are inferred as one batch.

A small model on a CPU spends a good part of a batch-1 call on fixed costs (the call, the graph's scheduling, weights
streamed through the caches once per call); a batch of B pays them once. Every frame of a batch waits for the window
and for the whole batch, though, so the window is bounded by the per-camera p99 target (`window_ms`): a first frame
waits at most ``min(window_ms, p99_target_ms - p99 of the recent batches' inference)``, and not at all once inference
alone nears the target. A full batch goes at once. Off unless the rollout manifest's ``batching.max_batch`` > 1
(`deploy.edge.serving`).

Frames of different shapes (a graph variant's full-size frames) are never stacked: a frame that does not fit the
batch being gathered starts the next one. Torch-free.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from deploy.edge.serving import Batching

IDLE_EXIT_S = 10.0  # a worker with nothing to do this long exits (a replaced model's workers do not linger)
RECENT = 200  # batches whose inference time the window's p99 is taken over


def window_ms(batching: Batching, recent_p99_ms: float | None) -> float:
    """How long a first frame may wait for others: ``window_ms``, less whatever the target leaves after the recent
    p99 of a batch's inference (None: nothing measured yet, so no room is known and nobody waits)."""
    if recent_p99_ms is None:
        return 0.0
    return max(0.0, min(batching.window_ms, batching.p99_target_ms - recent_p99_ms))


@dataclass
class _Item:
    x: np.ndarray  # (n, ...) rows of one model's input
    future: Future = field(default_factory=Future)
    t: float = 0.0  # when it was submitted


class MicroBatcher:
    """Gathers `submit`ted inputs into batches for `infer`, with `workers` batches in flight at most (one per infer
    request). Workers start with the first frame and exit when idle. Thread-safe.

    Args:
        infer: (B, ...) -> (B, classes); called from the workers, one batch at a time each.
        batching: ``max_batch`` (rows per batch), ``window_ms`` and ``p99_target_ms``.
        workers: Batches in flight at once (the model's infer requests).
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], batching: Batching, workers: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:  # fmt: skip
        self.infer, self.batching, self.workers, self.clock = infer, batching, max(1, workers), clock
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._lock = threading.Lock()
        self._live = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # batch inference ms
        self.batches: collections.Counter[int] = collections.Counter()  # batch size -> how many (tests, /metrics)

    def submit(self, x: np.ndarray) -> Future:
        """One input of ``n <= max_batch`` rows -> a future of its (n, classes) logits."""
        item = _Item(x, t=self.clock())
        self._queue.put(item)  # before the worker check: an exiting worker sees it, or a new one is started
        with self._lock:
            if self._live < self.workers:
                self._live += 1
                threading.Thread(target=self._work, name="micro-batch", daemon=True).start()
        return item.future

    def recent_p99_ms(self) -> float | None:
        with self._lock:
            return float(np.percentile(self._recent, 99)) if self._recent else None

    def _work(self) -> None:
        carry: _Item | None = None
        while True:
            try:
                first = carry or self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._live -= 1
                        return
                continue
            items, carry = self._gather(first)
            self._run(items)

    def _gather(self, first: _Item) -> tuple[list[_Item], _Item | None]:
        """`first` and the frames that join it before the window closes; a frame that does not fit is carried over."""
        items, rows = [first], len(first.x)
        deadline = first.t + window_ms(self.batching, self.recent_p99_ms()) / 1e3
        while rows < self.batching.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - self.clock()))
            except queue.Empty:
                break
            if item.x.shape[1:] != first.x.shape[1:] or rows + len(item.x) > self.batching.max_batch:
                return items, item
            items.append(item)
            rows += len(item.x)
        return items, None

    def _run(self, items: list[_Item]) -> None:
        x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])  # (B, ...)
        t0 = self.clock()
        try:
            out = self.infer(x)  # (B, classes)
        except Exception as e:  # every frame of the batch gets the error: the service answers each as it would
            for it in items:
                it.future.set_exception(e)
            return
        with self._lock:
            self._recent.append((self.clock() - t0) * 1e3)
            self.batches[len(x)] += 1
        start = 0
        for it in items:
            it.future.set_result(out[start : start + len(it.x)])
            start += len(it.x)
