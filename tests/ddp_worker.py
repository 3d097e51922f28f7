"""One rank of the 2-process gloo run of tests/test_distributed.py (started by torchrun on 127.0.0.1).

    python -m torch.distributed.run --nproc-per-node 2 ... tests/ddp_worker.py PROJECT OUT

Runs measure (DDP) -> plan (rank 0) -> train (DDP) with the project's params.yaml into PROJECT/runs/ddp, while an
audit hook records every write this rank makes under PROJECT; then checks what DDP's reducer all-reduces for a
fresh tuned model. Each rank leaves OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _writes_under(root: str) -> list[str]:
    writes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
            paths = [path] if writing else []
        elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "shutil.rmtree"):
            paths = [args[0], *([args[1]] if event in ("os.rename", "os.replace") else [])]
        else:
            return
        for p in paths:
            if isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fspath(p)).startswith(root):
                writes.append(f"{event} {os.fspath(p)}")

    sys.addaudithook(hook)
    return writes


def _reducer_check(params: dict) -> dict:
    """Numel DDP all-reduces in one step of a fresh tuned model vs its trainable numel; frozen weights' grads."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from pipelines.models import build_model
    from spt_core.distributed import wrap_ddp
    from spt_core.plan import Plan
    from spt_core.tuners import apply_plan

    plan = Plan.load(Path(params["paths"]["run"]) / "plan.json")
    model, _ = build_model(plan.meta["model_args"], 0)
    apply_plan(model, plan)
    ddp = wrap_ddp(model)
    reduced: list[int] = []

    def count(state, bucket):
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, count)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % 4
    F.cross_entropy(ddp(x), y).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "reduced_numel": sum(reduced),
        "trainable_numel": sum(p.numel() for p in trainable),
        "model_numel": sum(p.numel() for p in model.parameters()),
        "frozen_with_grad": sum(p.grad is not None for p in frozen),
        "trainable_without_grad": sum(p.grad is None for p in trainable),
    }


def main(project: Path, out: Path) -> None:
    writes = _writes_under(str(project.resolve()))
    os.chdir(project)
    from pipelines import stages
    from pipelines.config import load_params
    from spt_core.distributed import barrier, close, world

    params = load_params("params.yaml", {"paths.run": "runs/ddp"})
    stages.measure_stage(params)
    w = world()
    if w.main:
        stages.plan_stage(params)
    barrier()
    metrics = stages.train_stage(params)
    reducer = _reducer_check(params)
    close()
    record = {"rank": w.rank, "size": w.size, "writes": list(writes), "val_acc": metrics["val_acc"], **reducer}
    (out / f"rank{w.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
