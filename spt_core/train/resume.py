"""The per-epoch training checkpoint: everything a killed run needs to end bit-identical to an uninterrupted one.

``out_dir/checkpoint.pt`` holds the tracked state, optimizer, grad scaler, step, history, best state, the RNG
states (global generators and any ``torch.Generator`` attached to the loaders; under torchrun a list, one per
rank) and the config. A run paused inside an epoch (``fit(until_step=...)``) also keeps ``part``, per rank: the
batches, loss sum and images of that epoch so far and the RNG at its start (`epoch_batches` replays its order).
It is written atomically with fsync, and loaded with ``weights_only=True`` (plain types and tensors only).
Persistent DataLoader workers are not restored.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_bytes
from spt_core.portable.metrics import SELECTION_RULE
from spt_core.train.config import RESUME_FREE, TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "sensitune.train.checkpoint/1"


def clone_state(state: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of ``state`` (on ``device`` when given)."""
    return {n: t.detach().to(device).clone() if device else t.detach().clone() for n, t in state.items()}


@torch.no_grad()
def copy_state(state: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Copy ``saved[name]`` into every live tensor ``state[name]``, in place."""
    for n, t in state.items():
        t.copy_(saved[n])


def _loader_generators(loaders: Mapping[str, Any]) -> dict[str, torch.Generator]:
    """Every torch.Generator that decides a loader's order (DataLoader and sampler), keyed stably."""
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    for split in sorted(loaders):
        loader = loaders[split]
        batch_sampler = getattr(loader, "batch_sampler", None)
        for attr, owner in [
            ("loader", loader),
            ("sampler", getattr(loader, "sampler", None)),
            ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None)),
        ]:
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found[f"{split}.{attr}"] = g
    return found


def rng_state(loaders: Mapping[str, Any]) -> dict[str, Any]:
    """The state of every generator that decides the numbers: torch, CUDA, python, numpy and the loaders'."""
    # Plain types and tensors only, so the checkpoint loads with weights_only=True.
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
        "loaders": {k: g.get_state() for k, g in _loader_generators(loaders).items()},
    }


def set_rng_state(rng: Mapping[str, Any], loaders: Mapping[str, Any]) -> None:
    """Restore what `rng_state` recorded (CUDA states only on the same number of devices)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np_ = rng["numpy"]
    np.random.set_state(("MT19937", np_["keys"].numpy().astype(np.uint32), np_["pos"], *np_["gauss"]))
    for k, g in _loader_generators(loaders).items():
        if k in rng["loaders"]:
            g.set_state(rng["loaders"][k])


def epoch_batches(
    loader: Any, part: Mapping[str, Any] | None, pause_rng: Any, loaders: Mapping[str, Any]
) -> Iterator[Any]:
    """The epoch's batches; for an epoch paused after k batches (`part`), the same iterator as then (the RNG at the
    epoch's start re-seeds the loader and its workers), its first k batches drawn and dropped, and then the RNG
    of the pause: the next batch and every random draw are the uninterrupted run's."""
    if part is None:
        return iter(loader)
    set_rng_state(part["epoch_rng"], loaders)
    batches = iter(loader)
    for _ in range(part["batches"]):
        next(batches)
    set_rng_state(pause_rng, loaders)
    return batches


def save_checkpoint(path: Path, ckpt: Mapping[str, Any]) -> None:
    """Write ``ckpt`` to ``path`` atomically; the bytes are on disk before the rename, so a kill never leaves half."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "selection_rule": SELECTION_RULE, **ckpt}, buf)
    write_bytes(path, buf.getvalue(), fsync=True)


def load_checkpoint(path: Path, state_names: list[str], cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """Read ``path`` and check it belongs to this run; any mismatch is a one-line SensituneError."""
    fix = "delete it or use a new out dir to start over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise SensituneError(f"{path}: unreadable training checkpoint ({type(e).__name__}); {fix}") from e
    saved = list(ckpt["state"])
    if sorted(saved) != sorted(state_names):
        only_ckpt, only_model = sorted(set(saved) - set(state_names)), sorted(set(state_names) - set(saved))
        raise SensituneError(
            f"{path}: checkpoint trains other tensors than this model (only in checkpoint: {only_ckpt[:3]}, "
            f"only in model: {only_model[:3]}, {len(only_ckpt) + len(only_model)} differences); {fix}"
        )
    if ckpt.get("selection_rule") != SELECTION_RULE:  # its best epoch so far was ranked by another rule
        raise SensituneError(
            f"{path}: checkpoint chose its best epoch by selection rule "
            f"{ckpt.get('selection_rule', 'unrecorded (an older version)')!r}, "
            f"this version by {SELECTION_RULE!r}; {fix}"
        )
    old, new = ckpt["cfg"], cfg.to_dict()
    changed = [f"{k}={old.get(k)!r}->{new[k]!r}" for k in new if k not in RESUME_FREE and old.get(k) != new[k]]
    if changed:
        raise SensituneError(f"{path}: checkpoint was made with another train config ({', '.join(changed)}); {fix}")
    paused = ckpt["part"][0]["batches"] if ckpt.get("part") else 0  # steps into the epoch it paused in
    if ckpt["step"] != ckpt["epoch"] * steps_per_epoch + paused:
        raise SensituneError(
            f"{path}: checkpoint has {ckpt['step']} steps in {ckpt['epoch']} epochs but the train loader has "
            f"{steps_per_epoch} batches per epoch (different data?); {fix}"
        )
    return ckpt
