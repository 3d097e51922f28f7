"""Many lines per retrain on a local Ray cluster (2 CPUs, 127.0.0.1, no dashboard) under one Prefect test server.

One git + DVC project with three lines: a and b get tiny demo data and retrain in parallel (one CPU each); c's new
batch holds a broken image, so its retrain fails at `prepare` while the others train. Afterwards a and b each have
their own DVC data version, run directory, registered model (champion v1) and rollout manifest; c has none of
them, and the flow reports c failed. The same flow without Ray then runs the lines one after another.
Uses the tiny params of tests/test_flows.py (support/params.py's `TINY_FLOW`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

from mlflow import MlflowClient  # noqa: E402
from support.params import TINY_FLOW  # noqa: E402
from support.projects import git_dvc_project  # noqa: E402

from deploy.edge.rollout import load_config  # noqa: E402
from pipelines import lines as L  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines import tasks as t  # noqa: E402
from pipelines.config import load_params  # noqa: E402
from spt_core.portable.errors import SensituneError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# minutes on a shared 2-core CPU (three lines' whole retrain, Ray and Prefect start-up): `pytest -m slow`
SLOW = pytest.mark.slow
CLASSES = ["crack", "ok", "scratch", "spot"]


def _lines_yaml(names: list[str]) -> dict:
    lines = {n: {"raw": f"data/lines/{n}/raw", "classes": CLASSES, "ok_class": "ok", "budget": "5%"} for n in names}
    if "c" in lines:  # started at once beside a and b: its failure happens while they train
        lines["c"]["resources"] = {"num_cpus": 0}
    return {"resources": {"num_cpus": 1}, "lines": lines}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_server: None):
    root = tmp_path_factory.mktemp("lines")
    remote = root / "dvc-remote"
    proj = git_dvc_project(root / "project", remote, TINY_FLOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(proj)
        for seed, name in enumerate("abc"):
            stages.demo_stage(load_params("params.yaml", {"paths.raw": f"data/lines/{name}/raw", "demo.seed": seed}))
        (proj / "data/lines/c/raw/ok/broken.png").write_bytes(b"not an image")  # c's camera sent a broken file
        (proj / "lines.yaml").write_text(yaml.safe_dump(_lines_yaml(["a", "b", "c"])))
        quiet = ("DO_NOT_TRACK", "DVC_NO_ANALYTICS", "SENSITUNE_NO_PROGRESS", "OMP_NUM_THREADS")
        env = {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
               **dict.fromkeys(quiet, "1")}  # fmt: skip
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="prefect",
                 runtime_env={"env_vars": env}, log_to_driver=False)  # fmt: skip
        try:
            uri = f"sqlite:///{root / 'mlflow.db'}"
            kw = {"lines": "lines.yaml", "config": "params.yaml", "tracking_uri": uri, "settle_seconds": 0.0}
            state = L.lines_flow("auto")(**kw, return_state=True)
            yield {"root": proj, "remote": remote, "uri": uri, "state": state, "kw": kw}
        finally:
            ray.shutdown()


@SLOW
def test_two_lines_retrain_in_parallel_on_ray(project: dict) -> None:
    proj, summary = project["root"], json.loads((project["root"] / "runs/lines/lines.json").read_text())
    a, b = summary["a"], summary["b"]
    assert (a["status"], a["decision"], b["status"], b["decision"]) == ("trained", "bootstrap", "trained", "bootstrap")
    assert a["pid"] != b["pid"] and a["started"] < b["ended"] and b["started"] < a["ended"]  # overlapping, 2 workers
    # two DVC data versions, each its own .dvc file and in the remote
    md5 = {n: yaml.safe_load((proj / f"data/lines/{n}/raw.dvc").read_text())["outs"][0]["md5"] for n in "ab"}
    assert md5["a"] != md5["b"] and (a["data_version"], b["data_version"]) == (md5["a"], md5["b"])
    for m in md5.values():
        assert (project["remote"] / "files" / "md5" / m[:2] / m[2:]).is_file()
    # two run directories with their artifacts, two registered models, two rollout manifests
    for n, r in (("a", a), ("b", b)):
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == proj / "runs/lines" / n and (run_dir / "export/openvino/fp32/manifest.json").is_file()
        assert t.registry_aliases.fn(project["uri"], f"sensitune-{n}") == {"champion": "1", "challenger": None}
        cfg = load_config(proj / "runs/lines" / n / "rollout.yaml")
        assert cfg.champion.version == "1" and cfg.line == n and cfg.resolve(cfg.champion.path).is_relative_to(run_dir)


@SLOW
def test_a_failing_line_leaves_the_others_published(project: dict) -> None:
    state = project["state"]
    assert state.is_failed() and "line(s) c failed" in str(state.message)
    c = json.loads((project["root"] / "runs/lines/lines.json").read_text())["c"]
    assert c["status"] == "failed" and "broken.png" in c["error"]
    names = {m.name for m in MlflowClient(project["uri"]).search_registered_models()}
    assert names == {"sensitune-a", "sensitune-b"}
    c_root = project["root"] / "runs/lines/c"
    assert not (c_root / "rollout.yaml").exists() and not (c_root / "retrain_state.json").exists()
    assert not list(c_root.glob("*/tuned"))


@SLOW
def test_without_ray_the_lines_run_one_after_another(project: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project["root"])
    (project["root"] / "lines.yaml").write_text(yaml.safe_dump(_lines_yaml(["a", "b"])))
    assert L.lines_flow(None) is L.retrain_lines  # default task runner: one worker thread
    summary = L.lines_flow(None)(**project["kw"])
    assert {n: r["status"] for n, r in summary.items()} == {"a": "no-new-data", "b": "no-new-data"}
    assert (
        summary["a"]["pid"] == summary["b"]["pid"] == os.getpid() and summary["a"]["ended"] <= summary["b"]["started"]
    )


def test_lines_file_problems_are_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = {"lines": {"x": {"raw": "r", "classes": ["ok"], "ok_class": "good", "colour": 1},
                     "y": {"raw": "r", "set": {"train.lrr": 1}}, "z": {"classes": ["ok"]}}}  # fmt: skip
    (tmp_path / "lines.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SensituneError) as e:
        L.load_lines("lines.yaml", None, "runs")
    msg = str(e.value)
    assert "line x: unknown key(s) ['colour']" in msg and "train.lrr" in msg and "line z: give raw" in msg
    assert L.absolute_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{tmp_path / 'm.db'}"


def test_the_command_line_refuses_a_bad_lines_file_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert L.main(["run", "--lines", "nope.yaml", "--no-use-dvc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lines nope.yaml: file not found") and "\n" not in err
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_FLOW))
    lines = {"lines": {"x": {"raw": "r", "budget": "2%", "set": {"train.lrr": 1}}}}
    (tmp_path / "lines.yaml").write_text(yaml.safe_dump(lines))
    assert L.main(["run"]) == 2  # the flow's own flags and defaults (lines.yaml, params.yaml), from its signature
    err = capsys.readouterr().err
    assert err.startswith("error: lines.yaml: line x:") and "train.lrr" in err
