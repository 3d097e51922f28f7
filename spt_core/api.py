"""spt_core's front door: the method as five calls, and the few helpers an application needs around them.

    model, info = create_model("vit_small_patch16_224", num_classes=2, weights="hub")
    sensitivity = measure_sensitivity(model, loaders["train"], batches=16)  # Σ g² per candidate entry
    plan = allocate(sensitivity, "0.5%", **SPT_RULE)                         # -> Plan: plain data, exact count
    apply_plan(model, plan)                                                   # tuners in, every other weight frozen
    history = fit(model, loaders, TrainConfig.scaled(epochs=10))              # the epoch chosen on validation
    merge(model)                                                              # a plain timm model, same outputs

(`loaders` from `make_loaders`; `spt_core.portable` holds the torch-free pieces: errors, io, metrics, preprocess.)
A new tuner kind is a module, a config dataclass of its own hyper-parameters and one `register_tuner` call; its
hyper-parameters then go to `allocate` as keywords and travel in the plan (tests/test_new_tuner_kind.py).
peft users get a plan as a SHiRA adapter (`shira_plan`, `to_peft`), and any peft adapter comes back as a plain
model (`load_peft`, `merge_peft`): docs/peft.md.

Everything here is a re-export: the application (pipelines/, benchmarks/) imports spt_core through this module,
so the modules behind it can move without touching their callers. It imports torch and timm; ``import spt_core``
alone does not (the edge imports `spt_core.portable` without torch).
"""

from __future__ import annotations

from .allocate import ROW_K, SPT_RULE, WHOLE_GROUPS, allocate
from .budget import (
    AUTO,
    FULL,
    HALVING,
    LADDER,
    Rung,
    check_ladder,
    choose_rung,
    full_plan,
    is_ladder,
    ladder_plans,
    plan_budget,
    rung_plan,
    search_of,
)
from .candidates import Candidate, count_backbone_params, find_candidates
from .checkpoint import bn_buffers, load_tuned_into, read_tuned, save_tuned
from .data import (
    IMAGE_SUFFIXES,
    Augment,
    DatasetInfo,
    check_class_sizes,
    load_dataset_info,
    make_loaders,
    median_side,
    prepare,
    scan_split,
)
from .demo import DEMO_CLASSES, generate_demo_defects
from .device import resolve_device
from .distributed import close as close_distributed  # `close` alone says nothing once out of its module
from .distributed import init_from_env
from .evaluate import collect, evaluate
from .merge import merge
from .model import ModelInfo, check_input_side, create_model, input_grid, input_size_for
from .peft_bridge import PeftExport, load_peft, merge_peft, shira_plan, to_peft
from .plan import Plan, Target, parse_budget
from .probe import fit_probe, head_only
from .report import plot_plan
from .search import Score, SearchResult, Trial, first_rung, most_trials, rung_score, successive_halving
from .sensitivity import Sensitivity, measure_sensitivity, measure_task
from .train import RESUME_FREE, History, TrainConfig, fit, validate
from .tuners import (
    TunerKind,
    apply_plan,
    check_tuners_reached,
    plan_is_mergeable,
    register_tuner,
    remove_tuners,
    structured_choices,
)

__all__ = [
    # the method, in order: model -> sensitivity -> plan -> tuners -> training -> merge
    "create_model",
    "input_size_for",
    "input_grid",
    "check_input_side",
    "ModelInfo",
    "find_candidates",
    "Candidate",
    "count_backbone_params",
    "measure_sensitivity",
    "measure_task",
    "Sensitivity",
    "allocate",
    "SPT_RULE",
    "WHOLE_GROUPS",
    "ROW_K",
    "structured_choices",
    "parse_budget",
    "Plan",
    "Target",
    "apply_plan",
    "check_tuners_reached",
    "remove_tuners",
    "register_tuner",
    "TunerKind",
    "fit",
    "TrainConfig",
    "History",
    "RESUME_FREE",
    "fit_probe",
    "head_only",
    "evaluate",
    "collect",
    "merge",
    "plan_is_mergeable",
    # the budget chosen on validation (plan.budget: auto)
    "plan_budget",
    "is_ladder",
    "ladder_plans",
    "check_ladder",
    "full_plan",
    "choose_rung",
    "Rung",
    "AUTO",
    "FULL",
    "rung_plan",
    # ... or searched with a few learning rates by successive halving (plan.search: halving, <= 2 trainings)
    "search_of",
    "LADDER",
    "HALVING",
    "Trial",
    "Score",
    "SearchResult",
    "successive_halving",
    "first_rung",
    "most_trials",
    "rung_score",
    "validate",
    # tuned weights on disk
    "save_tuned",
    "read_tuned",
    "load_tuned_into",
    "bn_buffers",
    # data
    "prepare",
    "check_class_sizes",
    "load_dataset_info",
    "DatasetInfo",
    "make_loaders",
    "median_side",
    "scan_split",
    "Augment",
    "IMAGE_SUFFIXES",
    "DEMO_CLASSES",
    "generate_demo_defects",
    # where and how it runs
    "resolve_device",
    "init_from_env",
    "close_distributed",
    "plot_plan",
    # peft: a plan as a SHiRA adapter, a peft adapter merged into a plain model (docs/peft.md)
    "shira_plan",
    "to_peft",
    "PeftExport",
    "load_peft",
    "merge_peft",
]
