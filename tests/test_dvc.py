"""The DVC pipeline (dvc.yaml, params.yaml, .dvc/config) on tiny data in a throw-away git repository.

Default suite: the caching claims on the real dvc.yaml up to `evaluate` -- nothing changed runs nothing,
`train.lr` re-runs train and later but not measure/plan, `plan.budget` re-runs plan and later but not
measure -- and data versioning (`dvc add` / push / pull through the default local remote).
Slow: the whole pipeline incl. export and MLflow tracking, and an experiment sweep over budgets.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support.projects import BIN, make_repo, repo_env, set_param

RAN = re.compile(r"Running stage '([^']+)'")


def _line_folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """A user's ImageFolder: good as 8-bit PNG, defects as 16-bit TIFF (a Mono16 camera's archive)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            if cls == "good":
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
            else:
                Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(root / cls / f"{i}.tif")
    return root


@pytest.mark.slow  # default suite <= ~10 min: `make slow` runs it
def test_readme_import_recipe_from_a_fresh_clone(tmp_path: Path) -> None:
    """`sensitune import` in a clone: import -> dvc repro -> commit; a second batch is a new data version (README's
    recipe, with `sensitune init`, is tests/test_readme_recipe.py)."""
    repo = tmp_path / "line7"
    run = make_repo(repo, demo=False)
    set_param(repo, "data", "ok_class", "good")
    for key, value in (("split", [0.6, 0.2, 0.2]), ("min_per_class", 1), ("n_train", None), ("n_val", None)):
        set_param(repo, "data", key, value)
    out = run(str(BIN / "sensitune"), "import", str(_line_folder(tmp_path / "my_line", {"good": 12, "dent": 6})))
    assert "imported 18 file(s)" in out and (repo / "data/raw.dvc").is_file()
    out = run("dvc", "repro", "evaluate")
    assert RAN.findall(out) == ["prepare", "measure", "plan", "train", "evaluate"], out
    info = json.loads((repo / "data/prepared/dataset.json").read_text())
    assert info["ok_class"] == "good" and info["counts"]["test"] == {"dent": 1, "good": 2}
    metrics = json.loads((repo / "runs/main/metrics.json").read_text())
    assert metrics["ok_class"] == "good" and metrics["threshold"] is not None and "escape_rate" in metrics
    assert (repo / "runs/main/confusion.png").is_file()
    run("git", "add", "-A")
    run("git", "commit", "-qm", "line 7, data v1")
    assert json.loads(run("dvc", "status", "--json", "--with-deps", "evaluate")) == {}
    run(str(BIN / "sensitune"), "import", str(_line_folder(tmp_path / "batch2", {"good": 3, "dent": 2}, start=100)))
    status = json.loads(run("dvc", "status", "--json", "--with-deps", "evaluate"))
    assert status["prepare"] == [{"changed deps": {"data/raw": "modified"}}]
    assert yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]["nfiles"] == 23
    # a class list without the declared good class stops at import, naming what it found
    set_param(repo, "data", "ok_class", "ok")
    out = run(str(BIN / "sensitune"), "import", str(_line_folder(tmp_path / "other", {"pass": 2, "dent": 2})), ok=False)
    assert "data.ok_class='ok' is not a class of" in out and "['dent', 'pass']" in out


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _out_md5(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o.get("md5") for o in lock[stage]["outs"]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Callable[..., str]]:
    """A repo where `dvc repro evaluate` (prepare .. evaluate) has run once."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    run = make_repo(repo)
    out = run("dvc", "repro", "evaluate")
    assert RAN.findall(out) == ["prepare", "measure", "plan", "train", "evaluate"], out
    return repo, run


def test_second_repro_does_nothing(pipeline: tuple[Path, Callable[..., str]]) -> None:
    repo, run = pipeline
    before = (repo / "dvc.lock").read_text()
    out = run("dvc", "repro", "evaluate")
    assert RAN.findall(out) == [], out
    assert "didn't change, skipping" in out
    assert (repo / "dvc.lock").read_text() == before
    assert json.loads(run("dvc", "status", "--json", "--with-deps", "evaluate")) == {}


def test_lr_change_reruns_train_and_later_only(pipeline: tuple[Path, Callable[..., str]]) -> None:
    repo, run = pipeline
    lock0 = _lock(repo)
    sens = repo / "runs/main/sensitivity.safetensors"
    mtime = sens.stat().st_mtime_ns
    set_param(repo, "train", "lr", 0.01)
    status = json.loads(run("dvc", "status", "--json", "--with-deps", "evaluate"))
    assert list(status) == ["train"], status  # only train reads train.lr
    assert status["train"] == [{"changed deps": {"params.yaml": {"train.lr": "modified"}}}]

    out = run("dvc", "repro", "evaluate")
    assert RAN.findall(out) == ["train", "evaluate"], out
    lock1 = _lock(repo)
    for stage in ("prepare", "measure", "plan"):
        assert lock1[stage] == lock0[stage], stage
    assert sens.stat().st_mtime_ns == mtime  # measured once, not re-measured
    assert _out_md5(lock1, "train") != _out_md5(lock0, "train")  # a new adapter...
    assert lock1["evaluate"]["deps"] != lock0["evaluate"]["deps"]  # ...which evaluate re-read
    assert json.loads((repo / "runs/main/metrics.json").read_text())["epochs"] == 1


@pytest.mark.slow  # default suite <= ~10 min: `make slow` runs it
def test_budget_change_reruns_plan_and_later_not_measure(pipeline: tuple[Path, Callable[..., str]]) -> None:
    repo, run = pipeline
    lock0 = _lock(repo)
    trainable0 = json.loads((repo / "runs/main/metrics.json").read_text())["trainable"]
    set_param(repo, "plan", "budget", "10%")
    assert list(json.loads(run("dvc", "status", "--json", "--with-deps", "evaluate"))) == ["plan"]

    out = run("dvc", "repro", "evaluate")
    assert RAN.findall(out) == ["plan", "train", "evaluate"], out
    lock1 = _lock(repo)
    assert lock1["prepare"] == lock0["prepare"] and lock1["measure"] == lock0["measure"]
    assert lock1["plan"]["params"]["params.yaml"]["plan.budget"] == "10%"
    metrics = json.loads((repo / "runs/main/metrics.json").read_text())
    assert metrics["trainable"] > trainable0  # twice the budget, more trainable values


def test_new_defect_batch_is_a_new_data_version(pipeline: tuple[Path, Callable[..., str]]) -> None:
    repo, run = pipeline
    v1 = yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]
    assert v1["nfiles"] == 4 * 6
    run(str(BIN / "sensitune"), "demo", "--batch", "1", "-q")
    run("dvc", "add", "-q", "data/raw")
    run("dvc", "push", "-q")
    v2 = yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]
    assert v2["nfiles"] == 2 * 4 * 6 and v2["md5"] != v1["md5"]
    status = json.loads(run("dvc", "status", "--json"))
    assert status["prepare"] == [{"changed deps": {"data/raw": "modified"}}]
    assert "measure" not in status  # its input (data/prepared) changes only when prepare re-runs

    # The cache copy gone (a fresh machine): pull restores this version from the local remote.
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data/raw")
    run("dvc", "pull", "-q", "data/raw.dvc")
    assert len(list((repo / "data/raw").rglob("*.png"))) == 2 * 4 * 6
    assert "data/raw.dvc" not in json.loads(run("dvc", "status", "--json", "data/raw.dvc"))

    # The previous data version is still one checkout away.
    run("git", "checkout", "-q", "HEAD", "--", "data/raw.dvc")
    run("dvc", "checkout", "-q", "data/raw.dvc")
    assert len(list((repo / "data/raw").rglob("*.png"))) == 4 * 6


@pytest.mark.slow  # default suite <= ~10 min: `make slow` runs it
def test_adapter_plan_skips_merge_and_export_but_evaluates_and_tracks(pipeline: tuple[Path, Callable]) -> None:
    """Adapters are nonlinear: no plain model to merge or export, yet `dvc repro` runs to the end."""
    repo, run = pipeline
    set_param(repo, "plan", "structured", "adapter")
    set_param(repo, "plan", "allocation", "global")
    ran = RAN.findall(run("dvc", "repro"))
    assert {"plan", "train", "evaluate", "merge", "export", "track"} <= set(ran), ran
    plan = json.loads((repo / "runs/main/plan.json").read_text())
    assert plan["by_kind"]["adapter"]["params"] > 0
    merged = json.loads((repo / "runs/main/merged/merged.json").read_text())
    assert "cannot be folded" in merged["skipped"] and not (repo / "runs/main/merged/model.safetensors").exists()
    report = json.loads((repo / "runs/main/export/export_report.json").read_text())
    assert report["passed"] is False and report["skipped"] == merged["skipped"]
    assert [p.name for p in (repo / "runs/main/export").iterdir()] == ["export_report.json"]
    assert json.loads((repo / "runs/main/eval.json").read_text())["n"] > 0  # the tuned model is still evaluated
    record = json.loads((repo / "runs/main/mlflow_run.json").read_text())
    assert record["status"] == "skipped" and record["run_id"] and record["model_version"] is None
    assert record["reason"] == merged["skipped"]  # logged in MLflow, nothing registered
    assert RAN.findall(run("dvc", "repro")) == []  # and the skip records are stable outputs


@pytest.mark.slow
def test_full_pipeline_with_export_tracking_and_budget_sweep(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    run = make_repo(repo)
    out = run("dvc", "repro")
    stages = ["prepare", "measure", "plan", "train", "evaluate", "merge", "export", "track"]
    assert sorted(RAN.findall(out)) == sorted(stages), out
    record = json.loads((repo / "runs/main/mlflow_run.json").read_text())
    assert record["status"] == "published" and record["model_version"] == "1" and record["champion_set"]  # the first
    sealed = json.loads((repo / "runs/main/published/openvino/fp32/manifest.json").read_text())
    assert sealed["model_version"] == "1"  # `dvc repro` yields an artifact the edge accepts
    assert RAN.findall(run("dvc", "repro")) == []

    set_param(repo, "train", "lr", 0.01)
    ran = RAN.findall(run("dvc", "repro"))
    assert sorted(ran) == sorted(["train", "evaluate", "merge", "export", "track"]), ran
    assert json.loads((repo / "runs/main/mlflow_run.json").read_text())["model_version"] == "2"

    run("git", "add", "-A")
    run("git", "commit", "-qm", "lr 0.01")
    from mlflow import MlflowClient

    client = MlflowClient(repo_env(tmp_path)["MLFLOW_TRACKING_URI"], repo_env(tmp_path)["MLFLOW_TRACKING_URI"])
    name = "sensitune-test_vit"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"  # int in MLflow 3.x
    run("dvc", "exp", "run", "-S", "plan.budget=10%")
    # the sweep's run is registered (tagged with its experiment) but `challenger` stays (publish.challenger: publish)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 3 and str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_run(max(versions, key=lambda v: int(v.version)).run_id).data.tags["dvc.experiment"]
    exps = json.loads(run("dvc", "exp", "show", "--json"))
    budgets = []
    for commit in exps:
        for exp in [commit, *(e for x in commit.get("experiments") or [] for e in x.get("revs", []))]:
            data = exp.get("data") or {}
            metrics = data.get("metrics", {}).get("runs/main/metrics.json", {}).get("data", {})
            budget = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("plan", {}).get("budget")
            if metrics:
                budgets.append((budget, metrics["trainable"]))
    assert {b for b, _ in budgets} >= {"5%", "10%"}, budgets
    by_budget = dict(budgets)
    assert by_budget["10%"] > by_budget["5%"]
