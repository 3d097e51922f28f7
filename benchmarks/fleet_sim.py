"""Fleet simulator: N boxes, each the real sync client (`deploy.edge.sync.Sync`: acceptance, manifests, fleet reports)
against a real `mlflow server` on 127.0.0.1, simulated cameras with cached logits and known per-version error rates
(benchmarks/fleet_cameras.py), and the fleet decider (`deploy.edge.fleet.Decider`), all on a simulated clock.

    python -m benchmarks.fleet_sim --boxes 3                                        smoke run (minutes)
    python -m benchmarks.fleet_sim --boxes 10 50 100 200 --out benchmarks/results/fleet.md    the sweep (idle box)

Per N, on one registry, one round = every online box serves frames, syncs (thread pool), then one decider round:
    bad      v2 (20 % wrong: escapes above the 2 % ceiling), waves canary -> 10 % -> 50 % -> all: aborted in which
             wave, frames it got on boxes outside wave 1 (must be 0), rounds until no box serves it
    worse    v7, 1 pt worse than champion v1 (6 % vs 5 % wrong), the same waves: must not be promoted
    good     v3, 1 pt better than champion v1 (4 % vs 5 % wrong): rounds and wall seconds until every box of each
             wave serves it, and the final decision (promote)
    restart  the server stopped for two rounds, then started again: rounds until every box syncs again
    offline  20 % of the boxes lose the registry for a simulated day while v4 (inference errors) is aborted, then
             v5 and v6 promoted in turn: on return, syncs until they serve the champion, the versions they ever
             downloaded (v5, the intermediate one, must not be among them), and v4 frames served after its abort
             (online boxes: until their next sync; offline ones: until stale_after_s without the registry)
Throughout: registry requests per wall second, p50/p99 request latency, bytes the boxes downloaded; the table sets
each decision against the simulated truth (expected, got).

The last wave's floor (``--final-labelled``, default 8000 labelled challenger frames) is sized so that `decide` on the
pooled evidence gets a 1-pt difference right: with n frames per arm (the champion's arm has at least as many), the
gain's standard deviation is sqrt((p1 (1 - p1) + p2 (1 - p2)) / n). good, 0.96 vs 0.95: sqrt(0.0859 / 8000) =
0.0033, so a wrong "gain < 0" is 3.05 sd away (0.1 %); worse, 0.94 vs 0.95: sqrt(0.1039 / 8000) = 0.0036, a wrong
"gain >= 0" 2.77 sd away (0.3 %). Earlier waves stop a plan only beyond doubt (`deploy.edge.fleet.evidence`): their
floor (``--min-labelled``) sizes the safety check only. Frames per box and round default to 2000 over the fleet (at
least 20 a box), so a small fleet reaches that floor in a few rounds too; the offline day serves ``--offline-frames``
(its question is v4's error rate) and floors its last waves at the CLI's default, the rule's ``--min-samples``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.edge_box import cpu_info, free_port, uptime
from benchmarks.fleet_cameras import Behaviour, Cameras, versioned
from benchmarks.stat_model import CLASSES, N_FEATURES, build_artifact
from deploy.edge.box import BoxConfig
from deploy.edge.fleet import Decider, Plan, Wave, start
from deploy.edge.fleet.plan import POOLED_TAG
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.registry import RegistryError
from deploy.edge.rollout.manifest import DecisionRule, load_config
from deploy.edge.sync import Sync
from pipelines.tracking.registry import serve_command

NAME = "sensitune-fleet-sim"
BEHAVIOUR = {"1": Behaviour(0.05), "2": Behaviour(0.20), "3": Behaviour(0.04), "4": Behaviour(0.0, errors=0.3),
             "5": Behaviour(0.01), "6": Behaviour(0.0), "7": Behaviour(0.06)}  # fmt: skip
EXPECTED = {"bad": "abort in wave 1", "worse": "abort", "good": "promote",
            "offline": "v4 abort, v5 promote, v6 promote"}  # fmt: skip
CAMS = [f"cam-{i}" for i in range(8)]


class Meter:
    """Every registry request of the boxes and deciders: when, who, how long, how many bytes came back."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, float]] = []
        self.bytes: dict[str, int] = {}
        self.lock = threading.Lock()

    def wrap(self, reg: RestRegistry, who: str) -> RestRegistry:
        call, read = reg._call, reg._read

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return call(*a, **kw)
            finally:
                with self.lock:
                    self.calls.append((time.time(), who, time.perf_counter() - t))

        def counted(*a: Any, **kw: Any) -> bytes:
            data = read(*a, **kw)
            with self.lock:
                self.bytes[who] = self.bytes.get(who, 0) + len(data)
            return data

        reg._call, reg._read = timed, counted  # instance attributes: the client's own calls go through them
        return reg

    def since(self, t0: float) -> dict[str, Any]:
        calls = [c for c in self.calls if c[0] >= t0]
        if not calls:
            return {"requests": 0}
        lat = np.array([c[2] for c in calls]) * 1e3
        span = max(c[0] for c in calls) - min(c[0] for c in calls) or 1e-9
        p50, p99 = (round(float(np.percentile(lat, q)), 1) for q in (50, 99))
        return {"requests": len(calls), "per_s": round(len(calls) / span, 1), "p50_ms": p50, "p99_ms": p99}


class Server:
    """`mlflow server` (sqlite registry, proxied artifacts) in `folder`; stop and start keep its data and port."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder, self.port, self.workers, self.proc = folder, free_port(), workers, None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = serve_command(self.folder, "127.0.0.1", self.port) + ["--workers", str(self.workers)]
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 - the server's own, closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(1200):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"mlflow server did not start: {self.folder / 'server.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


class Sim:
    """N boxes on one registry, their cameras, one decider, one clock (module docstring)."""

    def __init__(self, root: Path, n: int, server: Server, rule: DecisionRule, share: float, frames: int,
                 threads: int = 32, timeout_s: float = 60.0) -> None:  # fmt: skip
        self.root, self.server, self.rule, self.frames, self.t = root, server, rule, frames, 1_800_000_000.0
        self.meter, self.cameras = Meter(), Cameras(BEHAVIOUR)
        self.names = [f"box-{i:03d}" for i in range(n)]
        self.frame = dict.fromkeys(self.names, 0)
        self.boxes: dict[str, Sync] = {}
        self.offline: set[str] = set()
        for name in self.names:
            sync = {"interval_s": 300, "stale_after_s": 900, "challenger_share": share, "fleet": True}
            d = {"box": name, "line": f"line-{name[-1]}", "store": "store", "sync": sync,
                 "registry": {"url": server.url, "model_name": NAME, "timeout_s": timeout_s}}  # fmt: skip
            (root / name).mkdir(parents=True)
            (root / name / "box.yaml").write_text(yaml.safe_dump(d))
            box = Sync(BoxConfig.load(root / name / "box.yaml"))
            box.reg = box.intake.reg = self.meter.wrap(box.reg, "box")
            box.fleet.clock = lambda: self.t
            self.boxes[name] = box
        self.reg = self.meter.wrap(RestRegistry(server.url, NAME, timeout_s=2 * timeout_s), "decider")
        self.decider = Decider(self.reg, "sim", lambda: self.t)
        self.pool = ThreadPoolExecutor(min(threads, n))

    def sync(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        names = [n for n in names or self.names if n not in self.offline]
        return dict(zip(names, self.pool.map(lambda n: self.boxes[n].run_once(), names), strict=True))

    def round(self, dt: float, frames: int | None = None) -> dict[str, Any]:
        """Every box serves (offline ones too: the line runs), online ones sync, the decider decides, time moves."""
        for n in self.names:
            rollout = self.root / n / "rollout.yaml"
            self.frame[n] = self.cameras.serve(rollout, n, CAMS, frames or self.frames, self.frame[n])
        for n in self.offline:
            self.boxes[n].run_once()  # fails: no registry; a plan's challenger lapses after stale_after_s
        out = self.sync()
        try:
            decision = self.decider.round()
        except RegistryError as e:  # the server is down: this round decides nothing (a failed flow run)
            decision = {"outcome": "error", "error": str(e)}
        self.t += dt
        return {"decision": decision, "errors": sum("error" in o for o in out.values())}

    def serving(self, version: str) -> set[str]:
        return {n for n in self.names if (c := load_config(self.root / n / "rollout.yaml").challenger)
                and c.version == version}  # fmt: skip

    def champions(self) -> dict[str, str]:
        return {n: load_config(self.root / n / "rollout.yaml").champion.version for n in self.names}

    def start(self, version: str, specs: list[str], labelled: int, hours: float, final: int | None = None,
              **kw: Any) -> Plan:  # fmt: skip
        """A plan of `version` over the waves `specs`; each wave's floors `labelled` and `hours`, the last's
        labelled floor `final` (default `labelled`)."""
        waves = [Wave.parse(s, labelled, hours) for s in specs]
        waves[-1] = replace(waves[-1], min_labelled=labelled if final is None else final)
        return start(self.reg, version, waves, who="sim", why="simulated", rule=self.rule, at=self.t, **kw)


def publish(server: Server, root: Path) -> None:
    """v1..v6 of one tiny statistic model (their answers come from the cameras), v1 the champion."""
    from mlflow import MlflowClient

    client = MlflowClient(server.url, server.url)
    client.create_registered_model(NAME)
    exp = client.create_experiment("fleet-sim")
    rng = np.random.default_rng(0)
    base = build_artifact(root / "base", "1", rng.normal(size=(len(CLASSES), N_FEATURES)), rng.normal(size=4), 32)
    for v in BEHAVIOUR:
        art = versioned(base, root / f"v{v}" / "openvino" / "fp32", v)
        run = client.create_run(exp).info.run_id
        client.log_artifacts(run, str(art.parent.parent), "export")
        assert client.create_model_version(NAME, f"runs:/{run}/export", run_id=run).version == v
    client.set_registered_model_alias(NAME, "champion", "1")


def scenario_bad(sim: Sim, args: argparse.Namespace) -> dict[str, Any]:
    sim.sync()
    plan = sim.start("2", [sim.names[0], "10%", "50%", "all"], args.min_labelled, args.min_hours,
                     max_escape_rate=0.02)  # fmt: skip
    wave1 = {n for n in sim.names if plan.membership(n)}
    rounds, out = 0, {}
    while rounds < args.max_rounds and (out.get("decision") or {}).get("action") != "abort":
        out, rounds = sim.round(args.interval), rounds + 1
    aborted_in = Plan.of(sim.reg.model_version("2")).wave + 1
    gone = 0
    while sim.serving("2") and gone < 5:
        sim.sync()
        gone += 1
    outside = sum(sim.cameras.served.get((n, "challenger", "2"), 0) for n in sim.names if n not in wave1)
    aborted = out["decision"].get("action") == "abort"
    return {"got": f"abort in wave {aborted_in}" if aborted else "not aborted", "rounds": rounds,
            "frames_outside_wave_1": outside, "syncs_until_withdrawn": gone,
            "why": out["decision"].get("reasons")}  # fmt: skip


def rollout(sim: Sim, args: argparse.Namespace, version: str) -> dict[str, Any]:
    """`version` through canary -> 10 % -> 50 % -> all to its final decision: the rounds, each wave's reach (syncs
    and wall seconds until every box of the wave serves it), the pooled accuracies the decision rested on."""
    sim.sync()
    sim.start(version, [sim.names[0], "10%", "50%", "all"], args.min_labelled, args.min_hours, args.final_labelled)
    reach, rounds, out = [], 0, {}
    while rounds < args.max_rounds and (out.get("decision") or {}).get("outcome") not in ("promoted", "aborted"):
        out, rounds = sim.round(args.interval), rounds + 1
        action = out["decision"].get("action")
        if action:
            print(f"  v{version} round {rounds}: {action}: {out['decision'].get('reasons')}", flush=True)
        if action == "advance":
            plan, t0, syncs = Plan.of(sim.reg.model_version(version)), time.time(), 0
            members = {n for n in sim.names if plan.membership(n)}
            while not members <= sim.serving(version) and syncs < 5:
                sim.sync()
                syncs += 1
            reach.append({"wave": plan.wave + 1, "boxes": len(members), "syncs": syncs,
                          "wall_s": round(time.time() - t0, 2)})  # fmt: skip
        if action in ("promote", "abort"):
            break
    arms = json.loads(sim.reg.model_version(version)["tags"].get(POOLED_TAG) or "{}").get("arms") or {}
    accuracy = {r: f"{a['accuracy']:.4f} of {a['labelled']}" for r, a in arms.items() if a.get("accuracy") is not None}
    got = out["decision"].get("action") or out["decision"].get("outcome")
    return {"got": got, "rounds": rounds, "waves": reach, "pooled_accuracy": accuracy,
            "why": out["decision"].get("reasons")}  # fmt: skip


def scenario_restart(sim: Sim, args: argparse.Namespace) -> dict[str, Any]:
    sim.server.stop()
    down = [sim.round(args.interval)["errors"] for _ in range(2)]
    t0 = time.time()
    sim.server.start()
    up, rounds = len(sim.names), 0
    while up and rounds < 10:
        up, rounds = sim.round(args.interval)["errors"], rounds + 1
    return {"errors_while_down": down, "rounds_to_recover": rounds, "wall_s": round(time.time() - t0, 1)}


def scenario_offline(sim: Sim, args: argparse.Namespace) -> dict[str, Any]:
    sim.sync()
    sim.start("4", ["all"], 0, 0.0, args.min_samples)  # the last wave's floor: the CLI's default, the rule's
    sim.sync()
    away = set(sim.names[: max(1, len(sim.names) // 5)])
    for n in away:
        sim.boxes[n].reg.url = f"http://127.0.0.1:{free_port()}"
    sim.offline, abort_at, decisions, queue = away, None, [], ["5", "6"]
    for _ in range(args.day_rounds):  # one simulated day: v4 aborted, then v5 and v6 rolled out in turn
        out = sim.round(86400 / args.day_rounds, args.offline_frames)
        action = out["decision"].get("action")
        if action in ("abort", "promote"):
            decisions.append(f"v{out['decision']['plan']['version']} {action}")
            print(f"  {decisions[-1]}: {'; '.join(out['decision'].get('reasons') or [])}", flush=True)
            if abort_at is None:
                abort_at = {n: sim.cameras.served.get((n, "challenger", "4"), 0) for n in sim.names}
            if queue:
                sim.start(queue.pop(0), ["10%", "all"], 0, 0.0, args.min_samples)
    for n in away:
        sim.boxes[n].reg.url = sim.server.url
    sim.offline, rounds = set(), 0
    target = sim.reg.alias("champion")["version"]
    while rounds < 5 and any(sim.champions()[n] != target for n in away):
        sim.sync(sorted(away))
        rounds += 1
    after = {n: sim.cameras.served.get((n, "challenger", "4"), 0) - (abort_at or {}).get(n, 0) for n in sim.names}
    stores = {n: sorted(p.name for p in (sim.root / n / "store").glob("[!.]*") if p.is_dir()) for n in away}
    return {"got": ", ".join(decisions), "offline": len(away), "decisions_while_away": decisions,
            "champion_now": target, "syncs_to_catch_up": rounds,
            "offline_on_champion": all(sim.champions()[n] == target for n in away),
            "versions_downloaded_by_offline": sorted({v for s in stores.values() for v in s}),
            "v4_frames_after_abort": {"online": sum(v for n, v in after.items() if n not in away),
                                      "offline": sum(v for n, v in after.items() if n in away)}}  # fmt: skip


def run(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    server = Server(root / "registry", args.workers)
    server.start()
    try:
        publish(server, root / "models")
        rule = DecisionRule(min_samples=args.min_samples, min_gain=0.0, max_latency_increase=0.5, max_error_rate=0.05)
        frames = args.frames or max(20, -(-2000 // n))  # 2000 frames a round over the fleet (module docstring)
        sim = Sim(root / "boxes", n, server, rule, args.share, frames, args.threads, args.timeout_s)
        t0, out = time.time(), {"boxes": n}
        print(f"N={n}: {frames} frames a box and round; first sync", flush=True)
        sim.sync()  # first syncs: every box fetches the champion
        out["first_sync"] = sim.meter.since(t0) | {"wall_s": round(time.time() - t0, 1)}
        for name, fn in SCENARIOS.items():
            t = time.time()
            print(f"N={n} {name}: started", flush=True)
            out[name] = fn(sim, args) | {"registry": sim.meter.since(t), "wall_s": round(time.time() - t, 1)}
            print(f"N={n} {name}: {json.dumps(out[name], default=str)}", flush=True)
        out["box_bytes_downloaded"] = sim.meter.bytes.get("box", 0)
        out["registry_total"] = sim.meter.since(t0)
        sim.pool.shutdown()
        return out
    finally:
        server.stop()


SCENARIOS = {"bad": scenario_bad, "worse": lambda sim, args: rollout(sim, args, "7"),
             "good": lambda sim, args: rollout(sim, args, "3"), "restart": scenario_restart,
             "offline": scenario_offline}  # fmt: skip


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per N and scenario: the decision expected from the simulated truth, the one got, and the numbers."""
    head = "| N | scenario | expected | got | right | result | registry requests | req/s | p50 ms | p99 ms | wall s |"
    lines = [head, "|" + "---|" * 11]
    for r in results:
        for name in ("first_sync", *SCENARIOS):
            s = r[name]
            reg = s.get("registry", s)
            shown = {k: v for k, v in s.items() if k not in ("registry", "wall_s", "requests", "per_s", "p50_ms",
                                                             "p99_ms", "why", "got")}  # fmt: skip
            want, got = EXPECTED.get(name, ""), s.get("got", "")
            right = ("yes" if want == got else "**no**") if want else ""
            lines.append(f"| {r['boxes']} | {name} | {want} | {got} | {right} | {json.dumps(shown)} "
                         f"| {reg.get('requests')} | {reg.get('per_s')} | {reg.get('p50_ms')} | {reg.get('p99_ms')} "
                         f"| {s.get('wall_s')} |")  # fmt: skip
        lines.append(f"| {r['boxes']} | bytes | | | | boxes downloaded {r['box_bytes_downloaded']} bytes | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[3])
    ap.add_argument("--frames", type=int, help="frames per box per round, all labelled (default: 2000 / N, >= 20)")
    ap.add_argument("--offline-frames", type=int, default=20, help="frames per box per round in the offline day")
    ap.add_argument("--share", type=float, default=0.5, help="box.yaml challenger_share")
    ap.add_argument("--interval", type=float, default=300.0, help="simulated seconds per round")
    ap.add_argument("--min-labelled", type=int, default=100, help="each earlier wave's labelled challenger floor")
    ap.add_argument("--final-labelled", type=int, default=8000, help="the last wave's floor (module docstring)")
    ap.add_argument("--min-hours", type=float, default=0.5, help="each wave's time floor (simulated)")
    ap.add_argument("--min-samples", type=int, default=200, help="the promotion rule's labelled frames per arm")
    ap.add_argument("--max-rounds", type=int, default=200)
    ap.add_argument("--day-rounds", type=int, default=96, help="rounds in the simulated offline day")
    ap.add_argument("--workers", type=int, default=2, help="mlflow server workers")
    ap.add_argument("--threads", type=int, default=32, help="boxes syncing at once (thread pool)")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="each box's registry timeout (the decider: 2x)")
    ap.add_argument("--out", type=Path, help="write the markdown table and the JSON here (.md and .json)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = ap.parse_args(argv)
    load_start = uptime()
    results = []
    for n in args.boxes:
        root = Path(tempfile.mkdtemp(prefix=f"fleet-sim-{n}-"))
        try:
            results.append(run(n, args, root))
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(results[-1], indent=1, default=str), flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        command = " ".join(["python -m benchmarks.fleet_sim", *(argv if argv is not None else sys.argv[1:])])
        machine = f"{cpu_info()}; Python {platform.python_version()}, {platform.system()} {platform.release()}"
        head = f"- Machine: {machine}\n- Load (`uptime`) at start: `{load_start}`; at end: `{uptime()}`"
        args.out.write_text(f"{__doc__.splitlines()[0]}\n\n`{command}`\n\n{head}\n\n{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
