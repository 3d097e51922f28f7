"""The tuner contract table: each tuner kind on each layer shape it supports (Linear, the k segment of a fused qkv,
Conv, depthwise Conv, a 1-D vector), on tiny timm test models at 32 px, with a one-target plan per case.
tests/test_tuners.py runs the contract on the CPU, tests/test_gpu.py the same cases on CUDA."""

from __future__ import annotations

import timm
import torch

from spt_core.plan import Plan, Target
from spt_core.tuners import tuned_modules

RANK = 4
MODELS = {
    "linear": ("test_vit", "blocks.0.mlp.fc1.weight", None),
    "qkv": ("test_vit", "blocks.0.attn.qkv.weight", (64, 128)),  # the k segment of the fused projection
    "conv": ("test_efficientnet", "blocks.1.0.conv_exp.weight", None),
    "dwconv": ("test_efficientnet", "blocks.3.0.conv_dw.weight", None),
    "vector": ("test_vit", "blocks.0.norm1.weight", None),
}
CASES = [
    ("sparse", "linear"),
    ("sparse", "qkv"),
    ("sparse", "conv"),
    ("sparse", "dwconv"),
    ("sparse", "vector"),
    ("whole", "vector"),
    ("whole", "dwconv"),
    ("lora", "linear"),
    ("lora", "qkv"),
    ("lora", "conv"),
    ("adapter", "linear"),
    ("adapter", "qkv"),
    ("adapter", "conv"),
]


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {"img_size": 32} if "vit" in name else {}
    return timm.create_model(name, num_classes=3, **kw).eval()


def case_plan(kind: str, param: str, shape: tuple, rows) -> Plan:
    numel = torch.Size(shape).numel()
    indices = {}
    if kind == "sparse":
        count = max(3, numel // 7)
        indices[param] = torch.randperm(numel, generator=torch.Generator().manual_seed(1))[:count].sort().values
    elif kind == "whole":
        count = numel
    elif kind == "lora":
        n_rows = (rows[1] - rows[0]) if rows else shape[0]
        count = RANK * (numel // shape[0] + n_rows)
    else:
        d = (rows[1] - rows[0]) if rows else shape[0]
        count = 2 * RANK * d + RANK + d
    t = Target(param, kind, count, "x", tuple(shape), 0, rows if kind in ("lora", "adapter") else None)
    return Plan([t], indices, count, "lora", {"rank": RANK}, 10.0, 5.0, 10**6)


def tuner_case(kind: str, where: str):
    name, param, rows = MODELS[where]
    model = tiny_model(name)
    shape = tuple(dict(model.named_parameters())[param].shape)
    return name, model, case_plan(kind, param, shape, rows)


def sample_x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in tuned_modules(model).values():
            for p in t.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
