"""Smoke test of the method-comparison harness (benchmarks/compare.py): tiny model, tiny digits, 1 epoch.
The selection rules and k-fold on known curves: tests/test_selection.py; sensitivity's stability: test_stability.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from support.images import vtab_lists

from benchmarks import compare, jobs
from benchmarks.methods import (
    count_trainable,
    lora_cost_per_rank,
    lora_target_modules,
    nearest_rank,
    setup_method,
)
from benchmarks.protocol import key_of
from benchmarks.report import chosen_lr, rows_tied_without_loss, summary_metrics
from spt_core.portable.errors import SensituneError

ROOT = Path(__file__).resolve().parent.parent


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=10)


def test_rerun_lossless_reruns_every_methods_rows_the_numbers_rest_on_and_no_other(tmp_path: Path) -> None:
    """One rule for every method: the rows without a val_loss that a table's numbers use, peft LoRA's included."""
    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "40", "--n-val", "20", "--n-test", "20",
            "--epochs", "1", "--seeds", "2", "--methods", "peft-lora,per-row-sparse", "--lr-grid", "1e-3,3e-3",
            "--budget", "1%", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir",
            str(tmp_path / "results"), "--in-process"]  # fmt: skip
    path = compare.main(argv)
    state = json.loads(path.read_text())
    lrs = {m: chosen_lr(state["rows"], m, "1%") for m in ("peft-lora", "per-row-sparse")}
    for r in state["rows"]:  # rows made before they recorded a loss
        r.pop("val_loss")
    # rows no number rests on: a seed-1 row at the other lr, and one at a budget no ladder uses
    idle = [{**r, "lr": 3e-3 if r["lr"] == 1e-3 else 1e-3} for r in state["rows"] if r["seed"] == 1]
    idle += [{**r, "budget": "4%"} for r in state["rows"] if r["seed"] == 1 and r["method"] == "peft-lora"]
    state["rows"] += idle
    path.write_text(json.dumps(state))
    used = {key_of(r): r["val_acc"] for r in state["rows"] if r not in idle}  # seed-0 grid + seed 1 at the chosen lr
    assert len(used) == 6
    again = json.loads(compare.main([*argv, "--rerun-lossless"]).read_text())
    assert sorted(key_of(r) for r in again["replaced"]) == sorted(used)  # peft LoRA's as well as the method's
    assert all("val_loss" in r and r["val_acc"] == used[key_of(r)] for r in again["rows"] if key_of(r) in used)
    assert sum("val_loss" not in r for r in again["rows"]) == len(idle) == 3  # the idle rows stay as they were
    assert {m: chosen_lr(again["rows"], m, "1%") for m in lrs} == lrs and "--rerun-lossless" in again["meta"]["command"]


def test_harness_table_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "40", "--n-val", "20", "--n-test", "20",
            "--epochs", "1", "--seeds", "2", "--methods", "bitfit,sparse-only", "--lr-grid", "1e-3,3e-3",
            "--budget", "1%", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
            "--in-process"]  # fmt: skip
    path = compare.main(argv)
    state = json.loads(path.read_text())
    rows = state["rows"]
    # seed 0 tries both lrs, seed 1 only the chosen one: 2 methods x (2 + 1) rows, and 2 sensitivity passes
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        [("bitfit", 0), ("bitfit", 0), ("bitfit", 1), ("sparse-only", 0), ("sparse-only", 0), ("sparse-only", 1)]
    )
    assert [s["seed"] for s in state["sensitivity"]] == [0, 1] and all(s["images"] == 40 for s in state["sensitivity"])
    for m in ("bitfit", "sparse-only"):
        seed1 = next(r for r in rows if r["method"] == m and r["seed"] == 1)
        assert seed1["lr"] == chosen_lr(rows, m, "1%")
    model = _model()
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier")}
    backbone = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and n not in head)
    for r in rows:
        assert r["trainable_head"] == 10 * model.num_features + 10 and r["backbone_params"] == backbone
        assert round(20 * r["test_acc"], 6).is_integer() and r["epochs"] == 1  # a share of the 20 test images
        if r["method"] == "bitfit":
            assert r["trainable_backbone"] == biases
        else:  # the plan never exceeds the budget and is all sparse entries or whole vectors
            assert 0 < r["trainable_backbone"] <= r["budget_count"] == round(backbone / 100)
            assert r["details"]["by_kind"]["lora"] == r["details"]["by_kind"]["adapter"] == 0
            assert sum(r["details"]["by_kind"].values()) == r["trainable_backbone"]
    md = (out / "compare_test-effnet_digits.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:8] == ["method", "lr (grid: val %)", "trainable backbone", "%", "head", "val %", "test %", "seeds"]
    body = {ln.split("|")[1].strip(): ln for ln in table[1:] if ln.split("|")[1].strip() in ("bitfit", "sparse-only")}
    assert set(body) == {"bitfit", "sparse-only"}
    assert f"| {biases:,} |" in body["bitfit"] and all(
        len(ln.split("|")) == len(table[0].split("|")) for ln in body.values()
    )
    assert (
        md.startswith("# test_efficientnet")
        and "Command: `" in md
        and (out / "compare_test-effnet_digits.png").is_file()
    )
    # resume: a second invocation finds every row and runs nothing new
    assert len(json.loads(compare.main(argv).read_text())["rows"]) == len(rows)
    # --rerun-stale: a chosen-lr row measured by an older harness is run again and replaced; the old one is kept
    old = next(r for r in rows if r["method"] == "bitfit" and r["seed"] == 1)
    old["overhead_peak"] = "vmhwm_reset"
    path.write_text(json.dumps(state))
    again = json.loads(compare.main([*argv, "--rerun-stale"]).read_text())
    assert len(again["rows"]) == len(rows) and [r["overhead_peak"] for r in again["replaced"]] == ["vmhwm_reset"]
    new = next(r for r in again["rows"] if r["method"] == "bitfit" and r["seed"] == 1)
    assert new["overhead_peak"] == "vmhwm_reset_trim" and new["test_acc"] == old["test_acc"]  # same run, same result
    # --rerun-ties: seed 1's budget-on-val choice ties sparse-only's 1 % rung with full fine-tuning, neither has a
    # val_loss (rows made before they recorded one): both run again and record it; the untied rows stay
    lr = chosen_lr(again["rows"], "sparse-only", "1%")
    tied = next(r for r in again["rows"] if r["method"] == "sparse-only" and r["seed"] == 1)
    for r in again["rows"]:
        r.pop("val_loss", None)
    fake = [{**r, "budget": "4%", "trainable_backbone": 4 * r["trainable_backbone"], "val_acc": r["val_acc"] / 2}
            for r in again["rows"] if r["method"] == "sparse-only" and r["lr"] == lr]  # fmt: skip
    fake += [{**r, "method": "full", "lr": 1e-4, "budget": "1%", "val_acc": tied["val_acc"] if r["seed"] else 0.0}
             for r in fake]  # fmt: skip
    again["rows"] += fake
    path.write_text(json.dumps(again))
    with pytest.raises(SensituneError, match=r"made with other settings \(epochs=2 \(table: 1\)\); give the table"):
        compare.main([*argv[:-1], "--epochs", "2", "--in-process", "--rerun-ties"])  # rows unlike the table's
    with pytest.raises(SensituneError, match=r"img_size=40 \(table: 32\)"):  # a plain resume refuses them too
        compare.main([*argv, "--img-size", "40"])
    third = json.loads(compare.main([*argv, "--rerun-ties"]).read_text())
    redone = [(r["method"], r["seed"], r["budget"]) for r in third["replaced"][1:]]
    assert sorted(redone) == [("full", 1, "1%"), ("sparse-only", 1, "1%")]
    assert all("val_loss" in r for r in third["rows"] if (r["method"], r["seed"], r["budget"]) in redone)
    assert len(third["rows"]) == len(again["rows"]) and "--rerun-ties" in third["meta"]["command"]
    assert next(r for r in third["rows"] if key_of(r) == key_of(tied))["val_acc"] == tied["val_acc"]
    assert rows_tied_without_loss(third) == []  # nothing left to re-run
    # --merge: a shard of the same protocol adds its rows; a shard made at another input size is refused whole
    shard = tmp_path / "shard.json"
    new_row = {**third["rows"][0], "seed": 5}
    shard.write_text(json.dumps({"meta": {**third["meta"], "img_size": 224}, "rows": [new_row]}))
    with pytest.raises(SensituneError, match=r"shard.json: img_size=224 \(table: 32\)"):
        compare.main([*argv, "--merge", str(shard)])
    shard.write_text(json.dumps({"meta": third["meta"], "rows": [new_row]}))
    merged = json.loads(compare.main([*argv, "--merge", str(shard)]).read_text())
    assert len(merged["rows"]) == len(third["rows"]) + 1 and "# + rows of shard.json" in merged["meta"]["command"]


@pytest.mark.parametrize("method", ["linear", "full", "peft-lora", "random-sparse"])
def test_method_counts(method: str) -> None:
    model = _model()
    n_head = sum(p.numel() for p in model.get_classifier().parameters())
    total = sum(p.numel() for p in model.parameters())
    budget = 5000
    if method == "peft-lora":
        per_rank = lora_cost_per_rank(model, lora_target_modules(model))
    model, info = setup_method(model, method, budget, seed=3)
    assert info.trainable_head == n_head and count_trainable(model) == (info.trainable_backbone, n_head)
    if method == "linear":
        assert info.trainable_backbone == 0
    elif method == "full":
        assert info.trainable_backbone == total - n_head
    elif method == "peft-lora":  # uniform rank on the 1x1 convs (SE excluded), nearest the budget
        rank = info.details["rank"]
        assert info.trainable_backbone == rank * per_rank
        assert abs(rank * per_rank - budget) <= min(abs(r * per_rank - budget) for r in range(1, 50))
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    else:  # random entries, spent exactly: the sparse fill stops at the budget, and the seed decides which
        assert info.trainable_backbone == info.details["by_kind"]["sparse"] == budget
        _, other = setup_method(_model(), method, budget, seed=4)
        assert other.details["plan_hash"] != info.details["plan_hash"]


def test_nearest_rank() -> None:
    assert nearest_rank(67420, 22784) == 3 and nearest_rank(100, 1000) == 1 and nearest_rank(1500, 1000) == 1


@pytest.mark.slow  # default suite <= ~10 min: `make slow` runs it
def test_parallel_runs_demo_defects_and_retries_failed_rows(tmp_path: Path) -> None:
    """--parallel in subprocesses, the demo set sized to the splits, and a failed row retried on resume."""
    out = tmp_path / "results"
    argv = ["--backbone", "test-effnet", "--task", "demo-defects", "--n-train", "40", "--n-val", "20", "--n-test",
            "20", "--epochs", "1", "--seeds", "1", "--methods", "linear,sparse-only", "--lr-grid", "1e-3,3e-3",
            "--budget", "1%", "--threads", "1", "--parallel", "2", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(out)]  # fmt: skip
    path = compare.main(argv)
    state = json.loads(path.read_text())
    assert sorted((r["method"], r["lr"]) for r in state["rows"]) == [
        ("linear", 1e-3), ("linear", 3e-3), ("sparse-only", 1e-3), ("sparse-only", 3e-3)
    ]  # fmt: skip
    assert all("error" not in r and r["peak_memory_kind"] == "cpu_max_rss_process" for r in state["rows"])
    assert state["meta"]["parallel"] == 2 and "2 runs at a time" in path.with_suffix(".md").read_text()
    spans = sorted((r["started"], r["finished"]) for r in state["rows"])
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two jobs were running at the same time
    counts = json.loads((tmp_path / "work/data/demo-defects_40_20_20/dataset.json").read_text())["counts"]
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 40, "val": 20, "test": 20}
    # a failed row (here: faked) is run again by the next invocation and replaced, not duplicated
    state["rows"][0] = {k: state["rows"][0][k] for k in ("method", "seed", "lr", "budget")} | {"error": "exit 1"}
    path.write_text(json.dumps(state))
    again = json.loads(compare.main(argv).read_text())["rows"]
    assert len(again) == 4 and all("error" not in r for r in again)


def test_chosen_lr_ties_take_the_smaller_lr() -> None:
    rows = [{"method": "m", "seed": 0, "budget": "1%", "lr": lr, "val_acc": v} for lr, v in ((3e-3, 0.9), (1e-3, 0.9))]
    assert chosen_lr(rows, "m", "1%") == 1e-3
    rows.append({"method": "m", "seed": 0, "budget": "1%", "lr": 1e-2, "val_acc": 0.91})
    assert chosen_lr(rows, "m", "1%") == 1e-2


def test_results_logged_to_mlflow_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed table -> one parent run (settings, summary, files) + one child run per row; idempotent."""
    import shutil

    from mlflow import MlflowClient

    from benchmarks import tracking
    from benchmarks.tracking import BENCHMARK_EXPERIMENT, log_benchmark
    from pipelines.tracking import TrackingWarning

    for suffix in (".json", ".md", ".png"):
        shutil.copy(ROOT / f"benchmarks/results/compare_lite0_digits{suffix}", tmp_path)
    results = tmp_path / "compare_lite0_digits.json"
    state = json.loads(results.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = summary_metrics(state)
    res = log_benchmark(results, summary=summary, tracking_uri=uri)
    rows = [r for r in state["rows"] if "error" not in r]
    assert res["status"] == "logged" and res["children"] == len(rows)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(res["run_id"])
    assert parent.data.params["backbone"] == "tf_efficientnet_lite0" and parent.data.params["budget"] == "2%"
    assert parent.data.metrics["test_acc.sparse-only"] == pytest.approx(summary["test_acc.sparse-only"])
    assert {a.path for a in client.list_artifacts(res["run_id"])} == {
        "compare_lite0_digits.json", "compare_lite0_digits.md", "compare_lite0_digits.png"
    }  # fmt: skip
    exp = client.get_experiment_by_name(BENCHMARK_EXPERIMENT).experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res['run_id']}'", max_results=1000)
    assert len(children) == len(rows)
    child = next(c for c in children if c.data.params["method"] == rows[0]["method"]
                 and float(c.data.params["lr"]) == rows[0]["lr"] and c.data.params["seed"] == str(rows[0]["seed"])
                 and c.data.params["budget"] == rows[0]["budget"])  # fmt: skip
    assert child.data.metrics["test_acc"] == rows[0]["test_acc"]
    assert child.data.metrics["trainable_backbone"] == rows[0]["trainable_backbone"]
    # the same file again: nothing new; a server that is down: a warning and status, never an exception
    assert log_benchmark(results, tracking_uri=uri)["status"] == "exists"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # `make benchmarks-mlflow`: the CLI over every table, the same rule
    assert tracking.main([str(results)]) == 0 and tracking.main([str(tmp_path / "compare_lite0_digits.md")]) == 2
    assert len(client.search_runs([exp], max_results=1000)) == len(rows) + 1
    with pytest.warns(TrackingWarning, match="compare_lite0_digits.json"):
        down = log_benchmark(results, tracking_uri="http://127.0.0.1:9")
    assert down["status"] == "failed" and "refused" in down["error"].lower()
    with pytest.raises(SensituneError, match="not a benchmarks/compare.py results file"):
        log_benchmark(tmp_path / "compare_lite0_digits.md", tracking_uri=uri)


@pytest.mark.slow  # default suite <= ~10 min: `make slow` runs it
def test_vtab_script_runs_a_task_and_rejects_bad_roots(tmp_path: Path) -> None:
    """benchmarks/vtab_vit_b16.sh end to end on CPU (its smoke overrides), and its exit-2 errors."""
    import os
    import subprocess

    script = ROOT / "benchmarks" / "vtab_vit_b16.sh"
    vtab_lists(tmp_path / "vtab" / "tiny3", {"train": 800, "val": 200, "test": 40})
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "BACKBONE": "test-effnet", "WEIGHTS": "none",
           "EPOCHS": "1", "SEEDS": "1", "METHODS": "linear,sparse-only", "LR_GRID": "1e-3", "BUDGET": "1%",
           "CURVE_BUDGETS": "2%", "CURVE_METHODS": "sparse-only", "BATCH": "64", "THREADS": "1", "WORKERS": "0",
           "OUT": "out", "WORK": "work", "SENSITUNE_NO_PROGRESS": "1"}  # relative to the cwd  # fmt: skip
    done = subprocess.run(["bash", str(script), "vtab"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((tmp_path / "out" / "compare_test-effnet_tiny3.json").read_text())
    assert sorted((r["method"], r["budget"]) for r in state["rows"]) == [
        ("linear", "1%"), ("sparse-only", "1%"), ("sparse-only", "2%")
    ]  # fmt: skip
    assert state["meta"]["n_train"] == 800 and all(r["epochs"] == 1 for r in state["rows"])
    for args, message in (([], "usage"), (["nowhere"], "is not a directory"), (["vtab", "cifar"], "train800.txt")):
        bad = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr


def test_per_row_sparse_gives_every_output_row_the_same_number_of_entries() -> None:
    """per-row-sparse: the SPT scores under allocation=per_row; a budget of whole rows leaves no fill."""
    from benchmarks.methods import random_sensitivity
    from spt_core.candidates import find_candidates

    model = _model()
    sens = random_sensitivity(model, seed=0)
    rows = sum(c.shape[0] if c.kind != "vector" else 1 for c in find_candidates(model).values())
    model, info = setup_method(model, "per-row-sparse", 2 * rows, sensitivity=sens)
    assert info.trainable_backbone == info.details["by_kind"]["sparse"] == 2 * rows
    from spt_core.tuners.sparse import SparseDelta

    deltas = [m for m in model.modules() if isinstance(m, SparseDelta)]
    assert sum(len(m.indices) for m in deltas) == 2 * rows
    for m in deltas:  # a vector is one row; a matrix or kernel row is one output channel
        row_len = math.prod(m.shape[1:]) if len(m.shape) > 1 else m.shape[0]
        assert torch.bincount(m.indices // row_len, minlength=m.shape[0] if len(m.shape) > 1 else 1).eq(2).all()


def test_harness_kfold_rows_stay_out_of_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict] = []
    real_build = jobs._build
    monkeypatch.setattr(jobs, "_build", lambda job: built.append(job) or real_build(job))
    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "30", "--n-val", "15", "--n-test", "10",
            "--epochs", "2", "--seeds", "1", "--methods", "bitfit", "--lr-grid", "1e-3", "--budget", "1%",
            "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"),
            "--in-process", "--kfold", "2", "--augment"]  # fmt: skip
    path = compare.main(argv)
    state = json.loads(path.read_text())
    assert path.name == "compare_test-effnet_digits-aug.json" and state["meta"]["augment"] is True
    assert [(r["method"], r.get("fold")) for r in state["rows"]] == [("bitfit", None)]
    assert sorted(str(r["fold"]) for r in state["kfold"]) == ["0", "1", "refit"]
    assert all(len(r["curve"]) == 2 and r["k"] == 2 for r in state["kfold"])
    assert len(built) == 4 and all(j["augment"] for j in built)  # the table's run and every fold: augmented
    assert len({j["data_dir"] for j in built}) == 4
    refit = next(r for r in state["kfold"] if r["fold"] == "refit")
    assert round(10 * refit["curve"][-1]["test_acc"], 6).is_integer()  # read on the 10 test images
    from benchmarks.selection import report

    assert "| bitfit | 1 |" in report(state).split("k-fold")[1]
    finished = sorted(r["finished"] for r in state["kfold"])
    compare.main(argv)  # resume: nothing left to run
    assert len(built) == 4 and sorted(r["finished"] for r in json.loads(path.read_text())["kfold"]) == finished
    with pytest.raises(SensituneError, match="K=\\[2\\]"):
        compare.main([*argv[:-3], "--kfold", "3", "--augment"])


def test_augment_reaches_every_methods_training_loader_and_only_it(tmp_path: Path) -> None:
    from spt_core.data import prepare

    data = tmp_path / "digits_20_10_10"
    prepare("digits", data, n_train=20, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    job = {"model": "test_efficientnet", "weights": "none", "img_size": 32, "data_dir": str(data), "batch": 4,
           "seed": 0, "threads": 1, "device": "cpu", "kind": "train"}  # fmt: skip
    plain = jobs._build(job)[2]
    aug = jobs._build({**job, "augment": True})[2]
    x = plain["train"].dataset[0][0]
    torch.manual_seed(0)
    draws = [aug["train"].dataset[0][0] for _ in range(4)]
    assert any(not torch.equal(d, x) for d in draws)  # random flips / crops / jitter of the same image
    assert all(torch.equal(plain["train"].dataset[0][0], x) for _ in range(2))  # no augmentation: the same tensor
    assert torch.equal(aug["val"].dataset[0][0], plain["val"].dataset[0][0])  # validation is never augmented
    assert torch.equal(aug["test"].dataset[0][0], plain["test"].dataset[0][0])
    sens = jobs._build({**job, "augment": True, "kind": "sensitivity"})[2]
    assert torch.equal(sens["train"].dataset[0][0], x)  # the sensitivity pass reads plain images


def test_an_imbalanced_line_table_records_line_curves_and_replays_on_balanced_accuracy(tmp_path: Path) -> None:
    """`--imbalance --curves`: the harness's line protocol end to end (demo images at 90 % good, the validation
    threshold, escape / overkill), and each epoch's balanced accuracy and overkill for `selection.py`."""
    from benchmarks.selection import report

    out = tmp_path / "results"
    argv = ["--backbone", "test-effnet", "--task", "demo-defects", "--imbalance", "0.9", "--n-images", "300",
            "--epochs", "2", "--seeds", "1", "--methods", "bitfit", "--lr-grid", "1e-3", "--variants", "sampler",
            "--curves", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
            "--in-process"]  # fmt: skip
    path = compare.main(argv)
    assert path.name == "compare_test-effnet_demo-defects-imbalanced90.json"
    state = json.loads(path.read_text())
    # 300 images: 270 good, defects 50/30/20 % of the other 30; split 0.6/0.15/0.25 per class
    assert state["meta"]["counts"] == {"ok": 270, "scratch": 15, "spot": 9, "crack": 6}
    (row,) = state["rows"]
    test_counts = state["meta"]["split_counts"]["test"]
    n_defects, n_good = sum(v for k, v in test_counts.items() if k != "ok"), test_counts["ok"]
    assert row["escapes"][1] == n_defects and row["overkills"][1] == n_good and row["variant"] == "sampler"
    assert len(row["curve"]) == 2
    last = row["curve"][-1]
    assert round(last["test_overkill"] * n_good, 6).is_integer() and round(last["test_escape"] * n_defects, 6) % 1 == 0
    chosen = row["curve"][row["best_epoch"] - 1]  # the row's own numbers are its chosen epoch's
    assert (chosen["test_bacc"], chosen["test_overkill"]) == (row["test_balanced_acc"], row["overkill"])
    md = report(state)
    assert "every accuracy here, on validation (what the rules read) and on test, is balanced accuracy" in md
    tables = [[ln.strip("|").split(" | ") for ln in part.splitlines() if ln.startswith("| ")]
              for part in md.split("Test overkill %")]  # fmt: skip
    col = [c.strip() for c in tables[0][0]].index("acc>loss / seed0")  # the product's rule: the row's own pick
    assert tables[0][1][col].strip() == f"{100 * chosen['test_bacc']:.2f}"
    assert tables[1][1][col - 2].strip() == f"{100 * chosen['test_overkill']:.2f}"  # no seeds / lrs columns
    assert (
        (out / "compare_test-effnet_demo-defects-imbalanced90.md")
        .read_text()
        .startswith("# test_efficientnet @ 32 px on an imbalanced demo-defects: good class at 90 %")
    )
