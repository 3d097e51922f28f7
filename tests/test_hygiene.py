"""Issue 15, library side: non-finite numbers fail loudly, rewritten files keep their modes, killed runs leave no
litter. Each test failed on the code before the fix."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from spt_core.allocate import SPT_RULE, allocate
from spt_core.checkpoint import save_tuned
from spt_core.portable.errors import ModelError, PlanError
from spt_core.portable.io import write_text
from spt_core.sensitivity import Sensitivity, measure_sensitivity
from spt_core.tuners import apply_plan


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc1(x)))


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def test_nan_sensitivity_fails_at_measure_naming_the_parameter() -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight[2, 3] = float("nan")  # one damaged backbone value
    with pytest.raises(PlanError, match=r"sensitivity of 'fc1\.(weight|bias)' has \d+ non-finite") as e:
        measure_sensitivity(model, _batches(), batches=2)
    assert "\n" not in str(e.value)


def test_nan_in_a_sensitivity_file_fails_at_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sens = measure_sensitivity(TwoLayer(), _batches(), batches=2)
    sens.scores["fc1.bias"][1] = float("nan")  # the file says "most sensitive" wherever NaN sorts first
    sens.save(tmp_path / "s.safetensors")
    with pytest.raises(PlanError, match=r"s\.safetensors: sensitivity of 'fc1\.bias' has 1 non-finite"):
        Sensitivity.load(tmp_path / "s.safetensors")


def test_weights_with_a_nan_fail_naming_the_tensor(tmp_path: Path) -> None:
    import timm

    from spt_core.model import create_model

    state = timm.create_model("resnet10t", num_classes=3).state_dict()
    name = "layer2.0.conv1.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[7] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match=rf"tensor '{name}' holds 1 non-finite value"):
        create_model("resnet10t", num_classes=3, weights=str(tmp_path / "w.safetensors"))


def test_a_rewritten_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text("a: 1\n")
    os.chmod(path, 0o644)  # a manifest the service (another user) reads
    write_text(path, "a: 2\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "a: 2\n"
    os.chmod(path, 0o640)
    write_text(path, "a: 3\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_tuned_weights_folder_is_readable_by_others(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    plan = allocate(measure_sensitivity(model, _batches(), batches=2), 10, **{**SPT_RULE, "rank": 1})
    apply_plan(model, plan)
    old = os.umask(0o022)
    try:
        out = save_tuned(model, plan, tmp_path / "tuned")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # was 0700 (mkdtemp)


def test_prepare_removes_a_killed_runs_temp_folders(tmp_path: Path) -> None:
    from spt_core.data import prepare

    orphan = tmp_path / "d.tmp-abc123"  # what a kill -9 during prepare leaves
    (orphan / "train").mkdir(parents=True)
    other = tmp_path / "other.tmp-xyz"  # another dataset's: not ours to delete
    other.mkdir()
    prepare("digits", tmp_path / "d", n_train=10, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    assert not orphan.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "other.tmp-xyz"]
