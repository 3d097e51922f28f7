"""The edge load benchmarks' own machinery (issue 29): the side-by-side block schedule of the oversized scenario, its
per-round and pooled statistics, and the camera clients `edge_cameras` and `edge_load` share. No model: a tiny
ASGI app stands in for the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.servers import serve

from benchmarks import edge_load_oversized as ov
from benchmarks.edge_load_oversized_table import answers
from benchmarks.load_clients import Planned, Sent, closed_loop, open_loop
from benchmarks.proc_memory import MemorySampler, Sample, children, tree_kb


def test_blocks_alternate_and_every_round_gets_all_probes_at_the_rate() -> None:
    blocks = ov.layout(rounds=2, seconds=30, block_s=10)
    assert [(b.round, b.phase) for b in blocks[:4]] == [(-1, "clean"), (-1, "mixed"), (0, "clean"), (0, "mixed")]
    assert [b.phase for b in blocks] == ["clean", "mixed"] * 7 and blocks[-1].end_s == 140
    # warm-up: one of each kind; then round(30 s / 6 s) = 5 probes per round over its 3 mixed blocks (1, 2, 2),
    # evenly in each block less its last second, the kinds in turn across the whole run
    got = ov.probe_times(blocks, every=6, kinds=3)
    assert got == [(11.5, 0), (14.5, 1), (17.5, 2),
                   (34.5, 0), (52.25, 1), (56.75, 2), (72.25, 0), (76.75, 1),
                   (94.5, 2), (112.25, 0), (116.75, 1), (132.25, 2), (136.75, 0)]  # fmt: skip
    for r in (0, 1):
        kinds = [k for at, k in got if blocks[ov.block_index(blocks, at)].round == r]
        assert len(kinds) == 5 and set(kinds) == {0, 1, 2}
    frames, mix = [b"a", b"b"], [("p0", b"x"), ("p1", b"y"), ("p2", b"z")]
    plan = ov.plan(blocks, rate=2.0, every=6, frames=frames, mix=mix)
    normal = [p for p in plan if p.camera_id != ov.PROBE_CAMERA]
    assert len(normal) == 280 and [p.at_s for p in normal[:3]] == [0.0, 0.5, 1.0]
    assert all(blocks[ov.block_index(blocks, p.at_s)].phase == "mixed" for p in plan if p.tag)
    with pytest.raises(SystemExit, match="--block-s"):
        ov.layout(rounds=1, seconds=5, block_s=10)


def test_summary_pools_requests_per_phase_and_leaves_the_warm_up_out() -> None:
    blocks = ov.layout(rounds=2, seconds=20, block_s=10)  # warm-up 0-20; r1: C20 M30 C40 M50; r2: C60 M70 C80 M90
    normal = {1: 10_000.0, 21: 10, 41: 20, 25: 30, 31: 40, 51: 50, 55: 60,  # at s: ms (1 s: the warm-up's)
              61: 100, 81: 200, 85: 300, 71: 5, 91: 6, 95: 7}  # fmt: skip
    sent = [Sent(f"cam-{i}", 200, ms, at_s=at) for i, (at, ms) in enumerate(normal.items())]
    sent += [Sent("cam-9", 503, 1.0, at_s=72.0)]
    sent += [Sent(ov.PROBE_CAMERA, 200, 3000.0, at_s=35.0, tag="p0"), Sent(ov.PROBE_CAMERA, 413, 5.0, at_s=55.0),
             Sent(ov.PROBE_CAMERA, 200, 4000.0, at_s=77.0), Sent(ov.PROBE_CAMERA, 200, 9.0, at_s=12.0)]  # fmt: skip
    t0 = 1000.0
    samples = [Sample(t0 + 5, 900 * 1024, 150 * 1024, 0.5), Sample(t0 + 25, 100 * 1024, 200 * 1024, 1.0),
               Sample(t0 + 35, 300 * 1024, 400 * 1024, 2.0), Sample(t0 + 65, 150 * 1024, 450 * 1024, 3.0)]  # fmt: skip
    rows = ov.summarize(blocks, sent, [(21.0, 5.0), (31.0, 7.0), (1.0, 999.0)], samples, t0)
    assert [r["name"] for r in rows] == ["round 1", "round 2", "pooled"]
    r1, r2, pooled = rows
    assert (r1["clean"]["ok"], r1["clean"]["p50"], r1["mixed"]["p50"]) == (3, 20.0, 50.0)
    assert (r2["clean"]["p50"], r2["mixed"]["p50"], r2["mixed"]["errors"]) == (200.0, 6.0, 1)
    assert r2["mixed"]["error_kinds"] == ["HTTP 503"]
    # pooled: percentiles of all the rounds' requests together (not the mean of the rounds' medians: 110, 28)
    assert (pooled["clean"]["p50"], pooled["mixed"]["p50"], pooled["clean"]["blocks"]) == (65.0, 23.5, 4)
    clean99, mixed99 = np.percentile([10, 20, 30], 99), np.percentile([40, 50, 60], 99)
    assert r1["ratio"] == pytest.approx(mixed99 / clean99)
    assert (r1["clean"]["server_p50"], r1["mixed"]["server_p50"]) == (5.0, 7.0)
    assert (r1["clean"]["rss_mb"], r1["mixed"]["rss_mb"], r1["hwm_mb"], r1["load"]) == (100, 300, 400, 2.0)
    assert (r2["clean"]["rss_mb"], r2["hwm_mb"], r2["load"]) == (150, 450, 3.0)
    # the 77 s probe's answer came at 81 s, after its block (70-80 s) ended; the warm-up probe is not counted
    assert [(len(r["probes"]), r["late"]) for r in rows] == [(2, 0), (1, 1), (3, 1)]
    assert answers(pooled["probes"]) == "200 x2, 413 x1"


def test_server_times_match_the_schedule_by_frame_id(tmp_path: Path) -> None:
    recs = [{"client_frame_id": "n1", "served": True, "request_ms": 4.5, "camera_id": "cam-1"},
            {"client_frame_id": "n2", "served": False, "camera_id": "cam-2"},
            {"client_frame_id": "p0", "served": True, "request_ms": 900, "camera_id": ov.PROBE_CAMERA},
            {"client_frame_id": None, "served": True, "request_ms": 3.0, "camera_id": "cam-3"}]  # fmt: skip
    log = tmp_path / "predictions.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert ov.server_times(log, {"n1": 0.5, "n2": 1.0, "p0": 1.5}) == [(0.5, 4.5)]


async def _fake_edge(scope, receive, send) -> None:  # noqa: ANN001
    """/predict: 200 with a role, or 503 for camera ``cam-1``; the camera id is read from the multipart body."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        msg = await receive()
        body, more = body + msg.get("body", b""), msg.get("more_body", False)
    status = 503 if b"\r\n\r\ncam-1\r\n" in body else 200
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"role": "champion"}).encode()})


def test_clients_closed_and_open_loop_against_a_server() -> None:
    from benchmarks.edge_cameras import run_cameras
    from benchmarks.edge_load import run_clients

    with serve(_fake_edge) as base:
        seen: list[tuple[int, int, int]] = []
        pick = lambda k, j, i: (seen.append((k, j, i)), ("cam-0", b"f", None))[1]  # noqa: E731
        sent, _ = closed_loop(base, 3, pick, seconds=30, total=7)
        assert len(sent) == 7 and sorted(i for _, _, i in seen) == list(range(7))
        assert all(s.ok and s.role == "champion" for s in sent)
        res = run_clients(base, [b"f"], total=10, clients=2, max_s=30)  # cameras cam-0..cam-9: cam-1 answers 503
        assert (res["ok"], res["errors"], res["error_kinds"]) == (9, 1, ["HTTP 503"])
        cams = run_cameras(base, [b"f"], cameras=2, seconds=0.5, fmt="PNG")
        assert cams["frames"] > 0 and cams["errors"] > 0 and cams["roles"] == {"cam-0": ["champion"], "cam-1": []}
        start = time.perf_counter() - 1.0  # scheduled a second ago: the client's lateness counts in the latency
        got = open_loop(base, [Planned(0.2, "cam-0", b"f", "n1", "x"), Planned(0.0, "cam-1", b"f")], start)
        assert [(s.at_s, s.tag, s.status) for s in got] == [(0.0, "", 503), (0.2, "x", 200)]
        assert got[0].ms >= 1000 and got[1].ms >= 800


def test_memory_sampler_sums_the_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        assert child.pid in children(os.getpid())
        assert tree_kb(os.getpid(), "VmRSS") > tree_kb(child.pid, "VmRSS") > 0
        with MemorySampler(os.getpid(), every_s=0.01) as mem:
            time.sleep(0.1)
        assert mem.samples and all(s.hwm_kb >= s.rss_kb > 0 for s in mem.samples)
        assert mem.between(mem.samples[0].t, mem.samples[0].t + 1e-9) == mem.samples[:1]
    finally:
        child.kill()
        child.wait()
