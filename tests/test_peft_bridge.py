"""The peft round trip (docs/peft.md), on the tests' tiny ViT.

Out: docs/peft.md's snippet (sensitivity -> shira_plan -> to_peft -> peft training) gives the same merged weights as
sensitune's own `fit` of that plan with the same data, seed, optimizer rule and lr: bit for bit here, asserted to
1e-6 (SHiRA's vector and sensitune's values are the same entries in the same order; both leave 1-D tensors undecayed).
In: a saved peft LoRA adapter goes through `sensitune merge --from-peft` and `sensitune export`, and the served
OpenVINO artifact gives the peft model's logits.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from support.params import TINY
from support.tuner_cases import tiny_model
from torch.utils.data import DataLoader, TensorDataset

from pipelines.cli import main
from spt_core.api import (
    Plan,
    Target,
    TrainConfig,
    allocate,
    apply_plan,
    find_candidates,
    fit,
    load_peft,
    merge,
    merge_peft,
    shira_plan,
    to_peft,
)
from spt_core.portable.errors import ModelError, PlanError
from spt_core.sensitivity import Sensitivity

DOC = Path(__file__).resolve().parents[1] / "docs" / "peft.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def _loader() -> DataLoader:
    """16 fixed random 32 px images of 3 classes, in file order: both trainings see the same batches."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _changed(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat indices of the entries that differ from `base`, per parameter that changed."""
    out = {}
    for n, p in model.state_dict().items():
        diff = (p != base[n]).reshape(-1).nonzero().reshape(-1)
        if len(diff):
            out[n] = diff
    return out


def test_peft_trains_the_plan_exactly_as_sensitune_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = tiny_model("test_vit")  # every model below is a copy of it: the same weights, one build
    ns = {"model": copy.deepcopy(base), "loader": _loader()}
    exec(compile(SNIPPETS[0], str(DOC), "exec"), ns)  # docs/peft.md, "Out": trains and saves shira-adapter/
    plan, export = ns["plan"], ns["export"]
    linears = {c.name for c in find_candidates(base).values() if c.kind == "linear"}
    assert {t.param for t in plan.targets} == linears and plan.meta["shira_r"] == 4
    assert export.entries == {t.param.removesuffix(".weight"): 4 * sum(t.shape) for t in plan.targets}
    layers = {n: m for n, m in ns["model"].named_modules() if hasattr(m, "shira_indices")}  # wrapped in place
    assert sorted(f"{n}.weight" for n in layers) == sorted(linears)
    for name, layer in layers.items():  # what peft trains is the plan's entries, in the plan's (row-major) order
        rows, cols = layer.shira_indices["default"].long()
        assert torch.equal(rows * layer.in_features + cols, plan.indices[f"{name}.weight"])
        mask = export.mask_fn(layer.base_layer, 4)
        assert torch.equal(mask.reshape(-1).nonzero().reshape(-1), plan.indices[f"{name}.weight"])

    # sensitune's side: the same plan, data, seed and lr through `fit` (constant lr, one epoch = the loop above)
    ref = apply_plan(copy.deepcopy(base), plan)
    cfg = TrainConfig.scaled(1, lr=1e-3, weight_decay=1e-4, warmup_epochs=0, min_lr=1e-3, amp=False, device="cpu",
                             batch_size=8, seed=0)  # fmt: skip
    fit(ref, {"train": ns["loader"], "val": ns["loader"]}, cfg)
    merge(ref)
    merged, record = merge_peft(load_peft(copy.deepcopy(base), "shira-adapter"), adapter="shira-adapter")
    assert record["peft_type"] == "SHIRA" and record["modules_to_save"] == ["head"]
    want, got = ref.state_dict(), merged.state_dict()
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    # not vacuous: exactly the plan's entries and the head moved
    moved = _changed(merged, base.state_dict())
    assert set(moved) == set(plan.indices) | {"head.weight", "head.bias"}
    assert all(torch.equal(moved[n], idx) for n, idx in plan.indices.items())


def _sensitivity(model: torch.nn.Module, row0: float = 0.0) -> Sensitivity:
    """Distinct random scores; `row0` lifts every first row (a whole-matrix top-k would then crowd row 0)."""
    g = torch.Generator().manual_seed(5)
    cands = find_candidates(model)
    scores = {n: torch.rand(c.shape, generator=g) for n, c in cands.items()}
    for n, c in cands.items():
        if c.kind == "linear":
            scores[n][0] += row0
    return Sensitivity(scores, cands, {})


def test_shira_plan_follows_the_per_row_rule_at_shiras_count() -> None:
    sens = _sensitivity(tiny_model("test_vit"), row0=10.0)
    plan = shira_plan(sens, 2)
    for t in plan.targets:
        out_f, in_f = t.shape
        n = 2 * (in_f + out_f)
        per_row = torch.bincount(plan.indices[t.param] // in_f, minlength=out_f)
        k = n // out_f
        assert t.count == n and int(per_row.min()) >= k and int(per_row.max()) <= k + 1
        rows = sens.scores[t.param]
        chosen = torch.zeros(out_f * in_f, dtype=torch.bool)
        chosen[plan.indices[t.param]] = True
        # every row's top-k entries are in, whatever the other rows score
        top = torch.sort(rows, dim=1, descending=True).indices[:, :k] + torch.arange(out_f)[:, None] * in_f
        assert bool(chosen[top.reshape(-1)].all())
    with pytest.raises(PlanError, match=r"lower r$"):
        shira_plan(sens, 40)


def test_to_peft_refuses_what_shira_cannot_express() -> None:
    model = tiny_model("test_vit")
    sens = _sensitivity(model)
    per_row = allocate(sens, "2%", structured="none", rank=4, alpha=10, beta=5, allocation="per_row")
    with pytest.raises(PlanError) as e:
        to_peft(per_row, model)
    msg = str(e.value)
    assert "\n" not in msg and "shira_plan(sensitivity, r)" in msg and "SHiRA adapts nn.Linear weights only" in msg
    assert "not r·(in + out)" in msg  # the default rule's counts are k per row, not SHiRA's
    shira = shira_plan(sens, 2)
    t0 = shira.targets[0]
    trimmed = Plan([Target(t0.param, "sparse", t0.count - 1, t0.ptype, t0.shape, t0.block), *shira.targets[1:]],
                   {**shira.indices, t0.param: shira.indices[t0.param][1:]}, shira.budget, "none", {}, 1, 1,
                   shira.backbone_params)  # fmt: skip
    with pytest.raises(PlanError, match=rf"{re.escape(t0.param)} \({t0.count - 1} entries"):
        to_peft(trimmed, model)
    lora = Plan([Target(t0.param, "lora", 4 * sum(t0.shape), "linear", t0.shape, 0)], {}, 1, "lora", {"rank": 4}, 1,
                1, shira.backbone_params)  # fmt: skip
    with pytest.raises(PlanError, match=r"\(lora: not a SHiRA mask\)"):
        to_peft(lora, model)
    export = to_peft(shira, model)
    with pytest.raises(PlanError, match="get_peft_model on the model given to to_peft"):
        export.mask_fn(copy.deepcopy(model).blocks[0].mlp.fc1, 2)  # an equal layer of another model object


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny demo line prepared (no training), params.yaml exporting FP32 only."""
    from pipelines import stages
    from pipelines.config import load_params

    tmp = tmp_path_factory.mktemp("peftline")
    doc = {"paths": {"raw": str(tmp / "raw"), "data": str(tmp / "data"), "run": str(tmp / "run")}, **TINY,
           "export": {"precisions": ["fp32"], "calibration_size": 8}}  # fmt: skip
    config = tmp / "params.yaml"
    config.write_text(yaml.safe_dump(doc))
    params = load_params(config)
    stages.demo_stage(params)
    stages.prepare_stage(params)
    return {"params": params, "config": config, "tmp": tmp}


def _lora_adapter(line: dict, name: str, modules_to_save: list[str] | None) -> tuple[torch.nn.Module, Path]:
    """A LoRA on the base `merge --from-peft` builds, its weights moved off zero (a trained adapter), saved."""
    from pipelines.models import build_model, model_args

    params = line["params"]
    base, _ = build_model(model_args(params, 4), params["train"]["seed"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=modules_to_save)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    out = line["tmp"] / name
    peft_model.save_pretrained(str(out))
    return peft_model.eval(), out


def _peft_logits(peft_model: torch.nn.Module, line: dict, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """The test images preprocessed as the artifact says, and the peft model's logits on them."""
    from spt_core.portable.preprocess import Preprocess, preprocess_batch

    images = sorted((Path(line["params"]["paths"]["data"]) / "test").rglob("*.png"))
    x = preprocess_batch(images, Preprocess.from_dict(pre))
    with torch.inference_mode():
        return x, peft_model(torch.from_numpy(x)).numpy()


def test_merge_from_peft_is_the_peft_model_and_reaches_export(
    line: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deploy.compile.export
    from pipelines.models import load_merged

    peft_model, adapter = _lora_adapter(line, "lora-adapter", ["head"])
    cfg = ["--config", str(line["config"])]
    assert main(["merge", "--from-peft", str(adapter), *cfg]) == 0
    run = Path(line["params"]["paths"]["run"])
    model, merged = load_merged(run / "merged" / "model.safetensors")
    source = merged["weights_source"]
    assert source["from"] == "peft" and source["peft_type"] == "LORA" and source["adapter"] == str(adapter)
    assert merged["plan_hash"] == f"peft-{source['digest']}" and merged["merge_max_abs_diff"] <= 1e-4
    x, want = _peft_logits(peft_model, line, merged["preprocess"])
    with torch.inference_mode():
        got = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.1  # a real head, not the base's zeros
    seen = {}  # the export step gets the merged model and the record (the real export: the slow test below)
    monkeypatch.setattr(deploy.compile.export, "export_all", lambda *a, **kw: seen.update(kw) or {"passed": True})
    assert main(["export", *cfg]) == 0
    assert seen["weights_source"] == source and seen["model_version"] == seen["plan_hash"] == merged["plan_hash"]

    _, headless = _lora_adapter(line, "headless", None)  # the head left at the base's: refused, one line
    capsys.readouterr()
    assert main(["merge", "--from-peft", str(headless), *cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "modules_to_save=['head']" in err
    with pytest.raises(ModelError, match="not a peft adapter directory"):
        load_peft(tiny_model("test_vit"), line["tmp"])


@pytest.mark.slow  # ~10 s of CPU: the ONNX export of the ViT
def test_imported_lora_exports_and_serves_the_peft_logits(line: dict) -> None:
    from deploy.edge.inferencer import open_inferencer

    peft_model, adapter = _lora_adapter(line, "lora-served", ["head"])
    cfg = ["--config", str(line["config"])]
    assert main(["merge", "--from-peft", str(adapter), *cfg]) == 0
    assert main(["export", *cfg]) == 0
    run = Path(line["params"]["paths"]["run"])
    merged = json.loads((run / "merged" / "merged.json").read_text())
    manifest = json.loads((run / "export" / "openvino" / "fp32" / "manifest.json").read_text())
    assert manifest["weights_source"] == merged["weights_source"] and manifest["plan_hash"] == merged["plan_hash"]
    x, want = _peft_logits(peft_model, line, manifest["preprocess"])
    served = open_inferencer(run / "export").infer(x)
    assert np.abs(served - want).max() <= 1e-4 and np.abs(want).max() > 0.1
