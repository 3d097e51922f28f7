"""The large-frame lane: a frame that decodes to more than ``limits.large_frame_bytes`` (`deploy.edge.limits`) is
decoded and made the models' input in one worker PROCESS, one frame at a time (`LargeFrameLane`), never in a
``decode_concurrency`` slot.

Such a frame costs a lot of CPU (a 25 MP RGB PNG ~0.4-5 s). In a normal slot it competed with the line's frames and
their p99 grew 4-14x; in a nice-19 thread still 3.45x (decode and resize hold the GIL in part, which no OS priority
lifts). In its own process at nice 19 and SCHED_IDLE it still cost the line's p99 1.2-1.7x: the OS gives a line
frame's thread the core at once, but the worker keeps streaming a 100 MB frame through the shared caches and memory
(and, on a virtual machine, perhaps the other half of the same physical core) while that frame is inferred. (Those
measurements were taken while the operator pages still decoded every answered frame a second time in the service
process, the larger cost, found later: `deploy.edge.decoding.View`.)

So the lane **yields to the line**: while any line frame is being decoded or inferred, the worker is stopped
(SIGSTOP), and it continues (SIGCONT) the moment none is. A large frame then decodes only in the gaps the line
leaves, which at 20 frames/s of a few ms each is most of the time. Progress is bounded: once a large frame has been
held for ``max_held_s`` in all, the lane stops yielding for it and it finishes at SCHED_IDLE, as before. A worker
is never left stopped: the lane continues it before it is closed, and the worker runs in its own process group, so
when the service dies the kernel sends the stopped worker SIGHUP and SIGCONT (POSIX, for a newly orphaned process
group with a stopped member) and it ends; a stopped worker cannot run the parent-watch thread that covers the rest.

The service sends the frame's bytes and gets back only model-sized inputs, so the full-size frame never enters the
service's memory. Its answer is the same as in a slot: the same `model_image`, then the model. A worker that dies
(the OOM killer) costs its frame a 503 and is started again. Torch-free (Pillow only).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

from PIL import Image

from deploy.edge.decoding import View, draft, model_inputs
from deploy.edge.limits import DECODE_WAIT_S, LimitError, Limits, open_header
from spt_core.portable.errors import one_line

T = TypeVar("T")
LANE_NICE = 19  # the large-frame lane's OS priority: the lowest, so every normal frame's thread runs first
MAX_HELD_S = 5.0  # a large frame is held for the line at most this long in all, then decodes at SCHED_IDLE
LaneInput = tuple[Image.Image | Exception, float]  # a model's input made in the lane (or why not), and its ms
_CAN_STOP = hasattr(signal, "SIGSTOP")  # POSIX; elsewhere the lane runs at low priority without yielding


def _lane_start(parent: int) -> None:
    """The large-frame worker's initializer: the lowest OS priority for the whole process, its own process group,
    the imports its work needs done once, before a frame waits on them, and an exit when `parent` (the
    service) is gone: a worker holds its own end of the pool's queue, so a killed service would otherwise leave it
    waiting forever."""
    if _CAN_STOP:  # its own process group: when the service dies, the kernel sends a stopped worker SIGHUP + SIGCONT
        try:  # (POSIX's rule for a newly orphaned group with a stopped member), and SIGHUP ends it
            os.setpgid(0, 0)
        except OSError:
            pass
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, LANE_NICE)
    except (AttributeError, OSError):  # no setpriority (Windows), or not allowed: the lane still runs one at a time
        pass
    try:  # Linux: SCHED_IDLE runs only when a core would idle, and yields at once to a line frame's wake-up
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    import numpy  # noqa: F401

    import deploy.edge.decoding  # noqa: F401


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def lane_inputs(
    data: bytes, limits: Limits, specs: Mapping[str, Any], view: View | None = None
) -> dict[str, LaneInput]:
    """In the large-frame worker: what a decode slot makes of `data` (`deploy.edge.decoding.model_inputs`, a JPEG
    drafted as there): `model_image` for each key of `specs` (a preprocess spec) and the pages' `view`, timed; a
    failure is kept for the key it belongs to. Only these model-sized images go back to the service."""
    header = draft(open_header(data, limits), specs.values())
    made = model_inputs(header, {key: (pre, False) for key, pre in specs.items()}, view)
    return {key: (got if not isinstance(got, Exception) or _travels(got) else ValueError(one_line(got)), ms)
            for key, (got, ms) in made.items()}  # fmt: skip


def _travels(e: Exception) -> bool:
    """Whether `e` comes back from the worker as itself (an exception whose constructor does not take its args
    cannot be unpickled and would break the pool)."""
    try:
        type(e)(*e.args)
    except Exception:
        return False
    return True


class LineYield:
    """Stops the lane's worker while any line frame is in flight (module docstring). `line_frame()` wraps a line
    frame's decode and inference; `working(pid)` wraps one large frame's time in the worker. Thread-safe; every
    signal is sent under the lock, so the worker's state always matches the count of line frames in flight."""

    def __init__(self, max_held_s: float = MAX_HELD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_held_s, self._clock = max_held_s, clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pid: int | None = None  # the worker, while it works on a large frame
        self._stopped_at: float | None = None
        self._held = 0.0  # seconds this large frame was held so far
        self.holds = 0  # times a worker was stopped for the line (monitoring, tests)

    @contextmanager
    def line_frame(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            if self._in_flight == 1:
                self._stop()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._continue()

    @contextmanager
    def working(self, pid: int) -> Iterator[None]:
        with self._lock:
            self._pid, self._held = pid, 0.0
            if self._in_flight:
                self._stop()
        try:
            yield
        finally:
            with self._lock:
                self._continue()
                self._pid = None

    def _stop(self) -> None:
        if not _CAN_STOP or self._pid is None or self._stopped_at is not None or self._held >= self.max_held_s:
            return
        try:
            os.kill(self._pid, signal.SIGSTOP)
        except OSError:  # the worker is gone: run() answers that frame's 503
            return
        self._stopped_at = self._clock()
        self.holds += 1

    def _continue(self) -> None:
        if self._stopped_at is None or self._pid is None:
            return
        self._held += self._clock() - self._stopped_at
        self._stopped_at = None
        try:
            os.kill(self._pid, signal.SIGCONT)
        except OSError:
            pass


class LargeFrameLane:
    """One worker process at nice 19 and SCHED_IDLE for the frames over ``limits.large_frame_bytes`` (module
    docstring), one at a time, yielding to the line (`yielding`): a second such frame waits up to `wait_s` for it,
    then gets 503 with Retry-After. The process is spawned (no fork of the service's threads and models) by `start`
    (the HTTP service calls it at startup), else by the first large frame; `close` ends it. Thread-safe."""

    def __init__(self, wait_s: float = DECODE_WAIT_S, max_held_s: float = MAX_HELD_S) -> None:
        self.wait_s = wait_s
        self.yielding = LineYield(max_held_s)
        self._slot = threading.BoundedSemaphore(1)
        self._lock = threading.Lock()  # guards the pool's start and its swap after a worker died
        self._pool: ProcessPoolExecutor | None = None
        self._pid: int | None = None

    def start(self) -> ProcessPoolExecutor:
        """The worker's pool, spawning the worker now if there is none, so a large frame does not wait for its
        imports."""
        with self._lock:
            if self._pool is None:
                spawn = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(1, spawn, initializer=_lane_start, initargs=(os.getpid(),))
                self._pid = None
                self._pool.submit(os.getpid)
            return self._pool

    def run(self, fn: Callable[..., T], limit: int, *args: Any) -> T:
        """`fn(*args)` in the worker (a module-level function, picklable arguments), its result or exception here;
        `limit` (large_frame_bytes) names the 503. A worker that died answers 503 and is started again."""
        if not self._slot.acquire(timeout=self.wait_s):
            raise LimitError(
                503, f"busy: a frame over limits.large_frame_bytes={limit} is being decoded; retry shortly",
                retry_after=1.0,
            )  # fmt: skip
        try:
            pool = self.start()
            try:
                pid = self._worker(pool)
                with self.yielding.working(pid):
                    return pool.submit(fn, *args).result()
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = None
                self.start()
                raise LimitError(
                    503, f"the large-frame worker stopped (out of memory?) on a frame over limits.large_frame_bytes="
                    f"{limit}; it is restarted, retry shortly", retry_after=1.0,
                ) from None  # fmt: skip
        finally:
            self._slot.release()

    def _worker(self, pool: ProcessPoolExecutor) -> int:
        """The pid of `pool`'s one worker (asked once per worker, and only while the lane's slot is held)."""
        if self._pid is None:
            self._pid = pool.submit(os.getpid).result()
        return self._pid

    def worker_pid(self) -> int:
        """The worker process's id (tests, monitoring); waits for it to be up."""
        return self.start().submit(os.getpid).result()

    def close(self) -> None:
        with self._lock:
            if self._pid is not None and _CAN_STOP:  # a worker stopped for the line must be able to read its sentinel
                try:
                    os.kill(self._pid, signal.SIGCONT)
                except OSError:
                    pass
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
