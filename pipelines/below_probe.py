"""``train.below_probe``: what the pipeline does when no candidate beats the linear probe on validation.

The yardstick (``train.probe_baseline``) is the linear probe on the frozen backbone, fitted on the train split and
picked on validation by ``train.select``. The tuned model (with ``plan.budget: auto`` the rung validation chose, so
every candidate) is below it when its ``train.select`` score on validation is lower; a tie keeps the tuned model.
Only validation decides: the test split is reported, never compared.

    export_probe  (default) the probe is the model. train saves it as tuned/ (the pretrained backbone + the probe's
                  head: `spt_core.probe.head_only`'s plan), with its operating point chosen on validation and its
                  test numbers at it, as for any model; the tuned model's numbers stay in metrics.json ``tuned``.
                  merge, export and publish carry it like any model, marked ``model: probe`` (metrics.json,
                  tuned.json, merged.json, every export manifest, the MLflow run and the registered version).
    stop          nothing is exported. train writes metrics.json (``stopped``: the one line; the tuned model's
                  numbers), history.csv and confusion.png, but no tuned/ (an older one is removed). `sensitune
                  train` and `sensitune run` print ``stopped: <line>`` on stderr and exit 3 (`STOP_EXIT`), so the
                  DVC train stage fails and no stage after it runs; the Prefect flow ends "Stopped" (not promoted,
                  no alias moves). merge and export refuse a stopped run (exit 3), publish skips it.

Either way the pipeline says so in one line: the log, metrics.json ``outcome`` and the CLI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from spt_core.api import Plan, collect, head_only
from spt_core.portable.errors import SensituneError
from spt_core.portable.operating_point import OperatingPoint

from .assess import choose_operating_point
from .layout import FILES
from .models import build_model

log = logging.getLogger(__name__)
RULES = ("export_probe", "stop")
STOP_EXIT = 3  # the CLI's exit code for a run this rule stopped (2 is bad input)
# the tuned model's headline numbers, kept in metrics.json ``tuned`` when the probe replaces it
TUNED_KEYS = ("test_acc", "test_balanced_acc", "val_acc", "val_score", "val_loss", "best_epoch", "threshold",
              "escape_rate", "escape_rate_ci95", "overkill", "overkill_ci95", "trainable", "trainable_pct", "budget",
              "by_kind", "plan_hash", "gain_over_probe")  # fmt: skip


class Stopped(SensituneError):
    """A run that ``train.below_probe: stop`` ended: the CLI prints ``stopped: <line>`` and exits `STOP_EXIT`."""


class Saved(NamedTuple):
    """What the train stage saves as tuned/ (`spt_core.checkpoint.save_tuned`'s arguments)."""

    model: torch.nn.Module
    plan: Plan
    info: dict[str, Any]
    buffers: dict[str, torch.Tensor]


class ProbeModel(NamedTuple):
    """The probe as a model, measured like any: its operating point and metrics, and its validation loss."""

    model: torch.nn.Module
    op: OperatingPoint
    measured: dict[str, Any]
    val_loss: float


def outcome_line(metrics: Mapping[str, Any], below_probe: str) -> str:
    """The one line that says the tuned model is below the probe on validation, and what the rule does about it."""
    cmp = f"{metrics['select']} {metrics['val_score']:.4f} < probe {metrics['probe_val_score']:.4f}"
    head = f"no candidate beats the linear probe on validation ({cmp})"
    if below_probe == "stop":
        return (f"{head}: nothing exported (train.below_probe: stop); try more epochs, another lr or budget, or "
                "train.below_probe: export_probe")  # fmt: skip
    return f"{head}: the probe is the model (train.below_probe: export_probe); merge, export and publish carry it"


def settle(metrics: dict[str, Any], tuned: Saved, probe: Callable[[], ProbeModel], *, below_probe: str) -> Saved | None:
    """What train saves as tuned/: `tuned`, unless ``metrics["below_probe"]`` (validation only, see the module
    docstring); then the probe (``export_probe``, built by calling `probe`) or nothing (``stop``). `metrics` is
    rewritten to describe what was kept (``model``: tuned | probe | None, ``outcome``, ``stopped``)."""
    if below_probe not in RULES:
        raise SensituneError(f"train.below_probe={below_probe!r}: use one of {', '.join(RULES)}")
    metrics["model"] = "tuned"
    if not metrics.get("below_probe"):
        return tuned._replace(info={**tuned.info, "model": "tuned"})
    line = outcome_line(metrics, below_probe)
    log.warning("%s", line)
    metrics.update(outcome=line, warnings=[])  # the line replaces the warning: the kept model is not below itself
    if below_probe == "stop":
        metrics.update(model=None, stopped=line)
        return None
    p = probe()
    plan = head_only(tuned.plan)
    _as_probe(metrics, p, plan)
    return Saved(p.model, plan, {**tuned.info, **p.op.to_dict(), "model": "probe"}, {})


def _as_probe(metrics: dict[str, Any], p: ProbeModel, plan: Plan) -> None:
    """The headline numbers become the probe's (at its own operating point); the tuned model's go to ``tuned``."""
    metrics["tuned"] = {k: metrics.get(k) for k in TUNED_KEYS}
    metrics.update({k: v for k, v in p.measured.items() if k not in ("val", "test")})
    metrics.update(
        test_acc=p.measured["test"]["accuracy"], val_acc=metrics["probe_val_acc"], val_score=metrics["probe_val_score"],
        val_loss=p.val_loss, best_epoch=metrics["probe_best_epoch"], trainable=0, trainable_pct=0.0, budget=0,
        by_kind={k: 0 for k in metrics.get("by_kind", {})}, plan_hash=plan.hash(), gain_over_probe=0.0,
        test=p.measured["test"], val=p.measured["val"], model="probe",
    )  # fmt: skip


def probe_model(
    args: dict[str, Any],
    seed: int,
    head: Mapping[str, torch.Tensor],
    device: torch.device,
    loaders: Mapping[str, Any],
    class_names: list[str],
    ok_class: str | None,
    max_escape_rate: float,
) -> ProbeModel:
    """The probe as a plain model: a fresh build of the backbone (the one the probe's features came from) with the
    probe's head, its operating point chosen on validation, val and test measured at it."""
    model, _ = build_model(args, seed)
    model.get_classifier().load_state_dict(dict(head))
    model.to(device).eval()
    labels_val, probs_val, val_loss = collect(model, loaders["val"], device)
    test = collect(model, loaders["test"], device)[:2]
    op, measured = choose_operating_point((labels_val, probs_val), test, class_names, ok_class, max_escape_rate)
    return ProbeModel(model, op, measured, val_loss)


def stopped(run_dir: Path) -> str | None:
    """The one line of a run that ``train.below_probe: stop`` ended (its metrics.json ``stopped``), or None."""
    try:
        return json.loads((Path(run_dir) / FILES["metrics"]).read_text()).get("stopped")
    except (OSError, ValueError):
        return None


def refuse_if_stopped(run_dir: Path, verb: str) -> None:
    """merge and export make nothing from a stopped run (an older run's files may still lie beside its record)."""
    if (line := stopped(run_dir)) is not None:
        raise Stopped(f"nothing to {verb}: {Path(run_dir) / FILES['metrics']} says {line}")
