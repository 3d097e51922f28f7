"""Tuned weights: just the trained values, the plan and the head — a few hundred KB instead of a backbone.

A tuned-weights directory holds two files (their names are part of the on-disk format ``sensitune-tuned/1``)::

    <dir>/tuned.safetensors   tuner values + head, keyed by parameter name; plan indices under "plan/…"
    <dir>/tuned.json          model info (timm name, classes, weights source + sha256, preprocess),
                              plan (JSON), plan hash, sensitune version, anything extra (class names…)
Loading checks that the tuned weights fit the base model (names, shapes, class count) and fails in one line if not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .plan import Plan
from .portable.errors import PlanError
from .portable.io import umask
from .tuners import apply_plan, remove_tuners, tuner_state_dict

_INDEX_PREFIX = "plan/"
_BUFFER_PREFIX = "buffers/"


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics by buffer name (saved with the tuned weights when training updated them)."""
    return {
        f"{n}.{b}" if n else b: t
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b, t in m.named_buffers(recurse=False)
    }


def save_tuned(
    model: nn.Module,
    plan: Plan,
    path: str | Path,
    *,
    info: dict[str, Any] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the tuned values + plan + head of `model` to directory `path` (replaced atomically as a directory).

    `buffers` (e.g. `bn_buffers(model)` when BatchNorm statistics were trained) are stored and restored too.
    """
    out_dir = Path(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tuner_state_dict(model).items()}
    tensors.update({_INDEX_PREFIX + k: v.contiguous() for k, v in plan.indices.items()})
    tensors.update({_BUFFER_PREFIX + k: v.detach().cpu().contiguous() for k, v in (buffers or {}).items()})
    meta = {
        "format": "sensitune-tuned/1",
        "sensitune_version": __version__,
        "plan_hash": plan.hash(),
        "plan": plan.to_dict(),
        "info": info or {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: a service running as another user could not read it
    try:
        save_file(tensors, str(tmp / "tuned.safetensors"), metadata={"plan_hash": plan.hash()})
        (tmp / "tuned.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_tuned(path: str | Path) -> tuple[Plan, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a tuned-weights directory: (plan, trained tensors by name, metadata)."""
    path = Path(path)
    st, js = path / "tuned.safetensors", path / "tuned.json"
    for f in (st, js):
        if not f.is_file():
            raise PlanError(f"{f}: tuned-weights file not found; point to the directory `sensitune train` wrote")
    try:
        meta = json.loads(js.read_text())
        tensors = load_file(str(st))
    except (json.JSONDecodeError, SafetensorError, OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: corrupt tuned weights ({type(e).__name__}); re-run `sensitune train`") from e
    if meta.get("format") != "sensitune-tuned/1" or "plan" not in meta:
        raise PlanError(f"{js}: not sensitune tuned weights (format {meta.get('format')!r})")
    indices = {k[len(_INDEX_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_INDEX_PREFIX)}
    values = {k: v for k, v in tensors.items() if not k.startswith(_INDEX_PREFIX)}
    try:
        plan = Plan.from_dict(meta["plan"], indices)
    except (KeyError, TypeError) as e:
        raise PlanError(f"{js}: damaged plan in the tuned weights ({e}); re-run `sensitune train`") from e
    if plan.hash() != meta.get("plan_hash"):
        raise PlanError(f"{path}: plan hash mismatch between tuned.json and tuned.safetensors; files mixed up")
    return plan, values, meta


def load_tuned_into(model: nn.Module, path: str | Path, *, model_name: str | None = None) -> nn.Module:
    """Apply the tuned weights at `path` to a fresh base `model` (in place) and load their values.

    Args:
        model: the base model, created with the same timm name, weights and class count.
        path: tuned-weights directory (written by `save_tuned`).
        model_name: the timm name `model` was created with; checked against the tuned weights' record.
    """
    plan, values, meta = read_tuned(path)
    want = meta.get("info", {}).get("model_name")
    if model_name and want and model_name != want:
        raise PlanError(f"{path}: tuned weights were trained on {want!r}, not {model_name!r}; create that backbone")
    buffers = {k[len(_BUFFER_PREFIX) :]: values.pop(k) for k in [k for k in values if k.startswith(_BUFFER_PREFIX)]}
    own_buffers = dict(model.named_buffers())
    bad = [k for k, v in buffers.items() if k not in own_buffers or own_buffers[k].shape != v.shape]
    if bad:
        raise PlanError(f"{path}: tuned-weights buffers do not fit this model (e.g. {bad[0]}); wrong backbone?")
    apply_plan(model, plan)
    try:
        own = dict(model.named_parameters())
        expected = set(tuner_state_dict(model))
        if set(values) != expected:
            missing, extra = sorted(expected - set(values))[:3], sorted(set(values) - expected)[:3]
            raise PlanError(f"{path}: tuned weights do not fit this model (missing {missing}, unexpected {extra})")
        for n, v in values.items():
            if own[n].shape != v.shape:
                raise PlanError(
                    f"{path}: {n} has shape {tuple(v.shape)} in the tuned weights but {tuple(own[n].shape)} in the "
                    "model (different class count or backbone?)"
                )
    except PlanError:
        remove_tuners(model)  # leave the caller's model as it came
        raise
    with torch.no_grad():
        for n, v in values.items():
            own[n].copy_(v)
        for n, v in buffers.items():
            own_buffers[n].copy_(v)
    return model
