"""Find the tunable candidates of any timm model, keyed by the model's own `named_parameters()` names.

A candidate is a weight matrix (Linear weight, Conv kernel) or a vector (bias, norm weight/bias). What is NOT
a candidate is found with timm's uniform model API, never with name lists for one architecture:
  - the classification head (`model.get_classifier()`): always trained, never counted in the budget;
  - tokens and tables timm excludes from weight decay (`model.no_weight_decay()`: cls/pos tokens, relative
    position bias tables): frozen, as in SPT;
  - the stem (`model.group_matcher()["stem"]`: patch embedding, conv stem): frozen by default.
Blocks come from `timm.models.group_parameters(model, model.group_matcher())`, so "by block" reports work the
same on ViT, Swin, ConvNeXt, ResNet and EfficientNet.

Fused projections (`qkv`, `kv`: timm's naming across ViT/Swin/...) are split into equal row segments so that a
structured module can be placed on q, k or v alone, as SPT does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn
from timm.models import group_parameters

# Output-row segments of fused projections, by the module's last name component (a timm-wide convention).
FUSED_SEGMENTS = {"qkv": 3, "kv": 2}
# Normalization layers (timm's BatchNormAct2d, LayerNorm2d, ... subclass these): their affine vectors are `norm`
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Candidate:
    """One tunable parameter. `kind` is "linear" | "conv" | "vector"; `segments` are output-row ranges."""

    name: str  # base parameter name, e.g. "blocks.3.attn.qkv.weight"
    module: str  # owning module, e.g. "blocks.3.attn.qkv"
    attr: str  # attribute on the module, e.g. "weight"
    kind: str
    shape: tuple[int, ...]
    block: int  # index into the model's block list (timm group_matcher order)
    groups: int = 1  # conv groups (depthwise convs have groups == channels)
    segments: tuple[tuple[int, int], ...] = ()  # row ranges of a fused projection; () for a plain matrix
    norm: bool = False  # a normalization layer's affine weight or bias (BatchNorm, LayerNorm, GroupNorm)
    stem: bool = False  # in the stem group (a candidate only when measured with include_stem)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def depthwise(self) -> bool:
        """A depthwise conv kernel: one input channel per output channel (groups > 1, kernel (C, 1, kh, kw))."""
        return self.kind == "conv" and self.groups > 1 and len(self.shape) > 1 and self.shape[1] == 1

    @property
    def fan_in(self) -> int:
        """Entries per output row: in_features for Linear, in/groups * kh * kw for Conv, 1 for vectors."""
        return self.numel // self.shape[0] if self.kind != "vector" else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["segments"] = list(self.shape), [list(s) for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(**{**d, "shape": tuple(d["shape"]), "segments": tuple(tuple(s) for s in d["segments"])})


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classification head's parameters (trained always, outside the budget)."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    return [n for n, p in model.named_parameters() if id(p) in head_ids]


def frozen_token_names(model: nn.Module) -> set[str]:
    """Tokens/tables timm exempts from weight decay (cls/pos tokens, rel-pos tables): frozen, not candidates."""
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    names = {n for n, _ in model.named_parameters()}
    # timm returns bare names ("pos_embed") or full names ("layers.0.blocks.0.attn.relative_position_bias_table").
    return {n for n in names if n in nwd or n.rsplit(".", 1)[-1] in nwd}


def stem_names(model: nn.Module) -> set[str]:
    """Parameters in the stem group of `model.group_matcher()` (patch embedding, conv stem)."""
    matcher = model.group_matcher() if hasattr(model, "group_matcher") else {}
    pattern = matcher.get("stem") if isinstance(matcher, dict) else None
    if not pattern:
        return set()
    return {n for n, _ in model.named_parameters() if re.match(pattern, n)}


def block_index(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Map each parameter name to its block (timm group order) and name each block by its common prefix."""
    if not hasattr(model, "group_matcher"):
        names = [n for n, _ in model.named_parameters()]
        return dict.fromkeys(names, 0), ["model"]
    groups = group_parameters(model, model.group_matcher(coarse=False))
    index, labels = {}, []
    for i, names in enumerate(groups.values()):
        for n in names:
            index[n] = i
        labels.append(_common_prefix(names))
    return index, labels


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    return ".".join(prefix) or names[0].split(".")[0]


def find_candidates(model: nn.Module, *, include_stem: bool = False) -> dict[str, Candidate]:
    """All tunable candidates of `model`, in `named_parameters()` order.

    Args:
        model: a timm model (anything with `get_classifier`; `group_matcher`/`no_weight_decay` when present).
        include_stem: also tune the stem (patch embedding / conv stem); frozen by default as in SPT.
    """
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} has no get_classifier(): pass a timm model")
    excluded = set(head_parameter_names(model)) | frozen_token_names(model)
    stem = stem_names(model)
    if not include_stem:
        excluded |= stem
    blocks, _ = block_index(model)
    found: dict[str, Candidate] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if name in excluded:
                continue
            kind, groups, segments = None, 1, ()
            if isinstance(module, nn.Linear) and attr == "weight":
                kind = "linear"
                n_seg = FUSED_SEGMENTS.get(mod_name.rsplit(".", 1)[-1], 1)
                if n_seg > 1 and p.shape[0] % n_seg == 0:
                    step = p.shape[0] // n_seg
                    segments = tuple((i * step, (i + 1) * step) for i in range(n_seg))
            elif isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
                kind, groups = "conv", module.groups
            elif p.ndim == 1:
                kind = "vector"
            if kind is None:  # other tensors (e.g. custom matrices): frozen, never silently mis-tuned
                continue
            norm = kind == "vector" and isinstance(module, NORMS)
            found[name] = Candidate(name, mod_name, attr, kind, tuple(p.shape), blocks.get(name, 0), groups, segments,
                                    norm=norm, stem=name in stem)  # fmt: skip
    return found


def count_backbone_params(model: nn.Module) -> int:
    """All parameters except the head: the denominator of a budget given in percent."""
    head = set(head_parameter_names(model))
    return sum(p.numel() for n, p in model.named_parameters() if n not in head)
