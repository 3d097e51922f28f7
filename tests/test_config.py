"""pipelines.config: typed sections are the only defaults; params.yaml lists every key; bad keys and values fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines import config
from spt_core.portable.errors import SensituneError

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_lists_every_key_with_the_default_value():
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert on_disk == config.defaults()  # one set of defaults: the sections, written out in params.yaml


def test_every_problem_is_reported_at_once_naming_each_key(tmp_path: Path):
    bad = tmp_path / "p.yaml"
    bad.write_text("plan:\n  budgt: 5\ntrain:\n  epochs: many\n  amp: 3\noptim: {}\n")
    with pytest.raises(SensituneError) as e:
        config.load_params(bad)
    msg = str(e.value)
    assert "unknown key plan.budgt" in msg and "unknown section 'optim'" in msg and "\n" not in msg
    bad.write_text("train:\n  epochs: many\n  amp: 3\n")
    with pytest.raises(SensituneError, match=r"train\.epochs='many' is not an integer; train\.amp=3 is not true"):
        config.load_params(bad)


@pytest.mark.parametrize(
    "dotted, value, ok",
    [
        ("data.n_test", None, True),  # nullable
        ("data.seed", None, False),
        ("train.lr", 1, True),  # an integer is a number
        ("train.epochs", 1.5, False),
        ("train.epochs", True, False),  # YAML `yes` must not pass as 1
        ("plan.budget", 400000, True),  # budgets are text or a count
        ("export.precisions", ["fp32", "int4"], False),
        ("sensitivity.head", "zero", False),
        ("plan.whole", ["norm", "depthwise"], True),
        ("plan.whole", ["bn"], False),
        ("plan.row_k", "fraction", False),
    ],
)
def test_value_types_and_choices(dotted: str, value, ok: bool):
    if ok:
        assert config.load_params(None, {dotted: value})[dotted.split(".")[0]][dotted.split(".")[1]] == value
    else:
        with pytest.raises(SensituneError, match=dotted.replace(".", r"\.")):
            config.load_params(None, {dotted: value})


def test_the_plan_groups_are_the_methods_and_their_companions_are_checked_first():
    """plan.whole / plan.row_k offer exactly spt_core.allocate's names; keys that need another one say which."""
    from spt_core.api import ROW_K, WHOLE_GROUPS

    choices = {k.dotted: k.choices for k in config.keys()}
    assert choices["plan.whole"] == tuple(WHOLE_GROUPS) and choices["plan.row_k"] == ROW_K
    with pytest.raises(SensituneError, match=r"plan\.whole: \[stem\] needs sensitivity\.include_stem: true"):
        config.load_params(None, {"plan.whole": ["stem"]})
    assert config.load_params(None, {"plan.whole": ["stem"], "sensitivity.include_stem": True})["plan"]["whole"]
    with pytest.raises(SensituneError, match=r"plan\.row_k=share .* needs plan\.allocation: per_row"):
        config.load_params(None, {"plan.row_k": "share", "plan.allocation": "global", "plan.structured": "lora"})


def test_set_parses_yaml_values():
    assert config.parse_set("export.precisions=[fp32, int8]") == ("export.precisions", ["fp32", "int8"])
    assert config.parse_set("data.n_test=null") == ("data.n_test", None)
    assert config.parse_set("train.lr=3e-4") == ("train.lr", 3e-4)
    with pytest.raises(SensituneError, match="section.key=value"):
        config.parse_set("lr=3")
