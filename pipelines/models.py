"""Building and loading the models the stages pass on: the base with a seeded head, the tuned model, the merged one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from spt_core.api import (
    ModelInfo,
    check_input_side,
    create_model,
    input_grid,
    input_size_for,
    load_tuned_into,
    median_side,
    read_tuned,
)
from spt_core.portable.errors import ModelError, one_line

from .config import Params


def model_args(params: Params, num_classes: int) -> dict[str, Any]:
    """`spt_core.model.create_model`'s arguments from the model section (recorded in every artifact, so later
    stages and the edge read the side ``input_size: auto`` resolved to, from the prepared training images)."""
    m = params["model"]
    size = m["input_size"]
    if size == "auto":  # on the model's grid: a ViT's patch (every pixel reaches a patch), a CNN's stride
        size = input_size_for(median_side(Path(params["paths"]["data"])), input_grid(m["name"]))
    check_input_side(m["name"], size)  # a side given by hand: refused where a ViT would crop it
    return {
        "name": m["name"],
        "num_classes": num_classes,
        "weights": str(m["weights"]),
        "img_size": size,  # timm's name for the network's input side
        "drop_path_rate": m["drop_path_rate"],
    }


def build_model(args: dict[str, Any], seed: int = 0) -> tuple[torch.nn.Module, ModelInfo]:
    """The backbone with a seeded new head (see `spt_core.model.init_new_head`), from recorded model arguments."""
    torch.manual_seed(seed)
    return create_model(**args)


def load_tuned(tuned_dir: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The base model with the tuned weights applied, and their info."""
    _, _, meta = read_tuned(tuned_dir)
    info = {**meta["info"], "plan_hash": meta["plan_hash"]}
    # the same seed as at training time, so a randomly initialised base (weights: none) is the same base
    model, built = build_model(info["model_args"], info.get("train", {}).get("seed", 0))
    if info.get("weights_sha256") and built.weights_sha256 != info["weights_sha256"]:
        raise ModelError(
            f"{tuned_dir}: the base weights changed since training (sha256 {built.weights_sha256} != "
            f"{info['weights_sha256']}); restore the original file given to model.weights"
        )
    load_tuned_into(model, tuned_dir, model_name=info["model_args"]["name"])
    return model.to(device).eval(), info


def load_merged(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A merged model file -> (plain timm model, info). Weights come from the file, not from the hub."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: merged model not found; run `sensitune merge` first")
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["sensitune"])
        state = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelError(f"{path}: not a sensitune merged model ({type(e).__name__}); re-run `sensitune merge`") from e
    args = {**info["model_args"], "weights": "none"}
    model, _ = create_model(**args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit {args['name']} ({one_line(e)})") from e
    return model.to(device).eval(), info


def load_any(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tuned-weights directory or a merged .safetensors file."""
    path = Path(path)
    return load_tuned(path, device) if path.is_dir() else load_merged(path, device)
