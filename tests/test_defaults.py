"""One source of every default: the typed config (pipelines/config.py, mirrored by params.yaml) and nothing else.

A library function that takes a config value under the key's own name either requires it or defaults to exactly
the config's value, so that a caller who leaves it out gets what the pipeline does. `USES` declares which functions
take which section's values; `default_mismatches` finds every parameter named like a key of the section whose
default differs: any one fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from deploy.compile.export import export_all, export_onnx
from deploy.compile.graph_gate import graph_gate
from deploy.compile.verify import verify
from deploy.edge.rollout.manifest import CHALLENGER_SHARE
from deploy.edge.sync import BoxConfig
from pipelines import config, flows, lines
from pipelines.below_probe import settle
from pipelines.tracking.live import LiveRun
from pipelines.tracking.run import collect_record, log_run
from spt_core.allocate import allocate
from spt_core.budget import full_plan, plan_budget
from spt_core.data import prepare
from spt_core.demo import generate_demo_defects
from spt_core.model import create_model
from spt_core.portable.operating_point import selection_score
from spt_core.probe import fit_probe
from spt_core.sensitivity import measure_sensitivity, measure_task
from spt_core.train import TrainConfig, fit

EVERY = "*"  # every parameter of the function named like a key of the section
# (section, function, keys): `function` takes these keys of params.yaml's `section` under the same names.
USES: list[tuple[str, Callable[..., Any], Sequence[str] | str]] = [
    ("demo", generate_demo_defects, EVERY),
    ("data", prepare, EVERY),
    ("model", create_model, EVERY),
    ("sensitivity", measure_task, EVERY),
    ("sensitivity", measure_sensitivity, ("batches", "amp")),  # its device=None means "where the model is"
    ("plan", allocate, EVERY),
    ("plan", full_plan, EVERY),
    ("plan", plan_budget, EVERY),
    ("train", TrainConfig, EVERY),
    ("train", fit_probe, ("select",)),  # its lr, batch_size, ...: the probe's own recipe, not train.*
    ("train", settle, EVERY),  # below_probe (required: the train stage passes the config's)
    ("evaluate", fit, EVERY),
    ("evaluate", fit_probe, EVERY),
    ("evaluate", selection_score, EVERY),
    ("export", export_all, EVERY),
    ("export", export_onnx, EVERY),
    ("export", verify, EVERY),
    ("export", graph_gate, EVERY),
    ("publish", collect_record, EVERY),
    ("publish", log_run, EVERY),
    ("publish", LiveRun, EVERY),
]


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: a tuple default equals the YAML list it mirrors."""
    seq = (list, tuple)
    return list(a) == list(b) if isinstance(a, seq) and isinstance(b, seq) else a == b


def default_mismatches(fn: Callable[..., Any], values: dict[str, Any], keys: Sequence[str] | str = EVERY) -> dict:
    """``{parameter: (library default, config value)}`` for each parameter of `fn` named like a key of `values`
    (one config section; `keys` narrows it) whose default is not the config's value. Required ones are fine."""
    params = inspect.signature(fn).parameters
    names = [n for n in params if n in values] if keys == EVERY else list(keys)
    missing = [n for n in names if n not in params or n not in values]
    assert not missing, f"{fn.__qualname__}: {missing} not both a parameter and a config key; fix USES"
    return {
        n: (params[n].default, values[n])
        for n in names
        if params[n].default is not inspect.Parameter.empty and not _same(params[n].default, values[n])
    }


def test_no_library_default_differs_from_the_config():
    params = config.defaults()
    found = {
        (fn.__name__, name): pair
        for section, fn, keys in USES
        for name, pair in default_mismatches(fn, params[section], keys).items()
    }
    assert found == {}, f"(function, parameter): (library default, config value): {found}"


def test_a_planted_mismatch_is_found():
    budget = config.defaults()["plan"]["budget"]

    def fake(sensitivity, budget=budget, *, structured, rank=4, alpha=10, beta: float = 5.0, other=1):
        """rank 4 is not plan.rank's 8; alpha 10 equals 10.0; structured is required; other is no config key."""

    assert default_mismatches(fake, config.defaults()["plan"]) == {"rank": (4, 8)}
    assert default_mismatches(fake, config.defaults()["plan"], ("alpha", "structured")) == {}
    with pytest.raises(AssertionError, match="fix USES"):
        default_mismatches(fake, config.defaults()["plan"], ("ladder",))


def test_options_the_pipeline_passes_are_required_where_they_once_disagreed():
    """allocate defaulted to lora/global (the config: none/per_row), export_all to 300 calibration images (160);
    prepare to counts mode without a good class, the demo to balanced classes, the probe to picking by accuracy."""
    for fn, names in [
        (prepare, ("split", "ok_class")),
        (generate_demo_defects, ("counts",)),
        (fit_probe, ("select",)),
        (allocate, ("structured", "rank", "alpha", "beta", "allocation")),
        (full_plan, ("rank", "alpha", "beta")),
        (export_all, ("precisions", "calibration_size", "opset")),
        (measure_sensitivity, ("batches",)),
    ]:
        params = inspect.signature(fn).parameters
        assert all(params[n].default is inspect.Parameter.empty for n in names), fn.__name__


def test_challenger_share_has_one_default():
    """The retrain flow, each line of `pipelines.lines` and a box's sync give a new challenger the same share."""
    shares = [
        inspect.signature(flows.retrain.fn).parameters["challenger_share"].default,
        inspect.signature(lines.retrain_lines.fn).parameters["challenger_share"].default,
        inspect.signature(BoxConfig).parameters["challenger_share"].default,
    ]
    assert shares == [CHALLENGER_SHARE] * 3
