"""Issue 29's load target: the large-frame lane (`deploy.edge.lane.LargeFrameLane`). A frame that decodes to more
than ``limits.large_frame_bytes`` is decoded and made the models' input in one low-priority worker process, one at a
time; its answer is the one the normal path gives, the service process never decodes it, a normal frame is answered
while the lane is busy, and a worker that dies costs one 503 and is started again.

Small frames and a 1 KB ``large_frame_bytes`` stand in for the 25 MP probes; a job in the worker that waits for a
file makes "busy" deterministic.
"""

from __future__ import annotations

import io
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

import deploy.edge.decoding as decoding_mod  # where the service decodes a line frame and makes its inputs
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

    monkeypatch.setattr(decoding_mod, "model_image", watched(decoding_mod.model_image))
    monkeypatch.setattr(decoding_mod, "decode", watched(decoding_mod.decode))
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


def test_through_the_app_a_frame_is_decoded_once_and_a_large_one_never_in_the_service(
    edge_world: EdgeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the operator pages used to decode every answered frame again, at full size, in the service process: a 25 MP
    # frame the lane had decoded at low priority was decoded a second time at normal priority beside the line
    from fastapi.testclient import TestClient
    from PIL import ImageFile

    from deploy.edge.service import create_app

    loaded: list[tuple[int, int]] = []  # sizes of the image files decoded in this (the service's) process
    load, seen = ImageFile.ImageFile.load, set()

    def counted(im: Any) -> Any:
        if id(im) not in seen:  # an image's first load() decodes it; a later one is a no-op
            seen.add(id(im))
            loaded.append(im.size)
        return load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    app = create_app(rollout(tmp_path, edge_world, "2", None, limits={"large_frame_bytes": 4000}))
    client, service = TestClient(app, base_url="http://127.0.0.1"), app.state.service
    try:
        for data, camera in ((edge_world.images[0], "cam-large"), (png(Image.new("RGB", (30, 30), 90)), "cam-small")):
            before = len(loaded)
            r = client.post("/predict", files={"file": ("f.png", data)}, data={"camera_id": camera})
            assert r.status_code == 200, r.text
            shot = service.pages.recent.get(r.json()["frame_id"])  # the line view has its thumbnail
            assert shot is not None and max(Image.open(io.BytesIO(shot.thumb)).size) <= service.pages.recent.thumb_px
            decoded = loaded[before:]
            assert decoded == ([] if camera == "cam-large" else [(30, 30)]), decoded
    finally:
        service.close()


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
    again = service.predict(large, "cam-b", None)
    assert again[0] == 200, again  # the lane is free again
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
@pytest.mark.parametrize("stopped", [False, True], ids=["working", "stopped-for-the-line"])
def test_the_worker_exits_when_the_service_process_is_gone(stopped: bool) -> None:
    import subprocess

    # a stopped worker cannot run its parent-watch thread; the service dies once the stop has taken effect
    stop = "os.kill(p, signal.SIGSTOP); s = f'/proc/{p}/stat'\n" \
        "while open(s).read().rsplit(')', 1)[1].split()[0] != 'T': time.sleep(0.01)\n" if stopped else ""
    code = "import os, signal, time; from deploy.edge.lane import LargeFrameLane as L; p = L().worker_pid(); " \
        f"{stop}print(p, flush=True); os._exit(0)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])  # the service died without close(), as under the OOM killer or SIGKILL
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 10
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text(), f"worker {pid} outlived its service"


def _state(pid: int) -> str:
    """The process's state letter from /proc: T when stopped."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _stopped(pid: int, wait_s: float = 2.0) -> bool:
    """Whether the process is (or within `wait_s` becomes) stopped: a SIGSTOP takes effect when the target next runs,
    and a SCHED_IDLE worker may wait a moment for a core."""
    deadline = time.monotonic() + wait_s
    while _state(pid) != "T":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_lane_worker_is_stopped_while_a_line_frame_is_served(
    edge_world: EdgeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = EdgeService(rollout(tmp_path, edge_world, "2", None, limits=TINY_LANE))
    small = png(Image.new("L", (16, 16), 90))
    pid = service.lane.worker_pid()
    seen: list[str] = []
    real_decode = decoding_mod.decode
    monkeypatch.setattr(decoding_mod, "decode", lambda im: (seen.append(_stopped(pid, 0.5)), real_decode(im))[1])
    assert service.predict(small, "cam-a", None)[0] == 200  # the lane is idle: nothing to stop
    thread, outcome, release = _busy(service, tmp_path)
    try:
        status, body = service.predict(small, "cam-c", None)
        assert status == 200, body
        assert seen == [False, True], seen  # stopped only while a large frame works and a line frame runs
        assert _state(pid) != "T" and service.lane.yielding.holds == 1  # continued the moment the line frame is done
    finally:
        release.touch()
        thread.join(30)
    assert outcome == [None], outcome  # the large frame still finishes
    service.close()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_large_frame_is_held_for_the_line_at_most_max_held_s() -> None:
    import subprocess

    from deploy.edge.lane import LineYield

    now = [0.0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gate = LineYield(max_held_s=1.0, clock=lambda: now[0])
        with gate.working(child.pid):
            for step in range(3):  # held 0.6 s, then 0.6 s (1.2 in all), then no more
                with gate.line_frame():
                    assert _stopped(child.pid, 0.5) == (step < 2), step
                    now[0] += 0.6
                assert _state(child.pid) != "T"
            with gate.line_frame(), gate.line_frame():  # nested line frames: still one hold, none past the bound
                assert not _stopped(child.pid, 0.5)
        assert gate.holds == 2
        with gate.line_frame():  # no large frame at work: nothing is stopped
            assert not _stopped(child.pid, 0.5) and gate.holds == 2
    finally:
        child.kill()
        child.wait()
