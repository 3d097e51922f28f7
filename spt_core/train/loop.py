"""Training: ``fit(model, loaders, cfg, out_dir) -> History`` for whatever parameters are left trainable.

The trainable set is exactly ``{name: p for name, p in model.named_parameters() if p.requires_grad}`` — the
tuner deltas and the head after ``apply_plan``, everything in full fine-tuning. The schedule is a per-step
cosine with linear warm-up (`lr_at`); AdamW never decays 1-D parameters (`make_optimizer`).

Model selection uses the validation split only: the best epoch has the highest validation score (``cfg.select``:
accuracy, balanced accuracy, or the lowest overkill under the escape ceiling, see
`spt_core.portable.operating_point.selection_score`); a tie goes to the lower validation loss, then to the earlier
epoch (`spt_core.portable.metrics.selection_key`). Its trainable state is loaded back at the end, and the test split
is evaluated once, on it. ``cfg.balance`` loss/both weighs the cross-entropy by `spt_core.data.class_weights`.

With an ``out_dir``, ``checkpoint.pt`` is rewritten after every epoch (see `spt_core.train.resume`), so a killed
run resumed with the same ``fit`` call ends bit-identical to an uninterrupted one on CPU (on CUDA, up to kernel
non-determinism). ``until_step`` pauses a run at any step, inside an epoch too, and a later call continues it the
same way: the search's rungs (`spt_core.search`).

Under torchrun (an initialised process group) the same call trains data-parallel: the loaders are split over
ranks with the global batch kept (`spt_core.distributed.shard_loaders`), the model is wrapped in DDP over its
trainable tensors only (`wrap_ddp`), validation and test are summed over ranks, and rank 0 alone writes the
checkpoint (with every rank's RNG state) and calls ``on_epoch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spt_core.checkpoint import bn_buffers
from spt_core.data.loaders import class_weights
from spt_core.device import resolve_device
from spt_core.distributed import all_reduce_sum, gather_objects, shard_loaders, world, wrap_ddp
from spt_core.evaluate import collect, evaluate, split_batch
from spt_core.portable.errors import DivergedError, SensituneError
from spt_core.portable.metrics import balanced_accuracy, selection_key
from spt_core.portable.operating_point import selection_score
from spt_core.train.config import TrainConfig
from spt_core.train.history import EpochRecord, History
from spt_core.train.resume import (
    CHECKPOINT_NAME,
    clone_state,
    copy_state,
    epoch_batches,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``.

    Linear from ``cfg.warmup_lr`` (step 0) to ``cfg.lr`` (step ``warmup``), then half a cosine from
    ``cfg.lr`` down to ``cfg.min_lr`` at the last step (``total - 1``).
    """
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters ``fit`` trains, keyed by the model's own names."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def set_trainable_head(model: nn.Module) -> list[str]:
    """Mark the classifier (``model.get_classifier()``) trainable; return its parameter names."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if not names:
        raise SensituneError(f"{type(model).__name__} has no get_classifier() with parameters: build it with timm")
    for p in head.parameters():
        p.requires_grad_(True)
    return names


def make_optimizer(
    params: Mapping[str, nn.Parameter], cfg: TrainConfig, no_decay: Iterable[str] = ()
) -> torch.optim.AdamW:
    """AdamW with two groups: weight-decayed (ndim >= 2) and not (ndim <= 1, or named in ``no_decay``)."""
    skip = set(no_decay)
    decay = [p for n, p in params.items() if p.ndim > 1 and n not in skip]
    plain = [p for n, p in params.items() if p.ndim <= 1 or n in skip]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _tracked_state(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What training changes: trainable params, plus BatchNorm running stats when they are not frozen."""
    state: dict[str, torch.Tensor] = dict(trainable_parameters(model))
    if not cfg.freeze_bn_stats:
        state.update(bn_buffers(model))
    return state


def _set_train_mode(model: nn.Module, freeze_bn_stats: bool) -> None:
    model.train()
    if freeze_bn_stats:  # eval mode = use (and keep) the pretrained running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss_process"


def _show_progress(cfg: TrainConfig) -> bool:
    tty = sys.stderr.isatty() and not os.environ.get("SENSITUNE_NO_PROGRESS")
    return cfg.progress if cfg.progress is not None else tty


def _train_epoch(
    model: nn.Module,
    batches: Iterator[Any],
    steps_per_epoch: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: contextlib.AbstractContextManager,
    cfg: TrainConfig,
    step: int,
    stop: int,
    bar: tqdm,
    weight: torch.Tensor | None = None,
    sums: tuple[float, int] = (0.0, 0),
) -> tuple[torch.Tensor, int, float, int]:
    """Train on ``batches`` from global step ``step`` until they end or step ``stop`` (a pause); ``sums`` = the loss
    sum and image count of the batches a paused epoch already trained. Returns (loss sum, images, lr of the last
    step, global step), this rank's."""
    device = next(iter(optimizer.param_groups[0]["params"])).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    loss_sum = torch.tensor(sums[0], dtype=torch.float64, device=device)  # on device: no per-step sync
    seen, lr = sums[1], cfg.lr
    for batch in batches:
        x, y = split_batch(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step, total, warmup, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with autocast:
            logits = model(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
        bar.update(1)
        if cfg.log_every and step % cfg.log_every == 0:
            log.info("step %d/%d lr %.3g loss %.4f", step, total, lr, loss_sum.item() / seen)
        if step >= stop:
            break
    return loss_sum, seen, lr, step


def validate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    select: str,
    ok_index: int | None = None,
    max_escape_rate: float = 0.005,
    amp_dtype: torch.dtype | None = None,
    sync: Callable | None = None,
) -> tuple[float, float, float]:
    """(accuracy, loss, ``select``'s score) on ``loader``: what ranks epochs and the search's candidates (evaluate's
    inference mode). Under DDP (``sync``) the all-reduced confusion gives accuracy and balanced accuracy."""
    if sync is None:
        y_val, p_val, val_loss = collect(model, loader, device, amp_dtype=amp_dtype)
        score = selection_score(y_val, p_val, select, ok_index, max_escape_rate)
        return float((p_val.argmax(1) == y_val).mean()), val_loss, score
    val = evaluate(model, loader, device, amp_dtype=amp_dtype, sync=sync)
    score = {"accuracy": val["accuracy"], "loss": -val["loss"]}.get(select)
    return val["accuracy"], val["loss"], balanced_accuracy(np.asarray(val["confusion"])) if score is None else score


def fit(
    model: nn.Module,
    loaders: Mapping[str, DataLoader],
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ok_index: int | None = None,
    max_escape_rate: float = 0.005,
    until_step: int | None = None,
) -> History:
    """Train the model's trainable parameters, select the epoch on validation, test it once.

    Args:
        model: Any module returning logits; only parameters with ``requires_grad`` are trained.
        loaders: ``"train"`` and ``"val"`` (required), ``"test"`` (optional); batches ``(images, labels, ...)``.
        cfg: Hyper-parameters.
        out_dir: Where ``checkpoint.pt`` is written after every epoch; if it already holds one, the run
            resumes from it. ``None``: no checkpoint.
        on_epoch: Called after each epoch (after its checkpoint) with the epoch record plus ``best_epoch``
            and ``best_val_acc``.
        ok_index: The good class's label (``cfg.select="overkill_at_escape"`` needs it).
        max_escape_rate: The escape ceiling of ``overkill_at_escape`` (``evaluate.max_escape_rate``).
        until_step: Pause after this optimizer step of the ``cfg.epochs`` x ``len(loaders["train"])`` schedule
            (None: the end), inside an epoch too: the checkpoint in ``out_dir`` (required) keeps the rest, so that
            calling again with a later step (or None) continues as if never paused, schedule included. A paused
            run leaves the model in its state at that step and tests nothing (the search's rungs).

    Returns:
        The History. On return the model holds the best epoch's state and each submodule its original mode.

    Raises:
        SensituneError: No trainable parameters, a missing split, an empty train loader, a non-finite
            loss, or a checkpoint in ``out_dir`` that does not match this model/config/data (or is past
            ``until_step``).
    """
    missing = [k for k in ("train", "val") if k not in loaders]
    if missing:
        raise SensituneError(f"fit() loaders lack {missing}: pass a dict with 'train', 'val' and optionally 'test'")
    w = world()
    if w.active:
        loaders = shard_loaders(loaders, getattr(loaders["train"].sampler, "seed", cfg.seed), w)
    params = trainable_parameters(model)
    if not params:
        raise SensituneError(
            "fit(): the model has no trainable parameters: apply a plan or call set_trainable_head(model) first"
        )
    steps_per_epoch = len(loaders["train"])
    if steps_per_epoch == 0:
        raise SensituneError("fit(): the train loader yields no batches: check the train split and batch size")
    total = cfg.epochs * steps_per_epoch
    stop = total if until_step is None else min(until_step, total)
    if cfg.select == "overkill_at_escape" and ok_index is None:
        raise SensituneError("train.select=overkill_at_escape needs a good class: declare data.ok_class")
    if stop < total and out_dir is None:
        raise SensituneError(f"fit(until_step={until_step}) needs an out_dir: its checkpoint keeps the rest")

    device = resolve_device(cfg.device)
    weight = None
    if cfg.balance in ("loss", "both"):
        labels = getattr(loaders["train"].dataset, "labels", None)
        if labels is None:
            raise SensituneError("train.balance=loss needs a train dataset with .labels (spt_core.data.ImageDataset)")
        n_classes = int(getattr(model, "num_classes", 0)) or max(labels) + 1
        weight = class_weights(labels, n_classes).to(device)
    model.to(device)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    no_wd = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    optimizer = make_optimizer(params, cfg, no_decay=no_wd)
    state = _tracked_state(model, cfg)
    history = History(trainable_params=sum(p.numel() for p in params.values()), device=str(device), select=cfg.select)
    best_state = clone_state(state)
    step = start_epoch = 0
    part, pause_rng = None, None  # this rank's share of a paused epoch, and the RNG at the pause

    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if ckpt_path is not None:
        if w.main:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, list(state), cfg, steps_per_epoch)
            rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
            if len(rngs) != w.size:
                raise SensituneError(
                    f"{ckpt_path}: checkpoint was written by {len(rngs)} process(es), this run has {w.size}; resume "
                    "with the same number (--nproc) or delete it to start over"
                )
            if ckpt["step"] > stop:
                raise SensituneError(f"{ckpt_path}: checkpoint is at step {ckpt['step']}, past until_step={stop}; "
                                     "delete it or use a new out dir to start over")  # fmt: skip
            copy_state(state, ckpt["state"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            best_state = clone_state(ckpt["best_state"], device)
            history = History.from_dict(ckpt["history"])
            history.device, history.resumed_at_epoch = str(device), ckpt["epoch"]
            step, start_epoch = ckpt["step"], ckpt["epoch"]
            set_rng_state(rngs[w.rank], loaders)
            part, pause_rng = (ckpt["part"][w.rank], rngs[w.rank]) if ckpt.get("part") else (None, None)
            log.info("resuming %s at step %d/%d", ckpt_path, step, total)

    net = wrap_ddp(model, sync_buffers=not cfg.freeze_bn_stats)  # `model` itself in one process
    sync = all_reduce_sum if w.active else None
    modes = [(m, m.training) for m in model.modules()]
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    bar = tqdm(
        total=total, initial=step, disable=not (w.main and _show_progress(cfg)), desc="train", dynamic_ncols=True
    )

    def save(epoch: int, parts: list | None = None) -> None:
        """The checkpoint after `epoch` whole epochs (and, paused inside the next one, every rank's `parts`)."""
        rngs = gather_objects(rng_state(loaders))  # every rank joins, rank 0 writes
        if ckpt_path is not None and w.main:
            save_checkpoint(ckpt_path, {
                "state": clone_state(state, "cpu"), "optimizer": optimizer.state_dict(), "step": step,
                "scaler": scaler.state_dict(), "epoch": epoch, "history": history.to_dict(), "cfg": cfg.to_dict(),
                "best_state": clone_state(best_state, "cpu"), "best_epoch": history.best_epoch,
                "rng": rngs if w.active else rngs[0], **({"part": parts} if parts else {}),
            })  # fmt: skip

    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if step >= stop:  # paused at the end of the previous epoch
                break
            t0 = time.perf_counter() - (part["seconds"] if part else 0.0)
            sampler = getattr(loaders["train"], "sampler", None)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch - 1)
            epoch_rng = part["epoch_rng"] if part else rng_state(loaders) if stop < total else None
            _set_train_mode(model, cfg.freeze_bn_stats)
            batches = epoch_batches(loaders["train"], part, pause_rng, loaders)
            sums = (part["loss_sum"], part["seen"]) if part else (0.0, 0)
            loss_sum, seen, lr, step = _train_epoch(
                net, batches, steps_per_epoch, optimizer, scaler, autocast, cfg, step, stop, bar, weight, sums
            )
            part = None
            if step < epoch * steps_per_epoch:  # paused inside the epoch
                done = step - (epoch - 1) * steps_per_epoch
                mine = {"batches": done, "loss_sum": loss_sum.item(), "seen": seen, "epoch_rng": epoch_rng,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
                save(epoch - 1, gather_objects(mine))
                break
            totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            all_reduce_sum([totals])  # the mean over every rank's images (a no-op in one process)
            train_loss = (totals[0] / totals[1]).item()
            if not math.isfinite(train_loss):
                raise DivergedError(
                    f"train loss became {train_loss} in epoch {epoch}: lower lr (now {cfg.lr}) or set grad_clip"
                )
            val_acc, val_loss, score = validate(model, loaders["val"], device, cfg.select, ok_index, max_escape_rate,
                                                amp_dtype, sync)  # fmt: skip
            rec = EpochRecord(epoch, lr, train_loss, val_acc, val_loss, time.perf_counter() - t0, score)
            history.epochs.append(rec)
            history.train_seconds += rec.seconds
            if selection_key(score, val_loss) > selection_key(history.best_val_score, history.best_val_loss):
                history.best_epoch, history.best_val_acc, history.best_val_score = epoch, rec.val_acc, score
                history.best_val_loss = val_loss
                best_state = clone_state(state)
            history.peak_memory_mb, history.peak_memory_kind = _peak_memory_mb(device)
            log.info(
                "epoch %d/%d lr %.3g train_loss %.4f val_acc %.4f val_%s %.4f val_loss %.4f (%.1fs)",
                epoch, cfg.epochs, lr, train_loss, rec.val_acc, cfg.select, score, rec.val_loss, rec.seconds,
            )  # fmt: skip
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{rec.val_acc:.3f}")
            save(epoch)
            if on_epoch is not None and w.main:
                on_epoch(
                    {**dataclasses.asdict(rec), "best_epoch": history.best_epoch, "best_val_acc": history.best_val_acc}
                )
    finally:
        bar.close()
        for m, training in modes:
            m.training = training

    if step == total:  # else paused: the model stays at this step, for the caller to validate
        copy_state(state, best_state)
        if loaders.get("test") is not None:
            test = evaluate(model, loaders["test"], device, amp_dtype=amp_dtype, sync=sync)
            history.test_acc, history.test_loss, history.test_metrics = test["accuracy"], test["loss"], test
    history.peak_memory_mb, history.peak_memory_kind = _peak_memory_mb(device)
    log.info("best epoch %d val_acc %.4f test_acc %s", history.best_epoch, history.best_val_acc, history.test_acc)
    return history
