"""The budget and learning rate chosen on validation by successive halving, for at most two trainings.

Every trial is one (budget, lr): a rung of the ladder (`spt_core.budget`, all allocated from the one
sensitivity pass) trained at a multiple of the base lr. All trials train to the first rung step, the best
1/eta of them go on to the next, and so on until one trains to the end (`halving_schedule`). A trial that goes
on continues its own run: the same schedule, optimizer and RNG as if it had never paused
(``fit(until_step=...)``), so the survivor ends exactly where a plain training of it ends.

No trial is judged before `first_rung`: the end of its warm-up, at least one epoch. Before it a trial has
barely trained at its own lr (a cut at step 4 of 200 ranks near-untrained models, 5-47 % validation accuracy
on 10 classes: benchmarks/README.md, "Budget and lr search"); the rungs then fall on epoch ends, so each is
judged on a whole epoch's validation. eta is the smallest from `ETA` up whose schedule keeps the cost bound;
where none does, there are too many trials for the epochs (a `PlanError` names the most that fit).

Trials are ranked on validation only: `selection_key` (``train.select``'s score, then the lower loss) of the
best state validated so far (the epochs done, and the state at the pause), then the fewer trainable values, then
the lr nearest the base lr, then the smaller lr. The cost is counted in optimizer steps: every trial's steps
over one training's (``epochs x batches``), at most `MAX_TRAININGS`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .portable.errors import DivergedError, PlanError
from .portable.metrics import selection_key
from .train import History, validate

log = logging.getLogger(__name__)

ETA = 3  # the least eta: each rung keeps the best ceil(n / eta) trials
MAX_TRAININGS = 2.0  # trial-steps over one training's steps


@dataclass(frozen=True)
class Trial:
    """One (budget, lr) of the search: its ladder label, exact trainable count and learning rate."""

    budget: str
    lr: float
    trainable: int


@dataclass(frozen=True)
class Stage:
    """`trials` train until optimizer step `until_step`, then the best of them go on to the next stage."""

    until_step: int
    trials: int


@dataclass(frozen=True)
class Score:
    """What validation says of a trial at a rung (the loss breaks ties of the score; -inf: it diverged)."""

    val_score: float
    val_loss: float
    val_acc: float | None = None


@dataclass
class SearchResult:
    """The winner (an index into the trials), every trial's scores per rung, and what the search cost."""

    winner: int
    trials: list[Trial]
    stages: list[Stage]
    scores: list[list[Score]]  # per trial, one per stage it trained in
    total_steps: int  # one training's steps
    eta: int = ETA
    trial_steps: int = 0
    seconds: float = 0.0
    diverged: list[int] = field(default_factory=list)

    @property
    def trainings(self) -> float:
        """Trainings' worth of optimizer steps the search took (the cost bound: `MAX_TRAININGS`)."""
        return self.trial_steps / self.total_steps

    def to_dict(self) -> dict[str, Any]:
        """metrics.json's record: the schedule, each trial's rung scores and where it stopped."""
        rows = [
            {**asdict(t), "val_score": [_finite(s.val_score) for s in sc],
             "val_loss": [_finite(s.val_loss) for s in sc], "stopped_at_step": self.stages[len(sc) - 1].until_step,
             "chosen": i == self.winner, "diverged": i in self.diverged}
            for i, (t, sc) in enumerate(zip(self.trials, self.scores))
        ]  # fmt: skip
        first = self.stages[0].until_step
        return {"rule": f"successive halving, eta {self.eta}, first judged at step {first}",
                "eta": self.eta, "stages": [asdict(s) for s in self.stages],
                "trials": rows, "total_steps": self.total_steps, "trial_steps": self.trial_steps,
                "trainings": round(self.trainings, 4), "seconds": round(self.seconds, 2)}  # fmt: skip


def _finite(x: float) -> float | None:
    """JSON has no infinity: a diverged trial's score is recorded as null."""
    return x if math.isfinite(x) else None


def survivors(n: int, eta: int = ETA) -> list[int]:
    """Trials per stage: n, ceil(n / eta), ... down to 1."""
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / eta))
    return counts


def schedule_cost(stages: Sequence[Stage]) -> int:
    """Trial-steps of a schedule: each stage's trials train from the previous stage's step to theirs."""
    return sum(s.trials * (s.until_step - prev) for s, prev in zip(stages, [0, *(s.until_step for s in stages)]))


def first_rung(warmup_epochs: int, steps_per_epoch: int) -> int:
    """The first step at which trials are judged: the end of the warm-up, and at least one epoch."""
    return max(1, warmup_epochs) * steps_per_epoch


def most_trials(total_steps: int, first_step: int, max_trainings: float = MAX_TRAININGS) -> int:
    """The most trials a search can judge at `first_step` within `max_trainings`: one cut there, the cheapest
    schedule, costs T + (n - 1) x first_step. In epochs (`first_rung`'s), 1 + epochs / warm-up epochs at 2."""
    return 1 + math.floor((max_trainings - 1) * total_steps / first_step) if first_step < total_steps else 1


def halving_schedule(
    n: int, total_steps: int, first_step: int, max_trainings: float = MAX_TRAININGS
) -> tuple[list[Stage], int]:
    """The stages for `n` trials, and their eta: rung steps at first_step x (1, eta, eta^2, ...), each keeping
    the best ceil(n / eta) trials, the survivor to `total_steps`; eta the smallest from `ETA` up whose cost is
    within `max_trainings` trainings (eta = n: one cut at `first_step`, the cheapest).

    Raises:
        PlanError: no eta keeps the bound: even one cut at `first_step` costs T + (n - 1) x first_step.
    """
    if n < 1 or total_steps < 1 or first_step < 1:
        raise PlanError(f"a search needs trials and steps (got {n} trials, {total_steps} steps, first {first_step})")
    if n == 1:
        return [Stage(total_steps, 1)], ETA
    for eta in range(ETA, max(ETA, n) + 1):
        counts = survivors(n, eta)
        steps = [first_step * eta**k for k in range(len(counts) - 1)]
        stages = [Stage(s, m) for s, m in zip([*steps, total_steps], counts)]
        if steps[-1] < total_steps and schedule_cost(stages) <= max_trainings * total_steps:
            return stages, eta
    raise PlanError(
        f"a halving search of {n} trials needs more than {max_trainings:g} trainings of {total_steps} steps when "
        f"none is judged before step {first_step} (the warm-up's end): at most "
        f"{most_trials(total_steps, first_step, max_trainings)} trials fit; shorten "
        "plan.ladder or train.lr_grid, or raise train.epochs"
    )


def rung_score(
    model: nn.Module,
    history: History,
    mid_epoch: bool,
    loader: Any,
    device: torch.device,
    select: str,
    ok_index: int | None = None,
    max_escape_rate: float = 0.005,
) -> Score:
    """A trial's score at a rung: the best state validated so far, i.e. its best epoch (`History`) and, when it
    paused inside an epoch (`mid_epoch`), the model at the pause, validated here on `loader` (validation)."""
    best = Score(history.best_val_score, history.best_val_loss, history.best_val_acc)
    if not mid_epoch:
        return best
    acc, loss, score = validate(model, loader, device, select, ok_index, max_escape_rate)
    now = Score(score, loss, acc) if math.isfinite(loss) else Score(-math.inf, math.inf, acc)  # diverging
    return now if selection_key(score, loss) > selection_key(best.val_score, best.val_loss) else best


def rank_key(t: Trial, s: Score, base_lr: float) -> tuple:
    """Higher is better: `selection_key` of the score, then fewer values, the lr nearest `base_lr`, the smaller lr."""
    return (*selection_key(s.val_score, s.val_loss), -t.trainable, -abs(math.log(t.lr / base_lr)), -t.lr)


def successive_halving(
    trials: Sequence[Trial],
    total_steps: int,
    advance: Callable[[int, int], Score],
    *,
    base_lr: float,
    first_step: int,
    max_trainings: float = MAX_TRAININGS,
    on_pruned: Callable[[int], None] | None = None,
) -> SearchResult:
    """Run the search: ``advance(i, step)`` trains trial i on to optimizer step `step` (continuing its run) and
    returns its `Score` on validation; the last call trains the winner to `total_steps`.

    Args:
        trials: The (budget, lr) trials, in the order their runs are advanced.
        total_steps: One training's optimizer steps (epochs x batches per epoch).
        advance: Trains and validates one trial; never sees the test split.
        base_lr: The configured lr (``train.lr``): ties go to the trial nearest it.
        first_step: No trial is judged before this step (`first_rung`: the warm-up's end).
        on_pruned: Called with each trial that stops, e.g. to delete its checkpoint.

    Raises:
        PlanError: the schedule would cost more than `max_trainings` (`halving_schedule`); or the winner diverged.
    """
    t0 = time.perf_counter()
    stages, eta = halving_schedule(len(trials), total_steps, first_step, max_trainings)
    result = SearchResult(0, list(trials), stages, [[] for _ in trials], total_steps, eta)
    alive, reached = list(range(len(trials))), [0] * len(trials)
    for k, stage in enumerate(stages):
        for i in alive:
            try:
                score = advance(i, stage.until_step)
            except DivergedError as e:
                if k == len(stages) - 1:
                    t = trials[i]
                    raise PlanError(f"the search's choice ({t.budget} at lr {t.lr:g}) diverged: {e}") from e
                log.warning("trial %s at lr %g diverged, dropped: %s", trials[i].budget, trials[i].lr, e)
                score, result.diverged = Score(-math.inf, math.inf), [*result.diverged, i]
            result.scores[i].append(score)
            result.trial_steps += stage.until_step - reached[i]
            reached[i] = stage.until_step
        if result.trial_steps > max_trainings * total_steps:  # the bound the search exists to keep
            raise PlanError(f"search cost {result.trial_steps} steps, over {max_trainings:g} x {total_steps}")
        keep = stages[k + 1].trials if k + 1 < len(stages) else 1
        ranked = sorted(alive, key=lambda i: rank_key(trials[i], result.scores[i][-1], base_lr), reverse=True)
        for i in ranked[keep:]:
            if on_pruned is not None:
                on_pruned(i)
        alive = ranked[:keep]
        log.info("search stage %d (step %d): %d of %d go on", k + 1, stage.until_step, len(alive), len(ranked))
    result.winner, result.seconds = alive[0], time.perf_counter() - t0
    return result
