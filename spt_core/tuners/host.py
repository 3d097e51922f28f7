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

Limits (each checked or documented, never silent):
  - W' exists only while the host's own forward runs. A parent that reads `self.qkv.weight` itself (timm's
    BEiT, EVA and Swin-V2 attention) would bypass it: `check_tuners_reached` finds such targets (the CLI's
    train stage runs it on one batch and refuses the plan).
  - Inside a tuned module this saved-tensor hook is the active one, so an outer hook (non-reentrant
    checkpointing, `save_on_cpu`) does not see that module's saved tensors: results stay exact, the outer
    memory saving is lost for tuned layers. Second-order gradients through W' are not supported.
  - One forward at a time per model (no DataParallel replicas, no concurrent threads on one model).
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
        self.adapters = nn.ModuleList()  # output modules, applied in order after the host's forward
        self._handles: list = []
        self._hooks_ctx: list = []

    def add(self, attr: str, tuner: nn.Module) -> None:
        """Attach `tuner` for the host's parameter `attr`: a delta (``add_to``) on it, else on the output."""
        if callable(getattr(tuner, "add_to", None)):
            if attr not in self.deltas:
                self.deltas[attr] = nn.ModuleList()
            self.deltas[attr].append(tuner)
        else:
            self.adapters.append(tuner)

    def all_tuners(self) -> list[nn.Module]:
        """Every tuner of this host: the deltas of each attribute, then the output adapters."""
        return [*(d for deltas in self.deltas.values() for d in deltas), *self.adapters]

    def effective(self, host: nn.Module, attr: str) -> torch.Tensor:
        """W' = W + Σ deltas, differentiable w.r.t. the deltas only (W is detached, frozen).

        Computed with autocast off (in the parameter's dtype), so the rebuild in backward is bit-identical.
        """
        w = host._parameters[attr].detach()
        with torch.autocast(w.device.type, enabled=False):
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


def tuned_modules(model: nn.Module) -> dict[str, TunerSet]:
    """Host modules that carry tuners, by module name."""
    return {n: m.spt for n, m in model.named_modules() if isinstance(getattr(m, "spt", None), TunerSet)}


def check_tuners_reached(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of tuner parameters that get no gradient from one forward/backward of `x` (should be empty).

    A tuner is unreachable when the model reads its host's weight from outside the host's forward. Every
    parameter's `.grad` and every module's train/eval mode are left as they were.
    """
    tuner_params = [(f"{n}.spt.{pn}", p) for n, t in tuned_modules(model).items() for pn, p in t.named_parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in grads:
            p.grad = None
        model.eval()
        model(x).float().sum().backward()
        return [n for n, p in tuner_params if p.grad is None]
    finally:
        for p, g in grads:
            p.grad = g
        for m, t in modes:
            m.training = t


def detach_tuners(host: nn.Module) -> TunerSet:
    """Remove the hooks and the `spt` child from `host`; return the TunerSet."""
    tuners: TunerSet = host.spt
    for h in tuners._handles:
        h.remove()
    for attr in tuners.deltas:
        host.__dict__.pop(attr, None)
    del host.spt
    return tuners
