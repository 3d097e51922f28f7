"""The "auto budget (halving)" row (method ``auto-halving``): the product's ``plan.budget: auto`` with
``plan.search: halving`` on a table's data, as one job of `benchmarks/jobs.py`.

The trials are the product's: every rung of its default ``plan.ladder``, allocated from the seed's one sensitivity
pass with the default plan options (per-row sparse deltas; ``full`` = `spt_core.budget.full_plan`, the full rung
as the product trains it), each at every multiple ``train.lr_grid`` of the row's lr. A trial trains what a
per-row-sparse row of that budget and lr trains (the harness's seeded build and `TrainConfig.scaled`), paused at
the rung steps and continued from its checkpoint (`spt_core.search`), so the winner's numbers are that row's. The
row adds the search: the winner's budget and lr, every trial's rung scores, its cost in trainings (the trials'
steps over one training's) and its wall seconds; only the winner sees the test split.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEARCH_METHODS = ("auto-halving",)  # opt-in (`compare.py --methods`): one row runs a whole search
NAMES = {"auto-halving": "auto budget (halving)"}


def search_job(job: dict, build: Callable[[dict], tuple[Any, Any, dict]]) -> dict:
    """Run the search on the job's data; `build` is the harness's (model with its seeded head, info, loaders)."""
    import torch

    from benchmarks.imbalance import line_metrics, parse_variant
    from pipelines.config import defaults
    from spt_core.api import (
        Sensitivity,
        TrainConfig,
        Trial,
        apply_plan,
        check_ladder,
        evaluate,
        first_rung,
        fit,
        rung_plan,
        rung_score,
        successive_halving,
    )

    t_start = time.perf_counter()
    plan_cfg, train_cfg = defaults()["plan"], defaults()["train"]
    _, _, loaders = build(job)  # the loaders once; every trial run builds its own model the same way
    sens = Sensitivity.load(job["sens_path"])
    kw = {k: plan_cfg[k] for k in ("structured", "rank", "alpha", "beta", "allocation", "whole", "row_k")}
    labels = check_ladder(plan_cfg["ladder"], int(sens.meta["backbone_params"]))
    plans = {b: rung_plan(sens, b, **kw) for b in labels}
    del sens
    trials = [Trial(b, job["lr"] * f, plans[b].trainable) for b in labels for f in sorted(set(train_cfg["lr_grid"]))]
    ok_index, device = job.get("ok_index"), torch.device(job["device"])
    recipe = {
        "batch_size": job["batch"],
        "seed": job["seed"],
        "device": job["device"],
        "progress": False,
        "balance": parse_variant(job.get("variant", "none"))[0],
        "select": job.get("select", "accuracy"),
    }
    cfgs = [TrainConfig.scaled(job["epochs"], lr=t.lr, **recipe) for t in trials]  # what train_job trains
    spe, plain = len(loaders["train"]), {k: v for k, v in loaders.items() if k != "test"}
    last: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sensitune-search-") as tmp:

        def advance(i: int, until: int) -> Any:
            last.clear()  # one trial's model in memory at a time
            model = build(job)[0]
            apply_plan(model, plans[trials[i].budget])
            model.to(device)
            history = fit(model, plain, cfgs[i], Path(tmp) / f"trial{i}", ok_index=ok_index,
                          max_escape_rate=job.get("max_escape_rate", 0.0), until_step=until)  # fmt: skip
            last.update(model=model, history=history)
            return rung_score(model, history, until % spe != 0, loaders["val"], device, cfgs[i].select, ok_index,
                              job.get("max_escape_rate", 0.0))  # fmt: skip

        result = successive_halving(
            trials, job["epochs"] * spe, advance, base_lr=job["lr"], first_step=first_rung(cfgs[0].warmup_epochs, spe)
        )
    model, hist, win = last["model"], last["history"], trials[result.winner]
    test = evaluate(model, loaders["test"], device)
    line = line_metrics(model, loaders, ok_index, job["max_escape_rate"]) if ok_index is not None else {}
    head, backbone = sum(p.numel() for p in model.get_classifier().parameters()), plans[win.budget].backbone_params
    per_epoch = result.seconds / (result.trial_steps / spe)  # search seconds per epoch of trial steps (val included)
    return {
        "kind": "train", "method": job["method"], "seed": job["seed"], "lr": job["lr"], "budget": job["budget_label"],
        "budget_count": job["budget"], "trainable_backbone": win.trainable, "trainable_head": head,
        "trainable_pct": round(100.0 * win.trainable / backbone, 4), "backbone_params": backbone,
        "details": {"chosen_budget": win.budget, "chosen_lr": win.lr, "ladder": labels,
                    "lr_grid": train_cfg["lr_grid"], "by_kind": {k: v["params"] for k, v in
                                                                  plans[win.budget].by_kind().items()}},
        "val_acc": hist.best_val_acc, "val_loss": round(hist.best_val_loss, 6), "test_acc": test["accuracy"],
        "best_epoch": hist.best_epoch, "epochs": len(hist.epochs), "peak_memory_mb": round(hist.peak_memory_mb, 1),
        "peak_memory_kind": hist.peak_memory_kind, "train_overhead_mb": None, "overhead_peak": "ru_maxrss",
        "s_per_epoch": round(per_epoch, 2), "s_per_train_epoch": round(per_epoch, 2),
        "wall_s": round(time.perf_counter() - t_start, 1), "search": result.to_dict(),
        "trainings": round(result.trainings, 4),
        **({"variant": job.get("variant", "none"), "select": cfgs[0].select, **line} if ok_index is not None else {}),
    }  # fmt: skip
