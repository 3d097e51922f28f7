"""Camera clients for the edge service's load benchmarks: one timed POST /predict, and the two ways to send many.

- `closed_loop`: a number of threads, each sending its next frame when its last one is answered (a camera that waits
  for its answer): `edge_cameras.run_cameras` (one thread per camera) and `edge_load.run_clients` (threads sharing a
  request budget over 12 camera ids).
- `open_loop`: each frame sent at its scheduled time whatever the earlier answers (cameras that never wait), latency
  counted from that scheduled time, so a late client counts against the service (no coordinated omission):
  `edge_load_oversized`.

Both record every request as a `Sent`; the callers make their own tables from them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

OPEN_LOOP_THREADS = 32  # open-loop senders: enough that a slow answer (a probe, ~1 s) never delays a scheduled frame
# (thread index, the thread's own request number, the overall request number) -> (camera_id, frame bytes, frame_id)
Pick = Callable[[int, int, int], tuple[str, bytes, str | None]]


@dataclass(frozen=True)
class Sent:
    """One request: its HTTP status (or the httpx exception's class name), its latency in ms, the answer's ``role``
    on a 200 (champion/challenger), and, in an open loop, its schedule (``at_s`` after the start) and tag."""

    camera_id: str
    status: int | str
    ms: float
    role: str | None = None
    at_s: float = 0.0
    tag: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def why(self) -> str:
        """The failure as a table shows it: ``HTTP 503`` or the exception's name."""
        return f"HTTP {self.status}" if isinstance(self.status, int) else self.status


@dataclass(frozen=True)
class Planned:
    """One open-loop request: sent `at_s` seconds after the start; `tag` is the caller's (e.g. which probe)."""

    at_s: float
    camera_id: str
    data: bytes
    frame_id: str | None = None
    tag: str = ""


def post_frame(
    client: httpx.Client, base: str, data: bytes, camera_id: str, mime: str = "image/png", frame_id: str | None = None
) -> tuple[int | str, str | None]:
    """POST one frame to ``/predict``: (HTTP status or the httpx exception's class name, the answer's role on 200)."""
    form = {"camera_id": camera_id} | ({"frame_id": frame_id} if frame_id else {})
    try:
        r = client.post(f"{base}/predict", files={"file": ("f", data, mime)}, data=form)
    except httpx.HTTPError as e:
        return type(e).__name__, None
    return r.status_code, (r.json().get("role") if r.status_code == 200 else None)


def closed_loop(
    base: str, threads: int, pick: Pick, seconds: float, total: int | None = None, mime: str = "image/png",
    headers: dict[str, str] | None = None, timeout: float = 30.0,
) -> tuple[list[Sent], float]:  # fmt: skip
    """`threads` threads post back to back (each its next frame once its last is answered) until `seconds` have passed
    or `total` requests were sent in all; `pick` names each request's camera, frame and frame id. (every request,
    wall seconds); latency is each request's own round trip."""
    lock, count = threading.Lock(), [0]
    sent: list[Sent] = []
    deadline = time.monotonic() + seconds

    def worker(k: int) -> None:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            j = 0
            while time.monotonic() < deadline:
                with lock:
                    i = count[0]
                    if total is not None and i >= total:
                        return
                    count[0] += 1
                camera_id, data, frame_id = pick(k, j, i)
                t0 = time.perf_counter()
                status, role = post_frame(client, base, data, camera_id, mime, frame_id)
                done = Sent(camera_id, status, (time.perf_counter() - t0) * 1e3, role)
                with lock:
                    sent.append(done)
                j += 1

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sent, time.perf_counter() - t0


def open_loop(
    base: str, plan: list[Planned], start: float, headers: dict[str, str] | None = None, mime: str = "image/png",
    timeout: float = 30.0,
) -> list[Sent]:  # fmt: skip
    """Each planned request sent at ``start + at_s`` (`time.perf_counter` seconds) by `OPEN_LOOP_THREADS` threads,
    never waiting for earlier answers; latency from the scheduled time. Returns every request, in plan order."""
    plan = sorted(plan, key=lambda p: p.at_s)
    client = httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=OPEN_LOOP_THREADS))

    def send(p: Planned) -> Sent:
        time.sleep(max(0.0, start + p.at_s - time.perf_counter()))
        status, role = post_frame(client, base, p.data, p.camera_id, mime, p.frame_id)
        return Sent(p.camera_id, status, (time.perf_counter() - (start + p.at_s)) * 1e3, role, p.at_s, p.tag)

    try:
        with ThreadPoolExecutor(OPEN_LOOP_THREADS) as ex:
            return list(ex.map(send, plan))
    finally:
        client.close()
