"""plan.budget: auto — the ladder of nested plans, the rule that picks a rung on validation, and the pipeline path."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from support.params import TINY
from support.projects import planned_project

from pipelines import training
from pipelines.cli import main
from pipelines.config import load_params
from pipelines.tracking import collect_record
from spt_core.allocate import SPT_RULE
from spt_core.budget import Rung, check_ladder, choose_rung, full_plan, rung_plan
from spt_core.candidates import count_backbone_params
from spt_core.checkpoint import read_tuned
from spt_core.portable.errors import PlanError
from spt_core.sensitivity import measure_sensitivity
from spt_core.tuners import apply_plan


def test_the_best_validation_score_wins_and_a_tie_goes_to_fewer_values():
    rungs = [Rung("2%", 400, 0.90), Rung("0.5%", 100, 0.80), Rung("1%", 200, 0.90), Rung("full", 5000, 0.85)]
    assert choose_rung(rungs).budget == "1%"  # the first maximum (2%) or the largest budget would be wrong
    assert choose_rung([Rung("full", 5000, 0.91), *rungs]).budget == "full"
    with pytest.raises(PlanError):
        choose_rung([])


def test_a_score_tie_goes_to_the_lower_validation_loss_before_fewer_values():
    tie = [Rung("1%", 200, 0.90, val_loss=0.40), Rung("full", 5000, 0.90, val_loss=0.30), Rung("0.5%", 100, 0.80)]
    assert choose_rung(tie[:2]).budget == "full"  # fewer values would pick 1%
    assert choose_rung([Rung("2%", 400, 0.90, val_loss=0.30), *tie[:2]]).budget == "2%"  # loss tie: fewer values
    assert choose_rung([Rung("0.5%", 100, 0.91, val_loss=0.9), *tie[:2]]).budget == "0.5%"  # the score first
    assert choose_rung([*tie, Rung("2%", 400, 0.90)]).budget == "1%"  # a tied rung without a loss: counts decide
    assert choose_rung(tie).budget == "full"  # a rung below the best score may lack its loss: the tie still uses it


@pytest.mark.parametrize(
    "ladder, fragment",
    [([], "empty"), (["2%", "1%"], "increasing"), (["1%", "full", "2%"], "increasing"), (["1%", "1%"], "increasing"),
     (["one"], "budget='one'")],
)  # fmt: skip
def test_a_bad_ladder_is_refused(ladder, fragment):
    with pytest.raises(PlanError, match=fragment):
        check_ladder(ladder, 10_000)


def _sensitivity(model):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    return measure_sensitivity(model, batches, batches=len(batches))


def test_rungs_are_nested_and_full_trains_every_backbone_value():
    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    sens = _sensitivity(model)
    assert check_ladder(["0.5%", "2%", "full"], count_backbone_params(model)) == ["0.5%", "2%", "full"]
    small, large = (rung_plan(sens, b, **{**SPT_RULE, "structured": "none"}) for b in ("0.5%", "2%"))
    for name, idx in small.indices.items():  # the same scores: the larger budget keeps the smaller one's entries
        whole = any(t.param == name and t.kind == "whole" for t in large.targets)
        assert whole or torch.isin(idx, large.indices[name]).all()
    full = full_plan(sens, rank=8, alpha=10.0, beta=5.0)
    # every candidate: the whole backbone but the stem and the tokens, which every plan keeps frozen
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("patch_embed.", "pos_embed", "cls_")))
    assert full.trainable == sum(c.numel for c in sens.candidates.values()) == count_backbone_params(model) - frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_plan(model, full)
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    assert trained == full.trainable
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # zero deltas


@pytest.fixture(scope="module")
def auto_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    params = {**TINY, "plan": {"budget": "auto", "ladder": ["1%", "5%", "full"]}}
    return planned_project(root, params)


def test_auto_trains_every_rung_on_validation_and_tests_only_the_chosen_one(auto_project, monkeypatch):
    """Scripted validation scores 0.5, 0.75, 0.75: the 5% rung wins the tie with full; test is read once."""
    scripted, losses = iter([0.5, 0.75, 0.75]), iter([0.9, 0.4, 0.4])  # a tie on both: fewer values decide
    calls: list[set[str]] = []
    real_fit = training.fit

    def fit(model, loaders, *a, **kw):
        calls.append(set(loaders))
        history = real_fit(model, loaders, *a, **kw)
        history.best_val_score, history.best_val_loss = next(scripted), next(losses)
        return history

    test_reads = []
    real_evaluate = training.evaluate

    def evaluate(model, loader, *a, **kw):
        test_reads.append(loader)
        return real_evaluate(model, loader, *a, **kw)

    monkeypatch.setattr(training, "fit", fit)
    monkeypatch.setattr(training, "evaluate", evaluate)
    monkeypatch.chdir(auto_project)
    assert main(["train", "--config", "params.yaml", "-q"]) == 0
    assert calls == [{"train", "val"}] * 3  # no rung is fitted with the test split
    assert len(test_reads) == 1
    m = json.loads((auto_project / "runs" / "main" / "metrics.json").read_text())
    plan = json.loads((auto_project / "runs" / "main" / "plan.json").read_text())
    assert [r["budget"] for r in m["ladder"]] == ["1%", "5%", "full"]
    assert [r["val_score"] for r in m["ladder"]] == [0.5, 0.75, 0.75]
    assert m["budget_chosen"] == "5%" and [r["chosen"] for r in m["ladder"]] == [False, True, False]
    tuned_plan = read_tuned(auto_project / "runs" / "main" / "tuned")[0]
    assert tuned_plan.hash() == plan["meta"]["ladder"][1]["plan_hash"] == m["plan_hash"] != plan["hash"]
    assert m["trainable"] == tuned_plan.trainable == plan["meta"]["ladder"][1]["trainable"]
    # MLflow gets every rung (keys without "%") and the chosen budget
    record = collect_record(load_params("params.yaml"), auto_project / "runs" / "main")
    logged = {x["key"]: x["value"] for x in record["metrics"] if x["key"].startswith("ladder.")}
    assert [logged[f"ladder.{b}.val_score"] for b in ("1pct", "5pct", "full")] == [0.5, 0.75, 0.75]
    assert [logged[f"ladder.{b}.chosen"] for b in ("1pct", "5pct", "full")] == [0.0, 1.0, 0.0]
    assert logged["ladder.full.trainable"] == plan["meta"]["candidate_values"]
    assert record["params"]["budget_chosen"] == "5%"


def test_a_chosen_full_rung_merges_into_a_plain_model(auto_project, monkeypatch):
    scripted = iter([0.5, 0.6, 0.9])
    real_fit = training.fit

    def fit(*a, **kw):
        history = real_fit(*a, **kw)
        history.best_val_score = next(scripted)
        return history

    monkeypatch.setattr(training, "fit", fit)
    monkeypatch.chdir(auto_project)
    assert main(["train", "--config", "params.yaml", "-q"]) == 0
    m = json.loads((auto_project / "runs" / "main" / "metrics.json").read_text())
    plan = json.loads((auto_project / "runs" / "main" / "plan.json").read_text())
    assert m["budget_chosen"] == "full" and m["trainable"] == plan["meta"]["candidate_values"] == 250_496
    assert m["by_kind"]["whole"] == m["trainable"]
    assert main(["merge", "--config", "params.yaml", "-q"]) == 0  # merge_stage checks merged == tuned outputs
    merged = json.loads((auto_project / "runs" / "main" / "merged" / "merged.json").read_text())
    assert merged["merge_max_abs_diff"] <= 1e-4 and merged["plan_hash"] == m["plan_hash"]


def test_a_plan_whose_scores_changed_is_refused(auto_project, monkeypatch, capsys):
    plan_json = auto_project / "runs" / "main" / "plan.json"
    saved = plan_json.read_text()
    d = json.loads(saved)
    d["meta"]["ladder"][0]["plan_hash"] = "0" * 16
    plan_json.write_text(json.dumps(d))
    monkeypatch.chdir(auto_project)
    try:
        assert main(["train", "--config", "params.yaml", "-q"]) == 2
        assert "re-run `sensitune plan`" in capsys.readouterr().err
    finally:
        plan_json.write_text(saved)


def test_per_row_allocation_from_the_cli(auto_project, monkeypatch, capsys, tmp_path):
    import shutil

    shutil.copy(auto_project / "runs" / "main" / "sensitivity.safetensors", tmp_path / "sensitivity.safetensors")
    monkeypatch.chdir(auto_project)
    base = ["plan", "--config", "params.yaml", "--run", str(tmp_path), "--budget", "1%", "-q"]
    assert main([*base, "--set", "plan.allocation=per_row", "--set", "plan.structured=none"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["meta"]["allocation"] == "per_row" and set(plan["by_kind"]) >= {"sparse"}
    assert plan["trainable"] == plan["by_kind"]["sparse"]["params"] == plan["budget"]
    assert main([*base, "--set", "plan.allocation=per_row", "--set", "plan.structured=lora"]) == 2  # modules
    assert "plan.structured=lora needs plan.allocation: global" in capsys.readouterr().err
    assert main([*base, "--set", "plan.allocation=global", "--set", "plan.structured=lora"]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["meta"].get("allocation", "global") == "global"
    # plan.whole reaches allocate: the norm layers whole from the budget, the rest per row
    from spt_core.api import Sensitivity

    norm = sum(c.numel for c in Sensitivity.load(tmp_path / "sensitivity.safetensors").candidates.values() if c.norm)
    assert main([*base, "--set", "plan.whole=[norm]", "--budget", "4%"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert norm > 0 and plan["by_kind"]["whole"]["params"] == norm and plan["meta"]["whole"] == ["norm"]
    assert main([*base, "--set", "plan.whole=[stem]"]) == 2  # the stem was not measured
    assert "needs sensitivity.include_stem: true" in capsys.readouterr().err


def test_a_plain_plan_trains_the_model_it_probed_and_gets_the_numbers_of_a_fresh_build(
    auto_project, monkeypatch, tmp_path
):
    """One build for a plain plan; forcing a second build (the old path) gives the same tuned values, bit for bit:
    the RNG the tuners' init draws from is the one a fresh build leaves, although the probe drew from it."""
    import shutil

    builds = []
    real_build, real_fit_plan = training.build_model, training._fit_plan
    monkeypatch.setattr(training, "build_model", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    monkeypatch.chdir(auto_project)
    tuned = {}
    for mode in ("reuse", "rebuild"):
        run = tmp_path / mode
        run.mkdir()
        shutil.copy(auto_project / "runs" / "main" / "sensitivity.safetensors", run / "sensitivity.safetensors")
        if mode == "rebuild":
            monkeypatch.setattr(training, "_fit_plan", lambda *a, built=None, **kw: real_fit_plan(*a, **kw))
        builds.clear()
        common = ["--config", "params.yaml", "--run", str(run), "-q"]
        lora = ["--structured", "lora", "--allocation", "global"]  # LoRA: its init draws from the RNG
        assert main(["plan", *common, "--budget", "5%", *lora]) == 0 and main(["train", *common]) == 0
        assert len(builds) == (1 if mode == "reuse" else 2)
        plan, values, _ = read_tuned(run / "tuned")
        assert plan.by_kind().get("lora", {}).get("params", 0) > 0  # LoRA's A is drawn from the RNG at apply_plan
        tuned[mode] = values
    assert tuned["reuse"].keys() == tuned["rebuild"].keys()
    assert all(torch.equal(tuned["reuse"][k], tuned["rebuild"][k]) for k in tuned["reuse"])
