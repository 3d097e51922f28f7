"""The Prefect `retrain` flow end to end on tiny demo data, under one temporary Prefect server (SQLite).

One project for the module (git + DVC with a local remote, an MLflow sqlite store): the first run bootstraps
the champion; a second run without new data does nothing; a new demo batch is a new DVC data version that is
trained and handed over as challenger; an injected training fault fails the flow and leaves the champion, the
manifest and every earlier artifact as they were, and the run after the fault succeeds. Each test adds its own
demo batch, so each also runs alone (after the bootstrap fixture).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("SENSITUNE_NO_PROGRESS", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from support.params import TINY_FLOW  # noqa: E402
from support.projects import git_dvc_project  # noqa: E402

from deploy.edge.rollout import load_config  # noqa: E402
from pipelines import (
    flows,  # noqa: E402
    stages,  # noqa: E402
)
from pipelines import tasks as t  # noqa: E402
from pipelines.config import load_params  # noqa: E402

NAME = "defect-inspector"
pytestmark = pytest.mark.usefixtures("prefect_server")  # one temporary Prefect server (tests/conftest.py)


class Project:
    """The tmp project: paths, flow keyword arguments, and helpers to add data and read the registry."""

    def __init__(self, root: Path) -> None:
        self.root, self.remote = root / "project", root / "dvc-remote"
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.runs = self.root / "runs" / "retrain"
        self.kw = {"config": "params.yaml", "tracking_uri": self.uri, "model_name": NAME, "settle_seconds": 0.0}
        self.batches = 0

    def add_batch(self) -> None:
        params = load_params(self.root / "params.yaml")
        params["demo"]["batch"] = self.batches
        stages.demo_stage(params)
        self.batches += 1

    def run(self, **kw):
        return flows.retrain(**{**self.kw, **kw}, return_state=True)

    def aliases(self) -> dict:
        return t.registry_aliases.fn(self.uri, NAME)

    def n_mlflow_runs(self) -> int:
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name("sensitune")
        return len(client.search_runs([exp.experiment_id])) if exp else 0


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """A git + DVC project with one demo batch, after the first (bootstrapping) retrain; cwd = the project."""
    pr = Project(tmp_path_factory.mktemp("retrain"))
    git_dvc_project(pr.root, pr.remote, TINY_FLOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(pr.root)
        pr.add_batch()
        pr.first = pr.run()
        yield pr


def test_first_run_trains_registers_and_bootstraps_champion(project: Project) -> None:
    state = project.first
    assert state.is_completed(), state.message
    r = state.result()
    assert (r["status"], r["decision"], r["model_version"]) == ("trained", "bootstrap", "1")
    # DVC: data/raw.dvc holds the version, its objects are in the remote, the run keeps a copy of the .dvc file
    md5 = yaml.safe_load((project.root / "data/raw.dvc").read_text())["outs"][0]["md5"]
    assert r["data_version"] == md5 and md5.endswith(".dir")
    assert (project.remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    run_dir = Path(r["run_dir"])
    assert (
        run_dir == Path("runs/retrain") / md5[:12]
        and (run_dir / "raw.dvc").read_text() == (project.root / "data/raw.dvc").read_text()
    )
    # MLflow: the only version is champion, no challenger; the run carries the Prefect flow run id
    assert project.aliases() == {"champion": "1", "challenger": None}
    run = MlflowClient(project.uri).get_run(r["mlflow_run_id"])
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.tags["retrain.decision"] == "bootstrap" and "heldout_acc" in run.data.metrics
    assert run.data.tags["retrain.gate_split"] == r["gate_split"] == r["comparison"]["gate_split"] == "test"
    artifacts = {a.path for a in MlflowClient(project.uri).list_artifacts(r["mlflow_run_id"], "export")}
    assert "export/openvino" in artifacts
    # rollout manifest: champion = v1's FP32 artifact, whose own manifest carries the registry version
    cfg = load_config(project.root / "rollout.yaml")
    assert cfg.champion.version == "1" and cfg.challenger is None
    art = cfg.resolve(cfg.champion.path)
    assert art == (run_dir / "published/openvino/fp32").resolve()  # sealed by publish with the registry version
    assert json.loads((art / "manifest.json").read_text())["model_version"] == "1"
    assert cfg.registry is not None and cfg.registry.model_name == NAME
    # held out = the whole test split (no champion yet), accuracy measured through the registered pyfunc
    n_test = len(list((run_dir / "data/test").glob("*/*.png")))
    assert r["comparison"]["n_heldout"] == n_test > 0
    assert round(r["comparison"]["challenger_acc"] * n_test, 6).is_integer()  # a share of the held-out images
    # state file and the Prefect side of the link
    saved = json.loads((project.runs / "retrain_state.json").read_text())["trained"]
    assert saved[r["fingerprint"]]["model_version"] == "1"
    from prefect import get_client

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(state.state_details.flow_run_id)
    assert f"mlflow-run:{r['mlflow_run_id']}" in fr.tags
    # per-epoch progress in the flow run's logs (and live in MLflow: the run's epoch metrics)
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
    assert any(lg.message.startswith("epoch 1/1: train_loss") for lg in logs), [lg.message for lg in logs][:20]
    assert MlflowClient(project.uri).get_metric_history(r["mlflow_run_id"], "val_acc")[0].step == 1


def _replace_stage(mp: pytest.MonkeyPatch, name: str, fn) -> None:
    """Swap one stage's function in THE stage list (the flow looks stages up there at run time)."""
    mp.setattr(stages, "STAGES", tuple(replace(s, run=fn) if s.name == name else s for s in stages.STAGES))


def test_no_new_data_exits_early_without_training(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("train must not run without new data")

    _replace_stage(monkeypatch, "train", boom)
    before = project.n_mlflow_runs()
    state = project.run()
    assert state.is_completed(), state.message
    assert state.name == "No new data" and "no new data in" in state.message  # a named outcome, not "Completed"
    r = state.result()
    assert r["status"] == "no-new-data" and r["data_version"] == project.first.result()["data_version"]
    assert project.n_mlflow_runs() == before
    assert sorted(p.name for p in project.runs.iterdir() if p.is_dir()) == [
        Path(project.first.result()["run_dir"]).name
    ]


def test_busy_lock_skips_the_run(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    _replace_stage(monkeypatch, "prepare", lambda *a, **k: pytest.fail("must not prepare while locked"))
    with FileLock(str(project.runs / ".retrain.lock"), timeout=0):
        state = project.run(force=True)
    assert state.is_completed() and state.result() == {"status": "locked"}


def _aliases_at_the_gate(project: Project, mp: pytest.MonkeyPatch) -> list[dict]:
    """The registry's aliases as the flow starts comparing (the gate's input): publish must not have moved any."""
    seen, compare = [], t.compare_champion

    def spy(*a, **k):
        seen.append(project.aliases())
        return compare(*a, **k)

    mp.setattr(t, "compare_champion", spy)
    return seen


def test_new_batch_is_a_new_data_version_and_handed_over(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    first = project.first.result()
    champ_seen = t.split_names(Path(first["run_dir"]) / "data")
    project.add_batch()
    at_gate = _aliases_at_the_gate(project, monkeypatch)
    state = project.run(min_gain=-1.0, challenger_share=0.5)  # margin -1: any challenger is handed over
    assert at_gate == [{"champion": "1", "challenger": None}]  # registered as v2, offered only after the gate
    assert state.is_completed(), state.message
    r = state.result()
    assert r["status"] == "trained" and r["data_version"] != first["data_version"]
    assert r["data_version"] == yaml.safe_load((project.root / "data/raw.dvc").read_text())["outs"][0]["md5"]
    assert (r["decision"], r["model_version"]) == ("handover", "2")
    assert project.aliases() == {"champion": "1", "challenger": "2"}
    cfg = load_config(project.root / "rollout.yaml")
    assert (cfg.champion.version, cfg.challenger.version, cfg.challenger_share) == ("1", "2", 0.5)
    assert cfg.resolve(cfg.challenger.path) == (Path(r["run_dir"]) / "published/openvino/fp32").resolve()
    # the comparison leaves out test images the champion trained or selected on
    test = {f"{p.parent.name}/{p.name}" for p in (Path(r["run_dir"]) / "data/test").glob("*/*.png")}
    c = r["comparison"]
    assert (c["n_test"], c["n_heldout"], c["champion_version"]) == (len(test), len(test - champ_seen), "1")
    assert c["n_heldout"] > 0 and c["champion_acc"] is not None


def test_a_challenger_the_gate_refuses_never_gets_the_alias(project: Project, monkeypatch: pytest.MonkeyPatch):
    project.add_batch()
    before, manifest = project.aliases(), (project.root / "rollout.yaml").read_bytes()
    at_gate = _aliases_at_the_gate(project, monkeypatch)
    state = project.run(min_gain=1.0)  # a held-out gain of 1.0 is out of reach: not promoted
    assert state.is_completed() and state.name == "Not promoted", state.message
    r = state.result()
    assert at_gate == [before] and project.aliases() == before  # never pointed at the new version, not even briefly
    assert r["decision"] == t.NOT_PROMOTED and r["model_version"] not in before.values()
    assert (project.root / "rollout.yaml").read_bytes() == manifest


def test_training_failure_leaves_champion_and_artifacts_intact(project: Project, monkeypatch: pytest.MonkeyPatch):
    project.add_batch()
    aliases, manifest = project.aliases(), (project.root / "rollout.yaml").read_bytes()
    before = _tree_hashes(project.runs)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("injected training fault")

    with monkeypatch.context() as mp:
        _replace_stage(mp, "train", boom)
        mp.setitem(t.STAGE_LIMITS["train"], "retry_delay_seconds", 0)
        failed = project.run()
    assert failed.is_failed() and "injected training fault" in str(failed.message)
    assert len(calls) == 2  # the task's one retry ran too
    assert project.aliases() == aliases and (project.root / "rollout.yaml").read_bytes() == manifest
    after = _tree_hashes(project.runs)
    assert {k: after.get(k) for k in before} == before  # earlier runs and the state file untouched
    failed_dirs = {Path(k).parts[0] for k in after.keys() - before.keys()}
    assert len(failed_dirs) == 1

    state = project.run()  # the fault is gone: the same data version trains, in a fresh directory
    assert state.is_completed(), state.message
    r = state.result()
    assert r["status"] == "trained" and Path(r["run_dir"]).name == f"{failed_dirs.pop()}.2"
    assert project.aliases()["champion"] == aliases["champion"]
    expected_challenger = r["model_version"] if r["decision"] == "handover" else aliases["challenger"]
    assert project.aliases()["challenger"] == expected_challenger
    challenger = load_config(project.root / "rollout.yaml").challenger
    assert (challenger.version if challenger else None) == expected_challenger


def test_a_stopped_train_ends_the_flow_with_no_stage_after_it(project: Project, monkeypatch: pytest.MonkeyPatch):
    """train.below_probe: stop (train's result says ``stopped``): a named "Stopped" end, not promoted, nothing after."""
    project.add_batch()
    aliases, manifest = project.aliases(), (project.root / "rollout.yaml").read_bytes()
    why = "no candidate beats the linear probe on validation (accuracy 0.1000 < probe 0.6000): nothing exported"
    ran = []
    with monkeypatch.context() as mp:
        _replace_stage(mp, "train", lambda params, on_epoch=None: ran.append("train") or {"stopped": why})
        for name in ("evaluate", "merge", "export"):
            _replace_stage(mp, name, lambda params, name=name: ran.append(name))
        state = project.run()
    assert state.is_completed() and state.name == "Stopped", state.message
    r = state.result()
    assert (r["status"], r["decision"], r["reason"], ran) == ("stopped", t.NOT_PROMOTED, why, ["train"])
    assert project.aliases() == aliases and (project.root / "rollout.yaml").read_bytes() == manifest


def test_handover_gate_rule() -> None:
    assert t.handover_gate(0.8, None, 0.0, True)[0] == t.BOOTSTRAP
    assert t.handover_gate(0.8, 0.8, 0.0, True)[0] == t.HANDOVER
    assert t.handover_gate(0.8, 0.75, 0.05, True)[0] == t.HANDOVER
    assert t.handover_gate(0.8, 0.76, 0.05, True)[0] == t.NOT_PROMOTED
    assert t.handover_gate(0.7, 0.75, -0.1, True)[0] == t.HANDOVER
    assert t.handover_gate(1.0, 0.0, 0.0, False)[0] == t.NOT_PROMOTED


def test_fingerprint_follows_content_not_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"a")
    fp = t.fingerprint(tmp_path)
    (tmp_path / "ok" / ".a.png.tmp").write_bytes(b"partial")
    assert t.fingerprint(tmp_path)["fingerprint"] == fp["fingerprint"] and fp["files"] == 1
    (tmp_path / "ok" / "a.png").write_bytes(b"b")
    assert t.fingerprint(tmp_path)["fingerprint"] != fp["fingerprint"]
    with pytest.raises(t.RetrainError, match="does not exist"):
        t.fingerprint(tmp_path / "missing")


def test_deployment_schedule_and_concurrency() -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.server.schemas.schedules import CronSchedule

    dep = flows.build_deployment(timezone="Europe/Berlin", parameters={"min_gain": 0.01})
    (sched,) = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert dep.concurrency_limit == 1
    assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert dep.parameters == {"min_gain": 0.01} and dep.name == "nightly"
    # the next three runs as Prefect's scheduler computes them: 02:00 Berlin = 00:00 UTC in summer
    server = CronSchedule(cron=sched.schedule.cron, timezone=sched.schedule.timezone)
    dates = asyncio.run(server.get_dates(n=3, start=datetime(2025, 6, 1, 12, tzinfo=timezone.utc)))
    assert [d.astimezone(timezone.utc).replace(tzinfo=None) for d in dates] == [
        datetime(2025, 6, d, 0, 0) for d in (2, 3, 4)
    ]
    with pytest.raises(ValueError, match="collision"):
        flows.build_deployment(collision="QUEUE")


class _Vanishing:
    """A TCP forwarder to the module's Prefect server that can vanish: the server goes away for one client only."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.conns: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


@pytest.mark.slow  # default suite <= ~15 min: `make slow` runs it
def test_serve_exits_on_sigterm_when_the_prefect_server_is_gone(tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_URL

    api = urlsplit(PREFECT_API_URL.value())
    proxy = _Vanishing(api.hostname, api.port)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{proxy.port}{api.path}", "PYTHONPATH": str(root)}
    out = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pipelines.flows", "serve", "--name", "sigterm-test", "--config", "params.yaml"]
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "serving retrain/sigterm-test" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(5)  # the runner starts: its SIGTERM handler is the one that used to wait on the server
        proxy.close()  # the server is gone
        time.sleep(1)
        assert proc.poll() is None, out.read_text()[-2000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert time.monotonic() - t0 < 15 and rc in (0, 143), (rc, out.read_text()[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
