"""Audit checks (issue 31): each test fails on a named mutation of the code it guards.

- the reject threshold of the main job is chosen on validation, not on test (mutation: train_stage or
  choose_operating_point chooses on the test split);
- a LoRA delta with ``lora_scale != 1`` merges exactly, and both the forward and the merge apply the scale
  (mutation: either ignores it; merged == unmerged alone would not notice one that drops it in both);
- the hand-over gate names the split it decides on, and judges only images of that split (mutation: the gate
  reads another split than the one its comparison, the flow's record and MLflow report).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support.params import TINY
from support.tuner_cases import MODELS, RANK, case_plan, perturb, sample_x, tiny_model

from spt_core.checkpoint import load_tuned_into, read_tuned, save_tuned
from spt_core.merge import merge
from spt_core.portable.operating_point import OperatingPoint
from spt_core.tuners import apply_plan
from spt_core.tuners.lora import LoRADelta

# P(good) of every part by split: all goods 0.9, all defects 0.3 on validation but 0.65 on test, so validation's
# threshold (midway between the highest defect and the next part up) is 0.6 and test's would be 0.775.
DEFECT_P_GOOD = {"val": 0.3, "test": 0.65}
GOOD_P_GOOD = 0.9


def _designed_probs(labels: np.ndarray, ok_index: int, n_classes: int, split: str) -> np.ndarray:
    """(N, C) probabilities: P(good) as `DEFECT_P_GOOD` / `GOOD_P_GOOD` says, the rest on the true class (goods:
    on the next class), so the argmax stays right and only the threshold tells the splits apart."""
    probs = np.zeros((len(labels), n_classes), np.float32)
    for i, y in enumerate(labels):
        p_good = GOOD_P_GOOD if y == ok_index else DEFECT_P_GOOD[split]
        probs[i, ok_index] = p_good
        probs[i, y if y != ok_index else (ok_index + 1) % n_classes] += 1.0 - p_good
    return probs


def test_the_main_jobs_threshold_is_chosen_on_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import stages, training
    from pipelines.config import load_params
    from pipelines.layout import FILES
    from spt_core.data import load_dataset_info

    doc: dict[str, Any] = {"paths": {k: str(tmp_path / k) for k in ("raw", "data", "run")}, **TINY}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    params = load_params(tmp_path / "params.yaml")
    stages.demo_stage(params)
    for stage in stages.stages_until("plan"):
        stage.run(params)
    names = load_dataset_info(tmp_path / "data").class_names
    ok = names.index(params["data"]["ok_class"])
    designed: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def collect(model: Any, loader: Any, device: Any = None, **_: Any) -> tuple[np.ndarray, np.ndarray, float]:
        """The split's real labels with `_designed_probs`; the split is the folder its images sit in."""
        split = Path(loader.dataset.records[0][0]).parent.parent.name
        labels = np.asarray(loader.dataset.labels)
        designed[split] = labels, _designed_probs(labels, ok, len(names), split)
        return *designed[split], 0.0

    monkeypatch.setattr(training, "collect", collect)
    metrics = stages.train_stage(params)

    escape = params["evaluate"]["max_escape_rate"]
    on_val, on_test = (OperatingPoint.choose(*designed[s], names, names[ok], escape).threshold for s in ("val", "test"))
    assert on_val == pytest.approx(0.6) and on_test == pytest.approx(0.775)  # the data tells the splits apart
    assert metrics["threshold"] == on_val
    assert read_tuned(tmp_path / "run" / FILES["tuned"])[2]["info"]["threshold"] == on_val  # what travels to the edge
    assert metrics["test"]["at_threshold"]["escape_rate"]["value"] == 1.0  # test's defects pass validation's threshold


@pytest.mark.parametrize("where", ["linear", "qkv"])
def test_lora_with_a_scale_merges_exactly_and_the_scale_is_applied(where: str, tmp_path: Path) -> None:
    """W' = W + lora_scale · B @ A, written out by hand, is what the tuned model computes and what merge writes."""
    scale = 2.5
    name, param, rows = MODELS[where]
    model = tiny_model(name)
    w0 = dict(model.named_parameters())[param].detach().clone()
    plan = case_plan("lora", param, tuple(w0.shape), rows)
    plan = replace(plan, tuner_config={**plan.tuner_config, "rank": RANK, "lora_scale": scale})
    apply_plan(model, plan)
    perturb(model)  # B starts at zero: without this every check below passes vacuously
    (lora,) = [m for m in model.modules() if isinstance(m, LoRADelta)]
    assert lora.scale == scale

    def by_hand(s: float) -> torch.Tensor:
        r0, r1 = lora.rows
        w = w0.clone()
        w[r0:r1] += s * (lora.lora_B @ lora.lora_A).detach()  # (rows, r) @ (r, fan_in) = (rows, fan_in)
        return w

    def reference(w: torch.Tensor) -> torch.nn.Module:
        ref = tiny_model(name)
        with torch.no_grad():
            dict(ref.named_parameters())[param].copy_(w)
        return ref

    x = sample_x()
    with torch.no_grad():
        tuned_out = model(x)
        assert (reference(by_hand(scale))(x) - reference(by_hand(1.0))(x)).abs().max() > 1e-3  # the scale matters
        torch.testing.assert_close(tuned_out, reference(by_hand(scale))(x), rtol=0, atol=1e-5)  # forward applies it
    save_tuned(model, plan, tmp_path / "tuned", info={"model_name": name})
    reloaded = load_tuned_into(tiny_model(name), tmp_path / "tuned", model_name=name)  # how the merge stage reads it
    for merged in (merge(model), merge(reloaded)):
        torch.testing.assert_close(dict(merged.named_parameters())[param].detach(), by_hand(scale), rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), tuned_out, rtol=0, atol=1e-5)  # merged == unmerged


def test_the_handover_gate_judges_only_the_split_it_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import tasks

    data, champion_data = tmp_path / "data", tmp_path / "champion"
    files = [(data, s, c, f"{s}_{c}_{i}") for s in ("train", "val", "test") for c in ("ok", "crack") for i in range(2)]
    files.append((champion_data, "train", "ok", "test_ok_0"))  # a re-split moved this test image into its training
    for root, split, cls, stem in files:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / f"{stem}.png").write_bytes(b"")
    judged: list[Path] = []

    def registry_scores(uri: str, model_uri: str, images: list[Path], labels: list[str]) -> dict[str, Any]:
        judged.extend(images)
        return {"accuracy": 1.0, "escape_rate": 0.0}

    monkeypatch.setattr(tasks, "registry_scores", registry_scores)
    out = tasks.compare_champion.fn("uri", "m", "2", "1", str(data), str(champion_data))
    assert out["gate_split"] == "test"  # metrics.json's test split: the record must say the gate has seen it
    assert judged and all(p.parent.parent == data / out["gate_split"] for p in judged)
    assert sorted({p.name for p in judged}) == ["test_crack_0.png", "test_crack_1.png", "test_ok_1.png"]  # unseen
    assert out["n_heldout"] == 3 and out["n_test"] == 4
