"""Issue 29's load target: the large-frame lane (`deploy.edge.limits.LargeFrameLane`). A frame that decodes to more
than ``limits.large_frame_bytes`` is decoded and made the models' input in one low-priority worker process, one at a
time; its answer is the one the normal path gives, the service process never decodes it, a normal frame is answered
while the lane is busy, and a worker that dies costs one 503 and is started again.

Small frames and a 1 KB ``large_frame_bytes`` stand in for the 25 MP probes; a job in the worker that waits for a
file makes "busy" deterministic.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.edge import EdgeWorld, png, rollout

import deploy.edge.service as service_mod
from deploy.edge.limits import LimitError, decoded_bytes, open_header
from deploy.edge.service import EdgeService

TINY_LANE = {"large_frame_bytes": 1024}  # a 48 x 48 RGB frame (9216 bytes decoded) goes to the lane
SAME = ("class", "class_index", "score", "p_good", "decision", "model_version", "role", "camera_id")


def _frames(world: EdgeWorld) -> list[bytes]:
    rng = np.random.default_rng(0)
    deep = Image.fromarray(rng.integers(0, 4096, (50, 60), dtype=np.uint16))  # I;16, scaled by its bit depth
    return [*world.images[:6], png(deep)]


def _hold(started: str, release: str) -> None:
    """A job for the lane's worker (imported there by name): say it runs, then wait until `release` exists."""
    Path(started).touch()
    deadline = time.monotonic() + 30
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _busy(service: EdgeService, tmp_path: Path) -> tuple[threading.Thread, list[Any], Path]:
    """The lane held by `_hold` in a thread (its outcome appended to the list), once the worker runs it; touch the
    returned path to let it go."""
    started, release = tmp_path / "started", tmp_path / "release"
    outcome: list[Any] = []

    def hold() -> None:
        try:
            outcome.append(service.lane.run(_hold, 1024, str(started), str(release)))
        except LimitError as e:
            outcome.append(e)

    thread = threading.Thread(target=hold)
    thread.start()
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.01)
    return thread, outcome, release


def _served(service: EdgeService, data: bytes, camera: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The answer's model fields, and the challenger's shadow answer on the input it was given (None: no shadow)."""
    deferred: list[tuple[Any, ...]] = []
    status, body = service.predict(data, camera, None, lambda fn, *a: deferred.append(a))
    assert status == 200, body
    shadow = None
    for rt, shadow_in, _ in deferred:
        out = rt.challenger.predict(shadow_in)
        shadow = {k: out[k] for k in ("class", "score", "p_good")}
    return {k: body[k] for k in SAME}, shadow


def test_a_large_frame_goes_to_the_lane_and_gets_the_same_answer(
    edge_world: EdgeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # champion v2 (40 px) and challenger v1 (32 px): two preprocessings, both arms, and the shadow run
    kw: dict[str, Any] = {"shadow": True, "challenger_share": 0.5}
    normal = EdgeService(rollout(tmp_path / "normal", edge_world, "2", "1", **kw))
    lane = EdgeService(rollout(tmp_path / "lane", edge_world, "2", "1", **kw, limits=TINY_LANE))
    seen: list[str] = []  # full-size frames the service process decoded or preprocessed itself

    def watched(fn: Any) -> Any:
        def call(image: Any, *args: Any) -> Any:
            seen.append(fn.__name__)
            return fn(image, *args)
        return call

    monkeypatch.setattr(service_mod, "model_image", watched(service_mod.model_image))
    monkeypatch.setattr(service_mod, "decode", watched(service_mod.decode))
    roles = set()
    for i, data in enumerate(_frames(edge_world)):
        camera = f"cam-{i}"
        assert decoded_bytes(open_header(data, lane.runtime.config.limits)) > TINY_LANE["large_frame_bytes"]
        before = len(seen)
        expected = _served(normal, data, camera)
        assert "decode" in seen[before:]  # the normal path decodes in the service process
        before = len(seen)
        assert _served(lane, data, camera) == expected
        assert seen[before:] == [], seen[before:]  # the lane's frames are decoded in its worker process only
        roles.add(expected[0]["role"])
    assert roles == {"champion", "challenger"}  # both arms were served from the lane's inputs
    pid = lane.lane.worker_pid()
    assert pid != os.getpid()
    if sys.platform == "linux":
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # yields to the line's frames at once
        assert "torch" not in Path(f"/proc/{pid}/maps").read_text()  # the worker needs PIL/numpy only
    normal.close()
    lane.close()


def test_a_second_large_frame_gets_503_while_a_normal_one_is_answered(edge_world: EdgeWorld, tmp_path: Path) -> None:
    service = EdgeService(rollout(tmp_path, edge_world, "2", None, limits=TINY_LANE))
    service.lane.wait_s = 0.05
    large, small = edge_world.images[0], png(Image.new("L", (16, 16), 90))  # 9216 and 256 bytes decoded
    thread, outcome, release = _busy(service, tmp_path)
    try:
        status, body = service.predict(large, "cam-b", None)
        assert status == 503 and "limits.large_frame_bytes=1024" in body["error"], body
        status, body = service.predict(small, "cam-c", None)  # the lane is still busy: normal frames pass it
        assert status == 200 and body["class"] in service.runtime.champion.class_names, body
    finally:
        release.touch()
        thread.join(30)
    assert outcome == [None], outcome
    assert service.predict(large, "cam-b", None)[0] == 200  # the lane is free again
    service.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_worker_costs_its_frame_a_503_and_is_started_again(edge_world: EdgeWorld, tmp_path: Path) -> None:
    service = EdgeService(rollout(tmp_path, edge_world, "2", None, limits=TINY_LANE))
    large = edge_world.images[0]
    assert service.predict(large, "cam-a", None)[0] == 200
    pid = service.lane.worker_pid()
    thread, outcome, release = _busy(service, tmp_path)  # the worker is working when the OOM killer strikes
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], LimitError) and outcome[0].status == 503, outcome
    assert "large-frame worker stopped" in str(outcome[0])
    status, body = service.predict(large, "cam-b", None)  # the next large frame: a new worker answers it
    assert status == 200 and body["class"] in service.runtime.champion.class_names, body
    assert service.lane.worker_pid() != pid
    service.close()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_worker_exits_when_the_service_process_is_gone() -> None:
    import subprocess

    code = "import os; from deploy.edge.limits import LargeFrameLane as L; print(L().worker_pid(), flush=True); " \
        "os._exit(0)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])  # the service died without close(), as under the OOM killer or SIGKILL
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 10
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text(), f"worker {pid} outlived its service"
