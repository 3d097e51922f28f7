"""Attach deltas and adapters to a module without renaming anything.

The host module keeps its own parameters (`blocks.0.attn.qkv.weight` stays that name and stays frozen); its
tuners live in a child `spt` (`blocks.0.attn.qkv.spt.deltas.weight.0.values`). Around each forward:

  pre-hook:  for every tuned attribute, W' = W.detach() + Σ deltas is put in the instance `__dict__`, which
             Python finds before `Module.__getattr__` reaches `_parameters` — so the module's own forward
             (Linear, any Conv, norm layers, timm's custom layers) runs unchanged on W';
  post-hook: the override is removed and adapters are applied to the output (`always_call`, so an exception
             never leaves a module patched).

Memory: an op that uses W' saves it for backward (to compute its input gradient). Keeping those copies alive is
why SPT's official sparse layers train with more memory than full fine-tuning. Here a saved-tensor hook stores
a recipe instead of W' and rebuilds W' when backward needs it, so at most one layer's W' exists at a time.
Under autocast W' is cast once to the autocast dtype, so the op's saved cast is W' itself and is also rebuilt.
Forward values must not change between forward and backward (true for any optimizer step after backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class TunerSet(nn.Module):
    """The tuners of one host module: weight deltas per attribute, and output adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()  # attr -> ModuleList of deltas with .add_to(w)
        self.adapters = nn.ModuleList()
        self._handles: list = []
        self._hooks_ctx: list = []

    def effective(self, host: nn.Module, attr: str) -> torch.Tensor:
        """W' = W + Σ deltas, differentiable w.r.t. the deltas only (W is detached, frozen)."""
        w = host._parameters[attr].detach()
        for delta in self.deltas[attr]:
            w = delta.add_to(w)
        return w


class _Rebuild:
    """What a saved-tensor hook stores instead of W': enough to rebuild it exactly."""

    __slots__ = ("host", "attr", "dtype", "size", "stride", "offset")

    def __init__(self, host: nn.Module, attr: str, t: torch.Tensor) -> None:
        self.host, self.attr, self.dtype = host, attr, t.dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            w = self.host.spt.effective(self.host, self.attr).to(self.dtype)
        return w.as_strided(self.size, self.stride, self.offset)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    dev = t.device.type
    if t.is_floating_point() and t.ndim > 1 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _pre_hook(host: nn.Module, args: tuple) -> None:
    tuners: TunerSet = host.spt
    live: dict[int, str] = {}
    for attr in tuners.deltas:
        w = tuners.effective(host, attr)
        dt = _autocast_dtype(w)
        if dt is not None:
            w = w.to(dt)
        host.__dict__[attr] = w
        live[w.untyped_storage().data_ptr()] = attr
    if torch.is_grad_enabled() and any(p.requires_grad for p in tuners.deltas.parameters()):
        ctx = torch.autograd.graph.saved_tensors_hooks(_make_pack(host, live), _unpack)
        ctx.__enter__()
        tuners._hooks_ctx.append(ctx)
    else:
        tuners._hooks_ctx.append(None)


def _make_pack(host: nn.Module, live: dict[int, str]) -> Callable:
    def pack(t: torch.Tensor):
        attr = live.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        return _Rebuild(host, attr, t) if attr is not None else t

    return pack


def _unpack(obj):
    return obj() if isinstance(obj, _Rebuild) else obj


def _post_hook(host: nn.Module, args: tuple, output):
    tuners: TunerSet = host.spt
    for attr in tuners.deltas:
        host.__dict__.pop(attr, None)
    ctx = tuners._hooks_ctx.pop() if tuners._hooks_ctx else None
    if ctx is not None:
        ctx.__exit__(None, None, None)
    for adapter in tuners.adapters:
        output = adapter(output)
    return output


def tuner_set(host: nn.Module) -> TunerSet:
    """The host's TunerSet, created (and the hooks registered) on first use."""
    if not isinstance(getattr(host, "spt", None), TunerSet):
        if "spt" in host._modules or "spt" in host._parameters:
            raise ValueError(f"{type(host).__name__} already has an attribute 'spt'; cannot attach tuners")
        host.spt = TunerSet()
        host.spt._handles = [
            host.register_forward_pre_hook(_pre_hook),
            host.register_forward_hook(_post_hook, always_call=True),
        ]
    return host.spt


def detach_tuners(host: nn.Module) -> TunerSet:
    """Remove the hooks and the `spt` child from `host`; return the TunerSet."""
    tuners: TunerSet = host.spt
    for h in tuners._handles:
        h.remove()
    for attr in tuners.deltas:
        host.__dict__.pop(attr, None)
    del host.spt
    return tuners
