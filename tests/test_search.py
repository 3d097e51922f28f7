"""plan.search: halving (spt_core.search, pipelines.halving): the schedule's cost bound, the rule that ranks trials,
a survivor that ends exactly as a plain training of it, and the product path (one sensitivity pass, pruning on
validation only, the test split read once, after the search)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.params import TINY
from support.projects import planned_project
from support.training import EFFNET_TRAINABLE, comparable, random_loaders, tiny_effnet

import spt_core.search as search
import spt_core.train.loop as loop
from pipelines import config, halving, training
from pipelines.cli import main
from spt_core.checkpoint import read_tuned
from spt_core.portable.errors import DivergedError, PlanError, SensituneError
from spt_core.search import (
    ETA,
    MAX_TRAININGS,
    Score,
    Stage,
    Trial,
    first_rung,
    halving_schedule,
    rank_key,
    rung_score,
    schedule_cost,
    successive_halving,
)
from spt_core.sensitivity import Sensitivity
from spt_core.train import TrainConfig, fit


@pytest.mark.parametrize(
    "n, steps, first", [(7, 200, 25), (9, 200, 25), (4, 20, 4), (6, 16, 2), (21, 2500, 1), (3, 6, 1), (1, 5, 5)]
)
def test_the_schedule_costs_at_most_two_trainings_and_judges_no_trial_before_the_first_rung(n, steps, first):
    stages, eta = halving_schedule(n, steps, first)
    assert stages[0].trials == n and stages[-1] == Stage(steps, 1) and eta >= ETA
    assert [s.until_step for s in stages[:-1]] == [first * eta**k for k in range(len(stages) - 1)]
    for a, b in zip(stages, stages[1:]):
        assert a.until_step < b.until_step and b.trials == math.ceil(a.trials / eta)
    reached = [0] * n  # every trial's steps, counted trial by trial
    for s in stages:
        reached[: s.trials] = [s.until_step] * s.trials
    assert sum(reached) == schedule_cost(stages) <= MAX_TRAININGS * steps


def test_eta_is_the_smallest_that_keeps_the_bound_and_the_first_cut_waits_for_the_warm_up():
    """The product's 7 rungs, 8 epochs of 25 batches, a 1-epoch warm-up: eta 3 (7 -> 3 -> 1 at epochs 1 and 3)
    would cost 200 + 4 x 25 + 2 x 75 = 450 steps, over 400; 4 to 6 too; eta 7 is one cut at the first epoch's
    end, 1.75 trainings. Without the warm-up's rule the first cut fell at step 4 (21 trials x 3 lrs)."""
    assert first_rung(1, 25) == first_rung(0, 25) == 25 and first_rung(2, 25) == 50  # at least one epoch
    stages, eta = halving_schedule(7, 200, first_rung(1, 25))
    assert (stages, eta) == ([Stage(25, 7), Stage(200, 1)], 7) and schedule_cost(stages) == 350
    stages, eta = halving_schedule(4, 20, 4)  # where eta 3 fits, it is kept: two cuts
    assert (stages, eta) == ([Stage(4, 4), Stage(12, 2), Stage(20, 1)], 3)


def test_a_search_that_cannot_keep_the_bound_is_refused():
    with pytest.raises(PlanError, match="21 trials needs more than 2 trainings of 200 steps when none is judged "
                                        "before step 25 .*at most 9 trials fit; shorten plan.ladder"):  # fmt: skip
        halving_schedule(21, 200, 25)  # 21 trials to the warm-up's end alone cost 525 of the 400
    with pytest.raises(PlanError, match="at most 1 trials fit"):
        halving_schedule(2, 20, 20)  # the warm-up takes every epoch: no step is left to judge at


def test_the_default_search_fits_the_default_epochs():
    """plan.ladder x train.lr_grid at train.epochs and train.warmup_epochs: `sensitune train` with
    plan.search: halving does not stop on a PlanError under the defaults."""
    d = config.defaults()
    n = len(d["plan"]["ladder"]) * len(d["train"]["lr_grid"])
    stages, _ = halving_schedule(n, d["train"]["epochs"] * 25, first_rung(d["train"]["warmup_epochs"], 25))
    assert stages[0].trials == n and stages[0].until_step == 25 * max(1, d["train"]["warmup_epochs"])


def test_a_search_the_epochs_cannot_judge_is_refused_when_the_params_load(tmp_path, monkeypatch, capsys):
    """7 rungs x 3 lrs = 21 trials at 8 epochs (a 1-epoch warm-up): at most 9; refused before the measure stage,
    in one line naming the keys. 20 epochs judge 21."""
    monkeypatch.chdir(tmp_path)
    search_21 = ["--set", "plan.budget=auto", "--set", "plan.search=halving", "--set", "train.lr_grid=[0.5, 1, 2]"]
    assert main(["plan", *search_21]) == 2
    err = capsys.readouterr().err.strip()
    assert "21 trials, but 8 epochs judged first after a 1-epoch warm-up fit at most 9" in err and "\n" not in err
    assert not list(tmp_path.iterdir())  # nothing written
    sets = {"plan.budget": "auto", "plan.search": "halving", "train.lr_grid": [0.5, 1, 2]}
    assert config.load_params(None, {**sets, "train.epochs": 20})["train"]["lr_grid"] == [0.5, 1, 2]
    assert config.load_params(None, {**sets, "plan.search": "ladder"})  # the ladder trains each rung: no bound


def test_the_rank_is_validation_score_then_loss_then_fewer_values_then_the_lr_nearest_the_base():
    small, large = Trial("1%", 1e-3, 100), Trial("full", 1e-3, 5000)
    lo, hi = Trial("1%", 1e-3 / 3, 100), Trial("1%", 3e-3, 100)

    def best(*pairs):
        return max(pairs, key=lambda p: rank_key(p[0], p[1], 1e-3))[0]

    assert best((small, Score(0.8, 0.1)), (large, Score(0.9, 0.9))) is large  # the score first
    assert best((small, Score(0.9, 0.5)), (large, Score(0.9, 0.4))) is large  # then the lower loss
    assert best((large, Score(0.9, 0.4)), (small, Score(0.9, 0.4))) is small  # then fewer values
    assert best((hi, Score(0.9, 0.4)), (small, Score(0.9, 0.4))) is small  # then the base lr
    assert best((hi, Score(0.9, 0.4)), (lo, Score(0.9, 0.4))) is lo  # equally far (x3, /3): the smaller lr


def test_the_search_advances_each_trial_in_order_counts_its_steps_and_drops_a_diverged_one():
    trials = [Trial(b, 1e-3, n) for b, n in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]
    val = {0: [0.2], 1: [0.9, 0.4], 2: [0.8, 0.7, 0.75], 3: [0.95]}  # d diverges at its first rung
    calls: list[tuple[int, int]] = []

    def advance(i, until):
        calls.append((i, until))
        if i == 3:
            raise DivergedError("train loss became nan")
        return Score(val[i][sum(j == i for j, _ in calls) - 1], 1.0)

    pruned: list[int] = []
    result = successive_halving(trials, 8, advance, base_lr=1e-3, first_step=1, on_pruned=pruned.append)
    assert [s.until_step for s in result.stages] == [1, 3, 8]
    assert calls == [(0, 1), (1, 1), (2, 1), (3, 1), (1, 3), (2, 3), (2, 8)]
    assert result.winner == 2 and result.diverged == [3] and pruned == [0, 3, 1]  # b led at step 1, c at step 3
    assert result.trial_steps == 4 * 1 + 2 * 2 + 5 == schedule_cost(result.stages) and result.trainings == 1.625
    record = result.to_dict()
    assert [t["stopped_at_step"] for t in record["trials"]] == [1, 3, 8, 1] and record["eta"] == 3
    assert record["trials"][3]["val_score"] == [None] and record["trials"][2]["chosen"]

    def diverge(i, until):
        raise DivergedError("train loss became nan")

    with pytest.raises(PlanError, match=r"search's choice \(c at lr 0.001\) diverged"):
        successive_halving(trials[2:3], 4, diverge, base_lr=1e-3, first_step=1)


def _budget_model(budget: str) -> torch.nn.Module:
    model = tiny_effnet(drop_rate=0.2, drop_path_rate=0.1)  # dropout and drop-path draw from the RNG every step
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(EFFNET_TRAINABLE if budget == "pwl" else ("classifier.",)))
    return model


def test_the_survivor_ends_exactly_as_a_plain_training_of_it(tmp_path):
    """2 epochs x 4 batches; rungs at steps 1 and 3 (a first rung at step 1, as a caller may set it), inside the
    first epoch: the winner pauses there twice."""
    loaders = {k: v for k, v in random_loaders(n_train=32, n_eval=8).items() if k != "test"}
    trials = [Trial(b, lr, i) for i, b in enumerate(("head", "pwl")) for lr in (3e-3, 3e-2)]

    def cfg(lr):
        return TrainConfig.scaled(2, warmup_epochs=1, lr=lr, freeze_bn_stats=False, progress=False)

    def advance(i, until):
        model = _budget_model(trials[i].budget)
        history = fit(model, loaders, cfg(trials[i].lr), tmp_path / f"t{i}", until_step=until)
        advance.last = (model, history)
        return rung_score(model, history, until % 4 != 0, loaders["val"], torch.device("cpu"), "accuracy")

    result = successive_halving(trials, 8, advance, base_lr=1e-2, first_step=1)
    assert [(s.until_step, s.trials) for s in result.stages] == [(1, 4), (3, 2), (8, 1)]
    model, history = advance.last
    win = trials[result.winner]
    plain_model = _budget_model(win.budget)
    plain = fit(plain_model, loaders, cfg(win.lr), None)
    assert history.resumed_at_epoch == 0 and len(history.epochs) == 2
    assert comparable(history.to_dict()) == comparable(plain.to_dict())
    assert all(torch.equal(v, plain_model.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(SensituneError, match="at step 8, past until_step=2; delete it"):  # no way back
        fit(_budget_model(win.budget), loaders, cfg(win.lr), tmp_path / f"t{result.winner}", until_step=2)
    with pytest.raises(SensituneError, match="needs an out_dir"):
        fit(_budget_model(win.budget), loaders, cfg(win.lr), None, until_step=2)


@pytest.fixture(scope="module")
def halving_project(tmp_path_factory):
    """TINY with plan.budget: auto, plan.search: halving: rungs 1% and 5% at lr x1 and x3 = 4 trials, 5 epochs of
    4 batches (no warm-up): judged first at the first epoch's end (step 4), the best 2 at epoch 3 (step 12), the
    survivor to step 20."""
    root = tmp_path_factory.mktemp("halving")
    # no probe baseline: tuned/ holds the search's winner, never the probe (train.below_probe)
    params = {**TINY, "plan": {"budget": "auto", "ladder": ["1%", "5%"], "search": "halving"},
              "train": {**TINY["train"], "epochs": 5, "batch_size": 3, "lr_grid": [1.0, 3.0],
                        "probe_baseline": False}}  # fmt: skip
    return planned_project(root, params)


def test_the_product_prunes_on_validation_only_and_tests_the_winner_once(halving_project, monkeypatch):
    """Scripted validation (one score per trial and epoch) ranks (5%, x3) first at epoch 1 and (1%, x1) first at
    epoch 3 (its best so far, 0.95, over the other's 0.9 of epoch 1); test would rank (5%, x3) first: (1%, x1)
    wins, and only it is ever tested. Every rung is an epoch's end (no validation at a pause), and the scores never
    come from another sensitivity pass."""
    lr = TINY["train"].get("lr", config.defaults()["train"]["lr"])
    val = {("5%", 3 * lr): [0.9, 0.5, 0.5], ("1%", lr): [0.8, 0.6, 0.95, 0.85, 0.85], ("1%", 3 * lr): [0.3],
           ("5%", lr): [0.2]}  # fmt: skip
    test = {("5%", 3 * lr): 1.0, ("1%", lr): 0.25, ("1%", 3 * lr): 0.95, ("5%", lr): 0.5}
    plan = json.loads((halving_project / "runs" / "main" / "plan.json").read_text())
    budget_of = {r["trainable"]: r["budget"] for r in plan["meta"]["ladder"]}
    now, seen, fits, tests, loads = {}, {}, [], [], []
    real_fit, real_load = training.fit, Sensitivity.load

    def fit_(model, loaders, cfg, *a, **kw):
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
        now["trial"] = (budget_of[trainable], cfg.lr)
        fits.append((now["trial"], set(loaders), kw["until_step"]))
        return real_fit(model, loaders, cfg, *a, **kw)

    def validate(model, loader, *a, **kw):  # an epoch's end inside fit
        seen[now["trial"]] = seen.get(now["trial"], -1) + 1
        return 0.5, 1.0, val[now["trial"]][seen[now["trial"]]]

    def validate_at_a_pause(*a, **kw):
        raise AssertionError("a rung fell inside an epoch")

    def evaluate(model, loader, *a, **kw):
        tests.append((now["trial"], len(fits)))
        return {"accuracy": test[now["trial"]], "loss": 1.0, "confusion": [[1]]}

    def load(path):
        loads.append(path)
        return real_load(path)

    def measure(*a, **kw):
        raise AssertionError("the search measured sensitivity again")

    monkeypatch.setattr(training, "fit", fit_)
    monkeypatch.setattr(loop, "validate", validate)
    monkeypatch.setattr(search, "validate", validate_at_a_pause)
    monkeypatch.setattr(halving, "evaluate", evaluate)
    monkeypatch.setattr(Sensitivity, "load", staticmethod(load))
    for name in ("measure_sensitivity", "measure_task"):
        monkeypatch.setattr(f"spt_core.sensitivity.{name}", measure)
    monkeypatch.chdir(halving_project)
    assert main(["train", "--config", "params.yaml", "-q"]) == 0
    order = [("1%", lr), ("1%", 3 * lr), ("5%", lr), ("5%", 3 * lr)]  # rungs x lrs
    assert [(t, u) for t, _, u in fits] == [(k, 4) for k in order] + [(order[3], 12), (order[0], 12), (order[0], 20)]
    assert all(splits == {"train", "val"} for _, splits, _ in fits)  # no trial is fitted with the test split
    assert tests == [(("1%", lr), 7)] and len(loads) == 1  # the winner, once, after every fit; one set of scores
    m = json.loads((halving_project / "runs" / "main" / "metrics.json").read_text())
    assert (m["budget_chosen"], m["lr_chosen"], m["test_acc"], m["val_score"]) == ("1%", lr, 0.25, 0.95)
    s = m["search"]
    assert s["trial_steps"] == 4 * 4 + 2 * 8 + 8 and s["trainings"] == 2.0 and s["eta"] == 3
    assert [t["stopped_at_step"] for t in s["trials"]] == [20, 4, 4, 12]
    assert [t["val_score"] for t in s["trials"]] == [[0.8, 0.95, 0.95], [0.3], [0.2], [0.9, 0.9]]
    tuned_plan, _, info = read_tuned(halving_project / "runs" / "main" / "tuned")
    assert tuned_plan.hash() == plan["meta"]["ladder"][0]["plan_hash"] == m["plan_hash"]
    assert info["info"]["train"]["lr"] == lr  # the winner's own lr, as its plain training would record
    state = halving_project / "runs" / "main" / "train_state" / "search"
    assert sorted(p.name for p in state.iterdir()) == ["trial0"]  # the dropped trials' checkpoints are gone


@pytest.mark.slow  # two more tiny trainings: `make slow` runs it
def test_the_products_winner_equals_a_plain_training_of_its_budget_at_its_lr(halving_project, monkeypatch, tmp_path):
    import shutil

    monkeypatch.chdir(halving_project)
    main_run = halving_project / "runs" / "main"
    searched, plain = tmp_path / "searched", tmp_path / "plain"
    for run in (searched, plain):
        run.mkdir()
        shutil.copy(main_run / "sensitivity.safetensors", run / "sensitivity.safetensors")
    for name in ("plan.json", "plan.safetensors"):
        shutil.copy(main_run / name, searched / name)
    common = ["--config", "params.yaml", "-q"]
    assert main(["train", *common, "--run", str(searched)]) == 0
    m = json.loads((searched / "metrics.json").read_text())
    assert main(["plan", *common, "--run", str(plain), "--budget", m["budget_chosen"]]) == 0
    assert main(["train", *common, "--run", str(plain), "--set", f"train.lr={m['lr_chosen']!r}"]) == 0
    p = json.loads((plain / "metrics.json").read_text())
    assert m.get("model", "tuned") == p.get("model", "tuned") == "tuned"  # the trained winner, not a probe
    assert [m[k] for k in ("plan_hash", "val_score", "val_loss", "test_acc")] == [
        p[k] for k in ("plan_hash", "val_score", "val_loss", "test_acc")]  # fmt: skip
    a, b = read_tuned(searched / "tuned")[1], read_tuned(plain / "tuned")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
