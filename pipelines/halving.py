"""``plan.budget: auto`` with ``plan.search: halving``: the auto plan's rungs, each at every lr of train.lr_grid,
searched by successive halving on validation (`spt_core.search`, at most two trainings' worth of steps).

Every trial (rung, lr) is the train stage's own training of that plan at that lr (`pipelines.training._fit_plan`:
a fresh build, the shared starting head, the plan applied), paused at each rung step and continued from its
checkpoint, so the winner ends exactly as a plain training of it with ``train.lr`` = its lr would. The trials'
checkpoints live in run/train_state/search/, cleared when a search starts (its rung scores come from these runs
only) and as trials drop out. Only the winner sees the test split, once, after the search.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spt_core.api import (
    History,
    Plan,
    Score,
    TrainConfig,
    Trial,
    evaluate,
    first_rung,
    most_trials,
    rung_score,
    successive_halving,
)
from spt_core.portable.errors import SensituneError

log = logging.getLogger(__name__)

# fit_plan(plan, cfg, until_step, state_dir, check) -> (model, History): one trial's run, continued on to a step;
# `check`: the plan's first run (check that its tuners reach the output; the other lrs and rungs need not)
FitPlan = Callable[[Plan, TrainConfig, int, Path, bool], tuple[Any, History]]


@dataclass(frozen=True)
class Splits:
    """What the search scores trials on (validation) and tests its winner on, and the rule that scores them."""

    val: Any
    test: Any
    device: torch.device
    ok_index: int | None
    max_escape_rate: float


def search_problems(params: dict[str, dict[str, Any]]) -> list[str]:
    """plan.search: halving's trials (plan.ladder x train.lr_grid) that train.epochs cannot judge after the warm-up
    within two trainings (`spt_core.search.most_trials`): found when the params load, not after the measure stage."""
    ladder, lr_grid, t = params["plan"]["ladder"], params["train"]["lr_grid"], params["train"]
    n, warm = len(ladder) * len(set(lr_grid)), first_rung(t["warmup_epochs"], 1)  # in epochs: one step each
    if n <= (most := most_trials(t["epochs"], warm)):
        return []
    return [f"plan.search=halving: plan.ladder x train.lr_grid = {n} trials, but {t['epochs']} epochs judged first "
            f"after a {warm}-epoch warm-up fit at most {most} in 2 trainings: shorten plan.ladder or train.lr_grid, "
            "or raise train.epochs"]  # fmt: skip


def trial_lrs(cfg: TrainConfig, lr_grid: list[float]) -> list[float]:
    """The learning rates of train.lr_grid (multiples of train.lr), smallest first.

    Raises:
        SensituneError: an empty grid, a multiple <= 0, or one that puts the lr below train.min_lr.
    """
    if not lr_grid or any(not f > 0 or cfg.lr * f < cfg.min_lr for f in lr_grid):
        raise SensituneError(
            f"train.lr_grid={lr_grid}: give multiples of train.lr, each > 0 and keeping lr >= train.min_lr "
            f"({cfg.min_lr:g}), e.g. [0.333, 1, 3]"
        )
    return sorted({cfg.lr * f for f in lr_grid})


def search_halving(
    rungs: list[tuple[str, Plan]],
    cfg: TrainConfig,
    lr_grid: list[float],
    steps_per_epoch: int,
    fit_plan: FitPlan,
    splits: Splits,
    root: Path,
) -> tuple[Any, History, Plan, TrainConfig, dict[str, Any]]:
    """Search (rung, lr) by successive halving, then test the winner once.

    Args:
        rungs: The auto plan's (label, plan) rungs (`spt_core.api.ladder_plans`), all from one sensitivity pass.
        cfg: The stage's TrainConfig; each trial trains with it at its own lr.
        lr_grid: train.lr_grid, multiples of cfg.lr.
        steps_per_epoch: Batches per epoch of the train loader.
        fit_plan: Trains one trial on to a step, without the test split.
        splits: Validation (scores every trial at every rung) and test (the winner, once).
        root: Where the trials' checkpoints live (cleared first).

    Returns:
        The winner's model (trained to the end, its best epoch loaded), History (with test), plan and config (its
        lr), and the search's record for metrics.json.
    """
    plans = dict(rungs)
    trials = [Trial(label, lr, plan.trainable) for label, plan in rungs for lr in trial_lrs(cfg, lr_grid)]
    cfgs = [dataclasses.replace(cfg, lr=t.lr) for t in trials]
    shutil.rmtree(root, ignore_errors=True)
    last: dict[str, Any] = {}
    checked: set[str] = set()

    def advance(i: int, until: int) -> Score:
        last.clear()  # one trial's model in memory at a time
        budget = trials[i].budget
        model, history = fit_plan(plans[budget], cfgs[i], until, root / f"trial{i}", budget not in checked)
        checked.add(budget)
        last.update(model=model, history=history)  # the final call is the winner's, trained to the end
        mid_epoch = until % steps_per_epoch != 0
        return rung_score(model, history, mid_epoch, splits.val, splits.device, cfg.select, splits.ok_index,
                          splits.max_escape_rate)  # fmt: skip

    first = first_rung(cfg.warmup_epochs, steps_per_epoch)  # no trial judged before its warm-up's end
    result = successive_halving(trials, cfg.epochs * steps_per_epoch, advance, base_lr=cfg.lr, first_step=first,
                                on_pruned=lambda i: shutil.rmtree(root / f"trial{i}", ignore_errors=True))  # fmt: skip
    win = trials[result.winner]
    log.info("search: %s at lr %g of %d trials, %.2f trainings", win.budget, win.lr, len(trials), result.trainings)
    model, history = last["model"], last["history"]
    test = evaluate(model, splits.test, splits.device)
    history.test_acc, history.test_loss, history.test_metrics = test["accuracy"], test["loss"], test
    record = {**result.to_dict(), "lr_grid": lr_grid, "budget_chosen": win.budget, "lr_chosen": win.lr}
    return model, history, plans[win.budget], cfgs[result.winner], record
