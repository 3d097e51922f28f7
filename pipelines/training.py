"""The train stage: train the plan (or, with ``plan.budget: auto``, every rung of the plan's ladder and keep the
one validation prefers; with ``plan.search: halving``, the rungs at a few lrs by successive halving,
`pipelines.halving`), pick the epoch and the reject threshold on validation, test the chosen model once.

Writes run/tuned/, run/metrics.json, run/history.csv and run/confusion.png (`pipelines.layout`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spt_core import __version__
from spt_core.api import (
    HALVING,
    RESUME_FREE,
    Augment,
    History,
    Plan,
    Rung,
    Sensitivity,
    TrainConfig,
    apply_plan,
    bn_buffers,
    check_tuners_reached,
    choose_rung,
    collect,
    evaluate,
    fit,
    fit_probe,
    init_from_env,
    is_ladder,
    ladder_plans,
    load_dataset_info,
    make_loaders,
    resolve_device,
    save_tuned,
    search_of,
)
from spt_core.portable.errors import PlanError, SensituneError
from spt_core.portable.io import atomic_path, write_json
from spt_core.portable.metrics import SELECTION_RULE, resolve_balance

from .assess import choose_operating_point, plot_confusion, probe_warnings
from .below_probe import ProbeModel, Saved, probe_model, settle
from .config import Params
from .halving import Splits, search_halving
from .layout import FILES
from .models import build_model, model_args

log = logging.getLogger(__name__)
# train.* keys read here (probe, loaders, the below-probe rule, the search's lr grid), not by TrainConfig
_TRAIN_EXTRA = ("head_init", "probe_baseline", "probe_epochs", "augment", "aug_flip", "aug_scale", "aug_color_jitter",
                "below_probe", "lr_grid")  # fmt: skip
_AFTER_TRAINING = ("below_probe",)  # decides what becomes of the trained model: no part of the resume key


def run_dir(params: Params) -> Path:
    return Path(params["paths"]["run"])


def data_loaders(params: Params, pre: Any, batch_size: int, seed: int, train: bool = False) -> dict:
    """Plain loaders (validation, test, the probe, sensitivity), or with ``train`` the training loader with
    train.balance's sampler and train.augment's augmentation."""
    t = params["train"]
    aug = Augment(t["aug_flip"], tuple(t["aug_scale"]), t["aug_color_jitter"]) if train and t["augment"] else None
    balance = t["balance"] if train else "none"
    return make_loaders(Path(params["paths"]["data"]), pre, batch_size=batch_size, seed=seed, balance=balance,
                        augment=aug)  # fmt: skip


_SEARCH_ONLY = ("lr_grid",)  # plan.search: halving's lr multiples: no part of the resume key (a trial's lr is)


def train_config(params: Params) -> TrainConfig:
    return TrainConfig.from_dict({k: v for k, v in params["train"].items() if k not in _TRAIN_EXTRA})


def _state_key(plan: Plan, cfg: TrainConfig, data_hash: str, extra: dict) -> str:
    """Which checkpoint a run may resume: everything that changes the numbers (not the device)."""
    numbers = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    blob = json.dumps([plan.hash(), numbers, data_hash, extra, SELECTION_RULE], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class _Setup:
    """What every rung shares: the config, data, device, the starting head, and the resume key's extras."""

    params: Params
    cfg: TrainConfig
    args: dict
    device: torch.device
    plain: dict
    loaders: dict
    head: dict[str, torch.Tensor]
    data_hash: str
    key_extra: dict
    ok_index: int | None
    max_escape: float


def _fit_plan(
    s: _Setup,
    plan: Plan,
    on_epoch: Callable[[dict], None] | None,
    with_test: bool,
    built: tuple[torch.nn.Module, torch.Tensor] | None = None,
    cfg: TrainConfig | None = None,
    until_step: int | None = None,
    state_dir: Path | None = None,
    check_reach: bool = True,
) -> tuple[Any, History]:
    """A fresh model with the shared starting head, `plan` applied, trained by `fit` (resumable per plan).

    ``built`` = (a model from `build_model` whose backbone nothing has changed, the CPU RNG state right after that
    build): that model is used instead of building another, with the RNG put back, so the numbers are the same.
    A search trial (`pipelines.halving`) gives its ``cfg`` (its lr), ``until_step`` and ``state_dir``, and checks
    that its tuners reach the output once per plan (``check_reach``).
    """
    cfg = cfg or s.cfg
    if built is None:
        model, _ = build_model(s.args, s.cfg.seed)
    else:
        model, rng = built
        torch.set_rng_state(rng)  # what a fresh build leaves: tuner init (LoRA A, adapters) draws from here
    model.get_classifier().load_state_dict(s.head)
    model.to(s.device)
    apply_plan(model, plan)
    x = next(iter(s.plain["train"]))[0][:2].to(s.device) if check_reach else None
    unreached = check_tuners_reached(model, x) if x is not None else []
    if unreached:
        raise PlanError(
            f"{len(unreached)} tuner(s) never reach the output on {s.args['name']} (e.g. {unreached[0]}): this "
            "backbone reads those weights outside their module; use plan.structured and a backbone without it"
        )
    state_dir = state_dir or run_dir(s.params) / FILES["train_state"] / _state_key(plan, cfg, s.data_hash, s.key_extra)
    loaders = s.loaders if with_test else {k: v for k, v in s.loaders.items() if k != "test"}
    history = fit(model, loaders, cfg, state_dir, on_epoch=on_epoch, ok_index=s.ok_index,
                  max_escape_rate=s.max_escape, until_step=until_step)  # fmt: skip
    return model, history


def _train_ladder(
    s: _Setup, rungs: list[tuple[str, Plan]], on_epoch: Callable[[dict], None] | None
) -> tuple[Any, History, Plan, list[dict]]:
    """Train every rung without the test split, keep the one `choose_rung` prefers, test only that one."""
    best: tuple[Rung, Any, History, Plan] | None = None
    record = []
    for label, plan in rungs:
        model, history = _fit_plan(s, plan, on_epoch, with_test=False)
        rung = Rung(label, plan.trainable, history.best_val_score, history.best_val_acc, history.best_epoch,
                    plan.hash(), history.best_val_loss)  # fmt: skip
        record.append(rung.to_dict())
        log.info("rung %s (%d values): %s %.4f on validation", label, plan.trainable, s.cfg.select, rung.val_score)
        if best is None or choose_rung([best[0], rung]) is rung:
            best = (rung, model, history, plan)
        del model
    assert best is not None  # a ladder has at least one rung (check_ladder)
    rung, model, history, plan = best
    test = evaluate(model, s.loaders["test"], s.device)
    history.test_acc, history.test_loss, history.test_metrics = test["accuracy"], test["loss"], test
    return model, history, plan, [{**r, "chosen": r["budget"] == rung.budget} for r in record]


def train_stage(params: Params, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train the plan (epoch chosen on validation by train.select, reject threshold chosen on validation for
    evaluate.max_escape_rate, test reported at both); writes tuned/, metrics.json, history.csv, confusion.png.

    With an auto plan (``plan.budget: auto``) every rung of its ladder is trained the same way and the one with
    the best validation score is kept (ties: the lower validation loss, then fewer values); only that one sees the
    test split.
    """
    run, t = run_dir(params), params["train"]
    plan = Plan.load(run / FILES["plan"])
    cfg = train_config(params)
    w = init_from_env(cfg.device)  # under torchrun: DDP over the trainable tensors, rank 0 writes
    ds_info = load_dataset_info(Path(params["paths"]["data"]))
    names, ok_class, max_escape = ds_info.class_names, ds_info.ok_class, params["evaluate"]["max_escape_rate"]
    ok_index = names.index(ok_class) if ok_class is not None else None
    if plan.meta.get("data_hash") and plan.meta["data_hash"] != ds_info.data_hash:
        log.warning("the plan was measured on another data version (%s); using it anyway", plan.meta["data_hash"])
    args = plan.meta.get("model_args") or model_args(params, len(names))
    if args["num_classes"] != len(names):
        raise SensituneError(
            f"plan was made for {args['num_classes']} classes, the data has {len(names)}: "
            "re-run `sensitune measure` and `sensitune plan`"
        )
    rungs = ladder_plans(plan, Sensitivity.load(run / FILES["sensitivity"])) if is_ladder(plan) else []
    model, info = build_model(args, cfg.seed)
    rng_after_build = torch.get_rng_state()
    info = dataclasses.replace(info, preprocess=dataclasses.replace(info.preprocess, bit_depth=ds_info.bit_depth))
    device = resolve_device(cfg.device)
    model.to(device)
    plain = data_loaders(params, info.preprocess, cfg.batch_size, cfg.seed)
    loaders = {**plain, "train": data_loaders(params, info.preprocess, cfg.batch_size, cfg.seed, train=True)["train"]}
    metrics: dict[str, Any] = {}
    probe_head = None
    if t["probe_baseline"] or t["head_init"] == "probe":
        head0 = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
        probe = fit_probe(model, plain, epochs=t["probe_epochs"], seed=cfg.seed, device=device, select=cfg.select,
                          ok_index=ok_index, max_escape_rate=max_escape)  # fmt: skip
        metrics.update(probe.to_dict())
        probe_head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()}
        if t["head_init"] == "random":
            model.get_classifier().load_state_dict(head0)
    head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()}
    extra = {k: t[k] for k in _TRAIN_EXTRA if k not in _AFTER_TRAINING + _SEARCH_ONLY}
    setup = _Setup(params, cfg, args, device, plain, loaders, head, ds_info.data_hash,
                   {**extra, **args, "esc": max_escape}, ok_index, max_escape)  # fmt: skip
    if rungs and search_of(plan) == HALVING:
        del model  # every trial starts from a fresh build
        model, history, plan, cfg, search = search_halving(
            rungs, cfg, t["lr_grid"], len(loaders["train"]),
            lambda p, c, until, d, check: _fit_plan(setup, p, on_epoch, False, cfg=c, until_step=until, state_dir=d,
                                                    check_reach=check),
            Splits(plain["val"], plain["test"], device, ok_index, max_escape), run / FILES["train_state"] / "search",
        )  # fmt: skip
        metrics.update({"search": search, "budget_chosen": search["budget_chosen"], "lr_chosen": cfg.lr})
    elif rungs:
        del model  # every rung starts from a fresh build
        model, history, plan, ladder = _train_ladder(setup, rungs, on_epoch)
        metrics.update({"ladder": ladder, "budget_chosen": next(r["budget"] for r in ladder if r["chosen"])})
    else:
        model, history = _fit_plan(setup, plan, on_epoch, with_test=True, built=(model, rng_after_build))
    val, test = collect(model, plain["val"], device)[:2], collect(model, plain["test"], device)[:2]
    op, measured = choose_operating_point(val, test, names, ok_class, max_escape)
    tuned_info = {**info.to_dict(), "model_args": args, "class_names": names, "data_hash": ds_info.data_hash,
                  "train": cfg.to_dict(), **op.to_dict()}  # fmt: skip
    buffers = {} if cfg.freeze_bn_stats else bn_buffers(model)  # trained BN statistics belong to the model then
    backbone = plan.backbone_params
    metrics.update(
        {
            "test_acc": history.test_acc,
            "val_acc": history.best_val_acc,
            "select": cfg.select,
            "val_score": history.best_val_score,
            "val_loss": history.best_val_loss,  # breaks ties of val_score (spt_core.portable.metrics.selection_key)
            "best_epoch": history.best_epoch,
            "epochs": cfg.epochs,
            "balance": cfg.balance,
            "balance_used": resolve_balance(cfg.balance, loaders["train"].dataset.labels),  # auto's answer
            "augment": t["augment"],
            **{k: v for k, v in measured.items() if k not in ("val", "test")},
            "trainable": plan.trainable,
            "trainable_pct": 100.0 * plan.trainable / backbone,
            "trainable_head": sum(p.numel() for p in model.get_classifier().parameters()),
            "backbone_params": backbone,
            "budget": plan.budget,
            "by_kind": {k: v["params"] for k, v in plan.by_kind().items()},
            "sensitivity_seconds": plan.meta.get("sensitivity_seconds"),
            "train_seconds": round(history.train_seconds, 2),
            "seconds_per_epoch": round(history.train_seconds / max(len(history.epochs), 1), 2),
            "peak_memory_mb": round(history.peak_memory_mb, 1),
            "peak_memory_kind": history.peak_memory_kind,
            "device": history.device,
            "plan_hash": plan.hash(),
            "data_hash": ds_info.data_hash,
            "model_name": args["name"],
            "input_size": args["img_size"],  # the side the model runs at (model.input_size: auto's answer)
            "sensitune_version": __version__,
            "processes": w.size,
        }
    )
    if metrics.get("probe_test_acc") is not None and history.test_acc is not None:
        metrics["gain_over_probe"] = history.test_acc - metrics["probe_test_acc"]
    metrics["warnings"] = probe_warnings(metrics) if t["probe_baseline"] else []
    metrics["below_probe"] = bool(metrics["warnings"])
    metrics["test"], metrics["val"] = measured.get("test"), measured["val"]
    kept = _settle_below_probe(setup, metrics, Saved(model, plan, tuned_info, buffers), probe_head)
    if not w.main:
        return metrics
    for msg in metrics["warnings"]:
        log.warning("warning: %s", msg)
    _save_kept(run / FILES["tuned"], kept)
    write_json(run / FILES["metrics"], metrics)
    plot_confusion(metrics["test"]["confusion"], names, run / FILES["confusion_png"],
                   f"test, {'linear probe, ' * (metrics['model'] == 'probe')}epoch {metrics['best_epoch']} "
                   f"({cfg.select} on validation)", metrics["test"].get("at_threshold"))  # fmt: skip
    _write_history(run / FILES["history"], history)
    return metrics


def _settle_below_probe(
    s: _Setup, metrics: dict[str, Any], tuned: Saved, probe_head: dict[str, torch.Tensor] | None
) -> Saved | None:
    """What tuned/ holds (`pipelines.below_probe.settle`): the tuned model, or below the probe on validation the
    probe (train.below_probe: export_probe) or nothing (stop)."""

    def probe() -> ProbeModel:
        assert probe_head is not None  # below the probe means a probe was fitted
        names, ok_class = tuned.info["class_names"], tuned.info["ok_class"]
        return probe_model(s.args, s.cfg.seed, probe_head, s.device, s.plain, names, ok_class, s.max_escape)

    return settle(metrics, tuned, probe, below_probe=s.params["train"]["below_probe"])


def _save_kept(path: Path, kept: Saved | None) -> None:
    """tuned/ = the kept model; a stopped run removes an older one, so that nothing can merge it by mistake."""
    if kept is None:
        shutil.rmtree(path, ignore_errors=True)
    else:
        save_tuned(kept.model, kept.plan, path, info=kept.info, buffers=kept.buffers)


def _write_history(path: Path, history: History) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "val_acc", "val_score", "val_loss", "seconds"])
        for e in history.epochs:
            w.writerow([e.epoch, f"{e.lr:.6g}", f"{e.train_loss:.6f}", f"{e.val_acc:.6f}", f"{e.val_score:.6f}",
                        f"{e.val_loss:.6f}", f"{e.seconds:.2f}"])  # fmt: skip
