"""Data-parallel runs under torchrun: who this process is, how the data is split, what is synchronised.

    torchrun --nproc-per-node N -m pipelines.cli measure|train ...    (or `sensitune train --nproc N`)

Nothing here changes a one-process run: every helper is the identity when no process group is initialised.
Under torchrun (``WORLD_SIZE`` > 1) `init_from_env` starts the group, NCCL on CUDA (one GPU per process,
``LOCAL_RANK``) and gloo on CPU. What each rank computes, and what crosses the wire:

  sensitivity   rank r measures whole batches r, r+N, r+2N, ... of the one seeded batch sequence
                (`shard_batches`); Σg² is then summed over ranks (`all_reduce_sum`), so the file equals a
                one-process pass over the same batches up to fp32 summation order. The probe head is fitted on
                every rank and rank 0's is broadcast (`broadcast_module`), so all ranks measure the same model.
  training      a `RankSampler`: the one-process order (the seeded shuffle, or the class-balanced sampler
                of train.balance) interleaved over ranks as `DistributedSampler` does, with ``batch_size / N``
                per rank: step k of every rank together is step k of one process with the global batch.
                `wrap_ddp` hands DDP the trainable tensors only (tuner deltas + head): frozen weights and
                (with frozen BN statistics) buffers are ignored, so nothing full-size is broadcast at start-up
                nor all-reduced per step.
  validation    disjoint shards (`ShardSampler`, no padding); the confusion matrix and loss sum are summed
                over ranks, so every rank selects the same epoch.
  writing       rank 0 alone writes (checkpoints, tuned weights, metrics, sensitivity); the others only read.
                Every write is a temp file + rename (`spt_core.portable.io`), so a killed rank 0 never leaves half a
                file; the checkpoint holds every rank's RNG state, so a resumed run replays each rank.

Exactness: one-process and N-process runs agree to fp32 rounding when the global batch divides the training
set (`RankSampler` pads the last partial batch with repeated images) and no layer draws random numbers
(dropout / drop-path draw from each rank's own generator).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from spt_core.portable.errors import SensituneError

# torch >= 2.13 renamed DDP's per-forward buffer broadcast (the ignored buffers are never synced either way)
_SYNC_ARG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (``size == 1``: a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs results."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process group's view (a one-process `World` when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (no-op without torchrun or when joined).

    NCCL when the run uses CUDA (`device` auto with a GPU, or cuda), each process on GPU ``LOCAL_RANK``; gloo
    on CPU. The rendezvous address comes from torchrun (``MASTER_ADDR``/``MASTER_PORT``).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SensituneError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s): use --nproc-per-node <= GPUs"
            )
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def _comm_device() -> torch.device:
    """Where collectives run: this process's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place, as one flat collective per dtype (no-op in a plain run)."""
    if not world().active or not tensors:
        return
    device = _comm_device()
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])  # (Σ numel,)
        dist.all_reduce(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers of `module` to every rank (a small module: the head)."""
    if not world().active:
        return
    tensors = [*module.parameters(), *module.buffers()]
    device = _comm_device()
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(device).clone()
            dist.broadcast(buf, src)
            t.copy_(buf)


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order ([obj] in a plain run)."""
    w = world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world().active:
        dist.barrier()


def close() -> None:
    """Leave the process group once every rank got here (no-op in a plain run)."""
    if world().active:
        dist.barrier()
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Images ``rank, rank + N, ...`` of a split in file order: disjoint shards, no padding (for evaluation)."""

    def __init__(self, n: int, w: World) -> None:
        if n < w.size:
            raise SensituneError(f"a split of {n} images cannot be shared by {w.size} processes: use fewer (--nproc)")
        self.indices = list(range(w.rank, n, w.size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RankSampler(Sampler[int]):
    """This rank's share of the training order a one-process run would use: the one-process sampler's indices
    (a `SeededSampler`, or the class-balanced `BalancedSampler`; anything with ``set_epoch``), padded by
    repeating the first ones to a multiple of N, then every N-th from ``rank`` — `DistributedSampler`'s
    interleaving. With per-rank batches of ``B / N``, step k of all ranks together holds exactly the images of
    one-process batch k of size ``B``. Without a seeded sampler (plain ``shuffle``), a seeded permutation."""

    def __init__(self, base: Sampler[int], w: World, seed: int = 0) -> None:
        self.base, self.w, self.seed, self.epoch = base, w, seed, 0
        self.n = len(base)
        self.per_rank = -(-self.n // w.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if callable(getattr(self.base, "set_epoch", None)):
            order = list(self.base)
        else:  # RandomSampler / SequentialSampler: DistributedSampler's own seeded shuffle
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = self.per_rank * self.w.size
        order += (order * (total // max(len(order), 1) + 1))[: total - len(order)]
        return iter(order[self.w.rank : total : self.w.size])

    def __len__(self) -> int:
        return self.per_rank


def shard_batches(sampler: Sampler[int], batch_size: int, w: World, limit: int | None = None) -> list[list[int]]:
    """This rank's whole batches (numbers rank, rank + N, ... below `limit`) of the batches `sampler` gives."""
    batches = list(BatchSampler(sampler, batch_size, drop_last=False))[:limit]
    return [b for k, b in enumerate(batches) if k % w.size == w.rank]


def shard_loaders(loaders: Mapping[str, DataLoader], seed: int, w: World | None = None) -> dict[str, DataLoader]:
    """The same datasets split over ranks: ``train`` by a `RankSampler`, the others by `ShardSampler`.

    The global batch stays the loaders' batch size: each rank loads ``batch_size / N`` images per step.
    """
    w = w or world()
    if not w.active:
        return dict(loaders)
    out = {}
    for split, loader in loaders.items():
        if loader is None:
            out[split] = None
            continue
        bs, ds = loader.batch_size, loader.dataset
        if split == "train":
            if bs % w.size:
                raise SensituneError(
                    f"train.batch_size={bs} is not divisible by {w.size} processes: make it a multiple"
                )
            sampler: Sampler[int] = RankSampler(loader.sampler, w, seed)
            bs //= w.size
        else:
            sampler = ShardSampler(len(ds), w)
        out[split] = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=loader.num_workers,
                                pin_memory=loader.pin_memory)  # fmt: skip
    return out


def wrap_ddp(model: nn.Module, *, sync_buffers: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel that sees only its trainable tensors (the model itself in a plain run).

    DDP buckets only parameters with ``requires_grad``, but at construction it would broadcast every parameter
    and buffer from rank 0 (the whole frozen backbone) and, with ``broadcast_buffers``, every buffer before each
    forward — including the sparse tuners' index buffers. Both are skipped: the frozen tensors are identical
    on every rank by construction (same weights file, same seed, same plan). With ``sync_buffers`` (BatchNorm
    statistics that train) rank 0's buffers are broadcast before every forward, as plain DDP does.
    """
    w = world()
    if not w.active:
        return model
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not sync_buffers:
        ignore += [n for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    try:
        dev = next(p for p in model.parameters() if p.requires_grad).device
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=False,  # check_tuners_reached guarantees every tuner gets a gradient
            **{_SYNC_ARG: sync_buffers},
        )
    finally:
        del model._ddp_params_and_buffers_to_ignore
    return ddp
