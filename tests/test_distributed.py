"""Data-parallel equals one process: 2 gloo ranks under torchrun on 127.0.0.1 against an in-process run.

One tiny project (4 classes x 8 demo images of 32 px, test_vit): the single-process pipeline runs in this process,
the 2-process one in `tests/ddp_worker.py` (measure -> plan on rank 0 -> train, then one DDP step with a counting
comm hook). Global batches are the same (sensitivity: whole batches per rank; training: 8 = 2 x 4), and 16
training images make every step full, so the results agree to fp32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.servers import free_port
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler

from pipelines import stages
from pipelines.cli import torchrun_command
from pipelines.config import load_params
from spt_core.data.loaders import BalancedSampler, SeededSampler
from spt_core.distributed import RankSampler, ShardSampler, World, shard_batches, world
from spt_core.plan import Plan
from spt_core.portable.errors import SensituneError
from spt_core.sensitivity import Sensitivity, measure_sensitivity

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "demo": {"n_per_class": 8, "size": 32},
    "data": {"split": None, "n_train": 16, "n_val": 8},
    "model": {"name": "test_vit", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 4, "batch_size": 4, "probe_epochs": 2, "device": "cpu"},
    "plan": {"budget": "5%", "allocation": "global", "structured": "lora"},  # on test_vit: sparse, whole and LoRA
    # the default class-balanced sampler (train.balance); no augmentation (each rank would draw its own); a
    # one-epoch model from random weights is below the probe, and this test compares the tuned deltas themselves
    "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "probe_epochs": 2, "device": "cpu", "amp": False,
              "lr": 0.01, "augment": False, "probe_baseline": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    project, out = root / "project", root / "ranks"
    project.mkdir()
    out.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        params = load_params("params.yaml", {"paths.run": "runs/one"})
        stages.demo_stage(params)
        stages.prepare_stage(params)
        # the 2-process run starts first and the one-process run goes on meanwhile (two cores)
        launch = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / "tests/ddp_worker.py"), str(project),
               str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "SENSITUNE_NO_PROGRESS": "1"}  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        one = {"sens": stages.measure_stage(params), "plan": stages.plan_stage(params)}
        one["metrics"] = stages.train_stage(params)
        log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"project": project, "one": one, "ranks": ranks}


def test_sensitivity_equals_one_process(runs: dict) -> None:
    one = runs["one"]["sens"]
    ddp = Sensitivity.load(runs["project"] / "runs/ddp/sensitivity.safetensors")
    assert (ddp.meta["batches"], ddp.meta["images"], ddp.meta["processes"]) == (4, 16, 2)
    assert ddp.scores.keys() == one.scores.keys()
    for name, s in one.scores.items():
        torch.testing.assert_close(ddp.scores[name], s, rtol=1e-5, atol=0, msg=name)


def test_plan_is_identical(runs: dict) -> None:
    one, ddp = runs["one"]["plan"], Plan.load(runs["project"] / "runs/ddp/plan.json")
    assert ddp.hash() == one.hash() and ddp.targets == one.targets
    assert {t.kind for t in one.targets} >= {"sparse", "whole", "lora"}


def test_trained_deltas_equal_one_process(runs: dict) -> None:
    project = runs["project"]
    one = load_file(str(project / "runs/one/tuned/tuned.safetensors"))
    ddp = load_file(str(project / "runs/ddp/tuned/tuned.safetensors"))
    assert one.keys() == ddp.keys()
    plan = runs["one"]["plan"]
    for kind in ("sparse", "whole", "lora"):
        names = [k for t in plan.targets if t.kind == kind for k in one if k.startswith(t.param.rpartition(".")[0])]
        assert names, kind
        moved = [k for k in names if one[k].is_floating_point() and one[k].abs().max() > 0]
        assert moved, f"no {kind} delta moved in one epoch: the comparison would be vacuous"
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-5, msg=k)
    assert runs["ranks"][0]["val_acc"] == runs["ranks"][1]["val_acc"] == runs["one"]["metrics"]["val_acc"]


def test_only_rank_0_writes(runs: dict) -> None:
    r0, r1 = runs["ranks"]
    assert r1["writes"] == [], r1["writes"][:5]
    written = " ".join(r0["writes"])
    for name in ("sensitivity.safetensors", "plan.json", "tuned", "metrics.json", "checkpoint.pt"):
        assert name in written, name


def test_ddp_reduces_only_the_trainable_tensors(runs: dict) -> None:
    for r in runs["ranks"]:
        assert r["reduced_numel"] == r["trainable_numel"] < r["model_numel"] / 10
        assert r["frozen_with_grad"] == 0 and r["trainable_without_grad"] == 0


def test_batches_are_shared_without_overlap() -> None:
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    sampler = list(range(9))
    mine = [shard_batches(sampler, 2, World(r, 2), limit=4) for r in range(2)]
    assert mine == [[batches[0], batches[2]], [batches[1], batches[3]]]
    shards = [list(ShardSampler(5, World(r, 2))) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    with pytest.raises(SensituneError, match="cannot be shared"):
        ShardSampler(1, World(1, 2))
    assert world() == World()  # no process group here: every helper is the identity


@pytest.mark.parametrize("kind", ["seeded", "balanced"])
def test_ranks_together_take_the_one_process_global_batches(kind: str) -> None:
    labels = [0] * 13 + [1] * 3 + [2] * 4  # imbalanced: the balanced sampler repeats class 1 and sub-samples 0
    one = BalancedSampler(labels, seed=3) if kind == "balanced" else SeededSampler(len(labels), seed=3)
    per_rank = [RankSampler(BalancedSampler(labels, 3) if kind == "balanced" else SeededSampler(20, 3), World(r, 2))
                for r in range(2)]  # fmt: skip
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in per_rank:
            s.set_epoch(epoch)
        order = list(one)
        ranks = [list(BatchSampler(s, 4, drop_last=False)) for s in per_rank]
        for k, (b0, b1) in enumerate(zip(*ranks)):  # global batch 8 = 2 ranks x 4
            assert sorted(b0 + b1) == sorted(order[8 * k : 8 * k + 8])
    if kind == "balanced":  # what the one-process run trains on, not a plain shuffle of the imbalanced set
        assert sum(labels[i] == 1 for i in order) >= 6
    # a plain seeded shuffle is exactly DistributedSampler's split (torch's own reference)
    ref = [list(DistributedSampler(range(20), 2, r, shuffle=True, seed=3)) for r in range(2)]
    plain = [list(RankSampler(RandomSampler(range(20)), World(r, 2), seed=3)) for r in range(2)]
    assert plain == ref
    odd = [list(RankSampler(SeededSampler(5, 0), World(r, 2))) for r in range(2)]  # 5 images: one repeated
    assert len(odd[0]) == len(odd[1]) == 3 and set(odd[0] + odd[1]) == set(range(5))


def test_nproc_launches_torchrun_with_the_same_arguments() -> None:
    cmd = torchrun_command(["train", "--nproc", "4", "--run", "runs/x", "--epochs", "2"], 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6:] == ["pipelines.cli", "--", "train", "--run", "runs/x", "--epochs", "2"]


def test_sensitivity_amp_on_cpu_is_fp32(tiny_digits: Path) -> None:
    """`sensitivity.amp` is bf16 on CUDA only: on CPU the pass is bit-identical to the fp32 one."""
    import timm
    from torch.utils.data import DataLoader

    from spt_core.data import make_loaders
    from spt_core.portable.preprocess import Preprocess

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10)
    loader: DataLoader = make_loaders(tiny_digits, Preprocess(size=(32, 32)), batch_size=8)["train"]
    plain = measure_sensitivity(model, loader, batches=2)
    amp = measure_sensitivity(model, loader, batches=2, amp=True)
    assert amp.meta["amp_dtype"] is None
    for k in plain.scores:
        assert torch.equal(plain.scores[k], amp.scores[k]), k


@pytest.mark.slow  # default suite <= ~15 min: `make slow` runs it
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    worker, out = ROOT / "tests/ddp_resume_worker.py", tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SENSITUNE_NO_PROGRESS": "1"}  # fmt: skip

    def torchrun(**extra: str) -> subprocess.CompletedProcess:
        launch = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(worker), str(out)]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=600)

    killed = torchrun(KILL_AFTER_EPOCH="1")
    assert killed.returncode != 0 and not (out / "history.json").exists(), killed.stdout[-2000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # each rank's RNG state
    resumed = torchrun()
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    hist = json.loads((out / "history.json").read_text())
    assert hist["resumed_at_epoch"] == 1 and [e["epoch"] for e in hist["epochs"]] == [1, 2, 3]

    # the same training in one process, uninterrupted: same epochs, same selection, same tensors (fp32 rounding)
    ns: dict = {}
    exec(compile(worker.read_text(), str(worker), "exec"), ns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, trained = ns["run"](tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert one.best_epoch == hist["best_epoch"] and one.resumed_at_epoch == 0
    for a, b in zip(one.to_dict()["epochs"], hist["epochs"]):
        assert a["val_acc"] == b["val_acc"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    ddp = torch.load(out / "trained.pt", weights_only=True)
    assert set(ddp) == set(trained)
    for n, t in trained.items():
        torch.testing.assert_close(ddp[n], t, rtol=1e-5, atol=1e-6, msg=n)
