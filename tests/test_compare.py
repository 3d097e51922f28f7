"""Smoke test of the method-comparison harness (benchmarks/compare.py): tiny model, tiny digits, 1 epoch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_data import _vtab  # noqa: E402

from benchmarks import compare  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    count_trainable,
    lora_cost_per_rank,
    lora_target_modules,
    nearest_rank,
    setup_method,
)
from spt_core.portable.errors import SensituneError  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=10)


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
        assert seed1["lr"] == compare.chosen_lr(rows, m, "1%")
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
    lr = compare.chosen_lr(again["rows"], "sparse-only", "1%")
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
    assert next(r for r in third["rows"] if compare.key_of(r) == compare.key_of(tied))["val_acc"] == tied["val_acc"]
    assert compare.rows_tied_without_loss(third) == []  # nothing left to re-run
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
    assert compare.chosen_lr(rows, "m", "1%") == 1e-3
    rows.append({"method": "m", "seed": 0, "budget": "1%", "lr": 1e-2, "val_acc": 0.91})
    assert compare.chosen_lr(rows, "m", "1%") == 1e-2


def test_results_logged_to_mlflow_once(tmp_path: Path) -> None:
    """A committed table -> one parent run (settings, summary, files) + one child run per row; idempotent."""
    import shutil

    from mlflow import MlflowClient

    from pipelines.tracking import BENCHMARK_EXPERIMENT, TrackingWarning, log_benchmark

    for suffix in (".json", ".md", ".png"):
        shutil.copy(ROOT / f"benchmarks/results/compare_lite0_digits{suffix}", tmp_path)
    results = tmp_path / "compare_lite0_digits.json"
    state = json.loads(results.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = compare.summary_metrics(state)
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
    _vtab(tmp_path / "vtab" / "tiny3", {"train": 800, "val": 200, "test": 40})
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


def _curve_row(method: str, seed: int, lr: float, vals, losses, tests, **extra) -> dict:
    """A harness row with per-epoch curves (`compare.py --curves`), as `benchmarks/selection.py` reads them."""
    curve = [{"epoch": i + 1, "val_acc": v, "val_loss": lo, "test_acc": t}
             for i, (v, lo, t) in enumerate(zip(vals, losses, tests))]  # fmt: skip
    return {"method": method, "seed": seed, "lr": lr, "budget": "2%", "curve": curve, **extra}


def test_selection_replay_rules_on_known_curves() -> None:
    """benchmarks/selection.py on hand-made curves where every rule picks a different (epoch, lr)."""
    from benchmarks.selection import replay

    def run(seed, lr, vals, losses, tests):
        return _curve_row("spt-lora", seed, lr, vals, losses, tests)

    rows = [
        # seed 0: lr 1e-3 peaks at epoch 1 on val acc (0.9) but its loss is lowest at epoch 3
        run(0, 1e-3, [0.9, 0.5, 0.8], [0.5, 0.6, 0.4], [0.70, 0.60, 0.80]),
        run(0, 3e-3, [0.85, 0.85, 0.85], [0.45, 0.45, 0.45], [0.90, 0.90, 0.90]),
        # seed 1: 3e-3 is better on val; pooled over seeds 3e-3 wins on acc (0.85 + 0.7 > 0.9 + 0.6)
        run(1, 1e-3, [0.6, 0.6, 0.6], [0.9, 0.9, 0.9], [0.50, 0.50, 0.50]),
        run(1, 3e-3, [0.7, 0.6, 0.6], [0.3, 0.3, 0.2], [0.95, 0.96, 0.97]),
    ]
    assert replay(rows, "spt-lora", "acc", "seed0") == {0: 0.70, 1: 0.50}
    assert replay(rows, "spt-lora", "acc", "per-seed") == {0: 0.70, 1: 0.95}
    assert replay(rows, "spt-lora", "acc", "pooled") == {0: 0.90, 1: 0.95}
    # smoothed: 1e-3 seed 0 -> means (0.7, 0.733, 0.65), 3e-3 -> 0.85 everywhere: 3e-3 epoch 1
    assert replay(rows, "spt-lora", "smooth", "seed0") == {0: 0.90, 1: 0.95}
    # loss: seed 0's 1e-3 reaches 0.4 (< 0.45) at epoch 3 -> lr 1e-3; seed 1 at 1e-3 reads epoch 1 (all 0.9)
    assert replay(rows, "spt-lora", "loss", "seed0") == {0: 0.80, 1: 0.50}
    assert replay(rows, "spt-lora", "loss", "per-seed") == {0: 0.80, 1: 0.97}


def test_acc_then_loss_breaks_accuracy_ties_by_loss_for_epochs_and_lrs() -> None:
    """Saturated validation accuracy: "acc" takes the first epoch and the smaller lr, "acc>loss" the lower loss."""
    from benchmarks.selection import replay

    def run(seed, lr, vals, losses, tests):
        return _curve_row("full", seed, lr, vals, losses, tests)

    rows = [
        run(0, 1e-4, [1.0, 0.9, 1.0], [0.30, 0.40, 0.20], [0.80, 0.85, 0.90]),  # acc ties at epochs 1 and 3
        run(0, 3e-4, [1.0, 1.0, 1.0], [0.25, 0.10, 0.15], [0.95, 0.99, 0.97]),  # the lowest loss of all: epoch 2
        run(1, 1e-4, [0.8, 0.8, 0.8], [0.50, 0.40, 0.45], [0.70, 0.75, 0.72]),
        run(1, 3e-4, [0.9, 0.7, 0.7], [0.60, 0.05, 0.05], [0.60, 0.90, 0.90]),  # best acc, not best loss
    ]
    assert replay(rows, "full", "acc", "seed0") == {0: 0.80, 1: 0.70}  # 1e-4 (tie -> smaller), epoch 1
    assert replay(rows, "full", "acc>loss", "seed0") == {0: 0.99, 1: 0.60}  # 3e-4 (0.10 < 0.20), epoch 2
    assert replay(rows, "full", "acc>loss", "per-seed") == {0: 0.99, 1: 0.60}  # seed 1: accuracy still rules
    assert replay(rows, "full", "acc", "per-seed") == {0: 0.80, 1: 0.60}
    # pooled: acc sums 1.8 (1e-4) vs 1.9 (3e-4) -> 3e-4 for both; seed 1 at 3e-4 reads epoch 1
    assert replay(rows, "full", "acc>loss", "pooled") == {0: 0.99, 1: 0.60}
    assert replay(rows, "full", "loss", "seed0") == {0: 0.99, 1: 0.90}


def test_kfold_replay_picks_lr_and_epoch_on_the_mean_of_the_folds() -> None:
    """Fold 0 alone would pick lr 1e-3 epoch 1; the mean over both folds picks 3e-3 epoch 2, read on the refit."""
    from benchmarks.selection import kfold

    def run(lr, fold, vals, losses, tests=(0.0, 0.0, 0.0), seed=0):
        return _curve_row("spt-lora", seed, lr, vals, losses, tests, fold=fold)

    rows = [
        run(1e-3, 0, [0.9, 0.5, 0.5], [0.5, 0.6, 0.7]),  # means: (0.70, 0.55, 0.50)
        run(1e-3, 1, [0.5, 0.6, 0.5], [0.9, 0.3, 0.9]),  # loss means: (0.70, 0.45, 0.80)
        run(3e-3, 0, [0.8, 0.8, 0.6], [0.6, 0.6, 0.6]),  # means: (0.70, 0.75, 0.65)
        run(3e-3, 1, [0.6, 0.7, 0.7], [0.5, 0.5, 0.2]),  # loss means: (0.55, 0.55, 0.40)
        run(1e-3, "refit", [0, 0, 0], [0, 0, 0], (0.61, 0.62, 0.63)),
        run(3e-3, "refit", [0, 0, 0], [0, 0, 0], (0.71, 0.72, 0.73)),
        run(3e-3, 0, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], seed=1),  # seed 1 lacks folds: left out
    ]
    assert kfold(rows, "spt-lora", "acc") == {0: 0.72}
    assert kfold(rows, "spt-lora", "loss") == {0: 0.73}


def test_kfold_splits_are_stratified_disjoint_and_the_refit_has_every_labelled_image(tmp_path: Path) -> None:
    """Two classes whose files share names (a folder source): each class is dealt on its own, folds differ by <= 1."""
    from collections import Counter

    from PIL import Image

    from spt_core.data import prepare
    from spt_core.data.loaders import scan_split

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("val", 4), ("test", 3)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for j in range(n):  # the same file names in both classes
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / split / c / f"{j}.png")
    data = tmp_path / "data"
    prepare(str(src), data, n_train=None, n_val=None, n_test=None, seed=0)
    folds, refit = compare.kfold_dirs(data, 4)
    names = ["a", "b"]

    def ids(d, split):  # the source image each prepared file came from: its pixels
        return Counter((y, Image.open(p).tobytes()) for p, y in scan_split(d / split, names))

    labelled = ids(data, "train") + ids(data, "val")
    vals = [ids(f, "val") for f in folds]
    assert sum(vals, Counter()) == labelled  # every labelled image validates exactly once
    for f, v in zip(folds, vals):
        assert ids(f, "train") + v == labelled and ids(f, "test") == ids(data, "test")
        assert sorted(Counter(y for y, _ in v.elements()).values()) in ([3, 4], [4, 4], [4, 3])  # 15 a class / 4
    assert sorted(sum(vals[i].values()) for i in range(4)) == [7, 7, 8, 8]  # 30 images: the spares spread out
    assert ids(refit, "train") == labelled and ids(refit, "test") == ids(data, "test")
    assert compare.kfold_dirs(data, 4) == (folds, refit)  # made once
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**info, "data_hash": "another"}))
    with pytest.raises(SensituneError, match="delete"):
        compare.kfold_dirs(data, 4)


def test_harness_kfold_rows_stay_out_of_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs: list[dict] = []
    real_build = compare._build
    monkeypatch.setattr(compare, "_build", lambda job: jobs.append(job) or real_build(job))
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
    assert len(jobs) == 4 and all(j["augment"] for j in jobs)  # the table's run and every fold: augmented
    assert len({j["data_dir"] for j in jobs}) == 4
    refit = next(r for r in state["kfold"] if r["fold"] == "refit")
    assert round(10 * refit["curve"][-1]["test_acc"], 6).is_integer()  # read on the 10 test images
    from benchmarks.selection import report

    assert "| bitfit | 1 |" in report(state).split("k-fold")[1]
    finished = sorted(r["finished"] for r in state["kfold"])
    compare.main(argv)  # resume: nothing left to run
    assert len(jobs) == 4 and sorted(r["finished"] for r in json.loads(path.read_text())["kfold"]) == finished
    with pytest.raises(SensituneError, match="K=\\[2\\]"):
        compare.main([*argv[:-3], "--kfold", "3", "--augment"])


def test_augment_reaches_every_methods_training_loader_and_only_it(tmp_path: Path) -> None:
    from spt_core.data import prepare

    data = tmp_path / "digits_20_10_10"
    prepare("digits", data, n_train=20, n_val=10, n_test=10, seed=0)
    job = {"model": "test_efficientnet", "weights": "none", "img_size": 32, "data_dir": str(data), "batch": 4,
           "seed": 0, "threads": 1, "device": "cpu", "kind": "train"}  # fmt: skip
    plain = compare._build(job)[2]
    aug = compare._build({**job, "augment": True})[2]
    x = plain["train"].dataset[0][0]
    torch.manual_seed(0)
    draws = [aug["train"].dataset[0][0] for _ in range(4)]
    assert any(not torch.equal(d, x) for d in draws)  # random flips / crops / jitter of the same image
    assert all(torch.equal(plain["train"].dataset[0][0], x) for _ in range(2))  # no augmentation: the same tensor
    assert torch.equal(aug["val"].dataset[0][0], plain["val"].dataset[0][0])  # validation is never augmented
    assert torch.equal(aug["test"].dataset[0][0], plain["test"].dataset[0][0])
    sens = compare._build({**job, "augment": True, "kind": "sensitivity"})[2]
    assert torch.equal(sens["train"].dataset[0][0], x)  # the sensitivity pass reads plain images


def test_stability_agreement_on_known_vectors() -> None:
    from benchmarks.stability import agreement

    a = np.arange(1000, dtype=np.float64)  # two "tensors" of 500 entries
    same = agreement(a, a.copy(), [500, 500])
    assert same["spearman"] == pytest.approx(1.0) and same["overlap@0.01"] == 1.0
    rev = agreement(a, a[::-1].copy(), [500, 500])
    # reversed: rank correlation -1, no top entry shared, and the top-k counts per tensor are opposite
    assert rev["spearman"] == pytest.approx(-1.0) and rev["overlap@0.01"] == 0.0
    assert rev["matrix_r@0.02"] == pytest.approx(-1.0)
    half = a.copy()
    half[990:] = -1  # the top 10 (1 %) of a drop to the bottom: the top-1 % sets are disjoint, top-2 % share half
    h = agreement(a, half, [500, 500])
    assert h["overlap@0.01"] == 0.0 and h["overlap@0.02"] == 0.5


def test_stability_per_row_overlap_is_the_default_plans_entry_sets() -> None:
    """Two 10x50 matrices: flipping the order within the top row empties the global top-1 % overlap, but the
    per-row plan (1 % = 10 entries: each of the 10 best rows its best entry) still shares 9 of 10."""
    from benchmarks.stability import agreement, per_row_entries
    from spt_core.candidates import Candidate

    cands = {f"m{i}.weight": Candidate(f"m{i}.weight", f"m{i}", "weight", "linear", (10, 50), i) for i in (0, 1)}
    a = np.arange(1000, dtype=np.float32)
    assert sorted(per_row_entries(a, cands, 0.01)) == list(range(549, 1000, 50))  # the max of rows 10-19
    b = a.copy()
    b[950:] = a[950:][::-1]  # the top row (m1's last) now peaks at its first entry
    r = agreement(a, b, [500, 500], cands)
    assert r["overlap@0.01"] == 0.0 and r["per_row@0.01"] == 0.9
    assert agreement(a, a.copy(), [500, 500], cands)["per_row@0.02"] == 1.0


def test_stability_script_end_to_end(tmp_path: Path) -> None:
    from benchmarks import stability

    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "128", "--n-val", "20", "--pool", "4",
            "--ns", "1,2", "--reps", "2", "--threads", "1", "--random-head", "--augmented",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)]  # fmt: skip
    md = stability.main(argv)
    r = json.loads(md.with_suffix(".json").read_text())
    assert [x["batches"] for x in r["rows"]] == [1, 2] and r["heads"]["batches"] == r["augmented"]["batches"] == 4
    assert -1 <= r["augmented"]["spearman"] < 1  # augmented images give other gradients than the plain ones
    assert "Augmented vs plain" in md.read_text() and "Random head" in md.read_text()


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
