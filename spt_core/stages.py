"""The workflow, one function per stage. The CLI verbs, the DVC stages and the Prefect tasks all call these.

Each stage reads the files the previous one wrote (in `paths.run`) and writes its own, atomically:

    demo      paths.raw/<class>/b{batch}_*.png        synthetic defects on real textures (the embedded default)
    prepare   paths.data/{train,val,test}/, dataset.json
    measure   run/sensitivity.safetensors             (head fitted by a linear probe first, or random as SPT)
    plan      run/plan.json + plan.safetensors, run/plan.png (sensitivity and allocation maps)
    train     run/adapter/, run/metrics.json, run/history.csv
    evaluate  run/eval.json
    merge     run/merged.safetensors + merged.json
    export    run/export/ (ONNX + OpenVINO FP32/FP16/INT8 + manifests + report)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from . import __version__
from .allocate import allocate
from .checkpoint import bn_buffers, load_adapter, read_adapter, save_adapter
from .data import (
    ImageDataset,
    SeededSampler,
    eval_transform,
    load_dataset_info,
    make_loaders,
    prepare,
    scan_split,
)
from .demo import generate_demo_defects
from .errors import DataError, ModelError, PlanError, SensituneError
from .evaluate import evaluate, predict, write_predictions_csv
from .io import atomic_path, write_json
from .merge import merge
from .model import ModelInfo, create_model
from .plan import Plan
from .probe import fit_probe
from .sensitivity import Sensitivity, measure_sensitivity
from .train import RESUME_FREE, TrainConfig, fit
from .tuners import apply_plan, check_tuners_reached

log = logging.getLogger(__name__)

FILES = {
    "sensitivity": "sensitivity.safetensors",
    "plan": "plan.json",
    "plan_png": "plan.png",
    "adapter": "adapter",
    "metrics": "metrics.json",
    "history": "history.csv",
    "eval": "eval.json",
    "merged": "merged.safetensors",
    "merged_info": "merged.json",
    "export": "export",
    "train_state": "train_state",
}
_TRAIN_EXTRA = ("head_init", "probe_baseline", "probe_epochs")


def run_dir(params: dict) -> Path:
    return Path(params["paths"]["run"])


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SensituneError(f"device={name!r} but CUDA is not available here; use device: auto or cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------- data
def demo(params: dict) -> Path:
    """Write one batch of demo defect images into paths.raw (new batches simulate new data arriving)."""
    d = params["demo"]
    out = Path(params["paths"]["raw"])
    return generate_demo_defects(out, n_per_class=d["n_per_class"], seed=d["seed"], batch=d["batch"], size=d["size"])


def prepare_data(params: dict) -> dict:
    """Split the source into train/val/test under paths.data (class-balanced, seeded)."""
    d = params["data"]
    source = str(params["paths"]["raw"]) if d["source"] == "raw" else str(d["source"])
    if d["source"] == "raw" and not Path(source).is_dir():
        raise DataError(f"paths.raw={source} does not exist: run `sensitune demo` or set data.source to your images")
    info = prepare(
        source,
        Path(params["paths"]["data"]),
        n_train=d["n_train"],
        n_val=d["n_val"],
        n_test=d["n_test"],
        seed=d["seed"],
        skip_bad=d["skip_bad"],
        image_size=d["image_size"],
    )
    return info.to_dict()


# ------------------------------------------------------------------------------------------------ model
def model_args(params: dict, num_classes: int) -> dict:
    m = params["model"]
    return {
        "name": m["name"],
        "num_classes": num_classes,
        "weights": str(m["weights"]),
        "img_size": m["img_size"],
        "drop_path_rate": m["drop_path_rate"],
    }


def build_model(args: dict, seed: int = 0) -> tuple[torch.nn.Module, ModelInfo]:
    """The backbone with a seeded new head (see `model.init_new_head`), from recorded model arguments."""
    torch.manual_seed(seed)
    return create_model(**args)


def _loaders(params: dict, pre: Any, batch_size: int, seed: int) -> dict[str, DataLoader]:
    return make_loaders(Path(params["paths"]["data"]), pre, batch_size=batch_size, seed=seed)


# ---------------------------------------------------------------------------------------------- measure
def measure(params: dict) -> Sensitivity:
    """Sensitivity of every candidate, measured on the training split; writes run/sensitivity.safetensors."""
    s_cfg, data_dir = params["sensitivity"], Path(params["paths"]["data"])
    if s_cfg["head"] not in ("random", "probe"):
        raise SensituneError(f"sensitivity.head={s_cfg['head']!r}: use 'random' (SPT) or 'probe'")
    ds_info = load_dataset_info(data_dir)
    args = model_args(params, len(ds_info.class_names))
    seed = params["train"]["seed"]
    model, info = build_model(args, seed)
    device = device_of(s_cfg["device"])
    model.to(device)
    probe = {}
    if s_cfg["head"] == "probe":  # GPS's critique: a random head makes the gradients arbitrary
        loaders = _loaders(params, info.preprocess, s_cfg["batch_size"], seed)
        probe = fit_probe(model, loaders, epochs=s_cfg["probe_epochs"], seed=seed, device=device).to_dict()
    ds = ImageDataset(scan_split(data_dir / "train", ds_info.class_names), eval_transform(info.preprocess))
    # A fixed shuffle: prepared splits are stored class by class, and one-class batches give skewed gradients.
    loader = DataLoader(ds, batch_size=s_cfg["batch_size"], sampler=SeededSampler(len(ds), seed))
    sens = measure_sensitivity(model, loader, batches=s_cfg["batches"], device=device)
    sens.meta.update(
        {
            "model_args": args,
            "model_info": info.to_dict(),
            "class_names": ds_info.class_names,
            "data_hash": ds_info.data_hash,
            "head": s_cfg["head"],
            **probe,
        }
    )
    sens.save(run_dir(params) / FILES["sensitivity"])
    return sens


# ------------------------------------------------------------------------------------------------- plan
def make_plan(params: dict) -> Plan:
    """Allocate the budget; writes run/plan.json, plan.safetensors and plan.png."""
    p = params["plan"]
    sens = Sensitivity.load(run_dir(params) / FILES["sensitivity"])
    plan = allocate(sens, p["budget"], structured=p["structured"], rank=p["rank"], alpha=p["alpha"], beta=p["beta"])
    keep = ("model_args", "model_info", "class_names", "data_hash", "head", "seconds")
    plan.meta.update({k: sens.meta[k] for k in keep if k in sens.meta})
    plan.meta["sensitivity_seconds"] = sens.meta.get("seconds")
    plan.save(run_dir(params) / FILES["plan"])
    try:
        from .report import plot_plan

        plot_plan(sens, plan, run_dir(params) / FILES["plan_png"])
    except ImportError:  # matplotlib missing: the plan itself is what matters
        log.warning("matplotlib not installed: skipping plan.png")
    return plan


# ------------------------------------------------------------------------------------------------ train
def train_config(params: dict) -> TrainConfig:
    t = {k: v for k, v in params["train"].items() if k not in _TRAIN_EXTRA}
    return TrainConfig.from_dict(t)


def _state_key(plan: Plan, cfg: TrainConfig, data_hash: str, extra: dict) -> str:
    """Which checkpoint a run may resume: everything that changes the numbers (not the device)."""
    numbers = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    blob = json.dumps([plan.hash(), numbers, data_hash, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train(params: dict, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train the plan (validation-selected epoch, test reported for it); writes adapter/, metrics.json."""
    run = run_dir(params)
    plan = Plan.load(run / FILES["plan"])
    t = params["train"]
    if t["head_init"] not in ("random", "probe"):
        raise SensituneError(f"train.head_init={t['head_init']!r}: use 'random' or 'probe'")
    cfg = train_config(params)
    ds_info = load_dataset_info(Path(params["paths"]["data"]))
    if plan.meta.get("data_hash") and plan.meta["data_hash"] != ds_info.data_hash:
        log.warning("the plan was measured on another data version (%s); using it anyway", plan.meta["data_hash"])
    args = plan.meta.get("model_args") or model_args(params, len(ds_info.class_names))
    if args["num_classes"] != len(ds_info.class_names):
        raise SensituneError(
            f"plan was made for {args['num_classes']} classes, the data has {len(ds_info.class_names)}: "
            "re-run `sensitune measure` and `sensitune plan`"
        )
    model, info = build_model(args, cfg.seed)
    device = device_of(cfg.device)
    model.to(device)
    loaders = _loaders(params, info.preprocess, cfg.batch_size, cfg.seed)
    metrics: dict[str, Any] = {}
    if t["probe_baseline"] or t["head_init"] == "probe":
        head0 = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
        metrics.update(fit_probe(model, loaders, epochs=t["probe_epochs"], seed=cfg.seed, device=device).to_dict())
        if t["head_init"] == "random":
            model.get_classifier().load_state_dict(head0)
    apply_plan(model, plan)
    unreached = check_tuners_reached(model, next(iter(loaders["train"]))[0][:2].to(device))
    if unreached:
        raise PlanError(
            f"{len(unreached)} tuner(s) never reach the output on {args['name']} (e.g. {unreached[0]}): this "
            "backbone reads those weights outside their module; use plan.structured and a backbone without it"
        )
    extra = {k: t[k] for k in _TRAIN_EXTRA}
    state_dir = run / FILES["train_state"] / _state_key(plan, cfg, ds_info.data_hash, {**extra, **args})
    history = fit(model, loaders, cfg, state_dir, on_epoch=on_epoch)
    adapter_info = {
        **info.to_dict(),
        "model_args": args,
        "class_names": ds_info.class_names,
        "data_hash": ds_info.data_hash,
        "train": cfg.to_dict(),
    }
    # BatchNorm statistics are part of the trained model when they were not frozen
    buffers = {} if cfg.freeze_bn_stats else bn_buffers(model)
    save_adapter(model, plan, run / FILES["adapter"], info=adapter_info, buffers=buffers)
    backbone = plan.backbone_params
    metrics.update(
        {
            "test_acc": history.test_acc,
            "val_acc": history.best_val_acc,
            "best_epoch": history.best_epoch,
            "epochs": cfg.epochs,
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
            "sensitune_version": __version__,
        }
    )
    if metrics.get("probe_test_acc") is not None and history.test_acc is not None:
        metrics["gain_over_probe"] = history.test_acc - metrics["probe_test_acc"]
    write_json(run / FILES["metrics"], metrics)
    with atomic_path(run / FILES["history"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "val_acc", "val_loss", "seconds"])
        for e in history.epochs:
            w.writerow(
                [
                    e.epoch,
                    f"{e.lr:.6g}",
                    f"{e.train_loss:.6f}",
                    f"{e.val_acc:.6f}",
                    f"{e.val_loss:.6f}",
                    f"{e.seconds:.2f}",
                ]
            )
    return metrics


# -------------------------------------------------------------------------------------- load / evaluate
def load_tuned(adapter_dir: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The base model with the adapter applied, and the adapter's info."""
    _, _, meta = read_adapter(adapter_dir)
    info = {**meta["info"], "plan_hash": meta["plan_hash"]}
    # the same seed as at training time, so a randomly initialised base (weights: none) is the same base
    model, built = build_model(info["model_args"], info.get("train", {}).get("seed", 0))
    if info.get("weights_sha256") and built.weights_sha256 != info["weights_sha256"]:
        raise ModelError(
            f"{adapter_dir}: the base weights changed since training (sha256 {built.weights_sha256} != "
            f"{info['weights_sha256']}); restore the original file given to --weights"
        )
    load_adapter(model, adapter_dir, model_name=info["model_args"]["name"])
    return model.to(device).eval(), info


def load_merged(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A merged model file -> (plain timm model, info). Weights come from the file, not from the hub."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: merged model not found; run `sensitune merge` first")
    try:
        from safetensors import safe_open

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
        raise ModelError(f"{path}: weights do not fit {args['name']} ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), info


def load_any(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """An adapter directory or a merged .safetensors file."""
    path = Path(path)
    return load_tuned(path, device) if path.is_dir() else load_merged(path, device)


def evaluate_stage(params: dict, model_path: Path | None = None, split: str = "test") -> dict:
    """Accuracy, per-class recall and confusion matrix of the adapter (or a merged model) on a split."""
    run = run_dir(params)
    model, info = load_any(model_path or run / FILES["adapter"])
    ds_info = load_dataset_info(Path(params["paths"]["data"]))
    if ds_info.class_names != info["class_names"]:
        raise DataError(f"model classes {info['class_names']} differ from the data's {ds_info.class_names}")
    loader = _loaders(params, ModelInfo.from_dict(info).preprocess, 64, 0)[split]
    result = {"split": split, **evaluate(model, loader, num_classes=len(ds_info.class_names))}
    result["class_names"] = ds_info.class_names
    write_json(run / FILES["eval"], result)
    return result


# ------------------------------------------------------------------------------------------------ merge
def merge_stage(params: dict, check_images: int = 16) -> dict:
    """Fold the adapter into the backbone; checks merged == unmerged on validation images."""
    run = run_dir(params)
    model, info = load_tuned(run / FILES["adapter"])
    pre = ModelInfo.from_dict(info).preprocess
    val = _loaders(params, pre, check_images, 0)["val"]
    x = next(iter(val))[0]
    with torch.inference_mode():
        before = model(x)
    merge(model)
    with torch.inference_mode():
        diff = float((model(x) - before).abs().max())
    if diff > 1e-4:
        raise SensituneError(f"merged model differs from the tuned one by {diff:.2e} on val images; report a bug")
    record = {**info, "merge_max_abs_diff": diff, "sensitune_version": __version__}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run / FILES["merged"]) as tmp:
        save_file(state, str(tmp), metadata={"sensitune": json.dumps(record)})
    write_json(run / FILES["merged_info"], record)
    return record


# ---------------------------------------------------------------------------------------------- predict
def predict_stage(model_path: Path, inputs: list[Path], out_csv: Path, batch_size: int = 64) -> Path:
    """Images (files or folders, searched recursively) -> CSV of predictions."""
    from .data import IMAGE_SUFFIXES

    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory; pass image files or folders")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, inputs))}")
    model, info = load_any(model_path)
    ds = ImageDataset([(f, 0) for f in files], eval_transform(ModelInfo.from_dict(info).preprocess))
    preds, probs = predict(model, DataLoader(ds, batch_size=batch_size))
    return write_predictions_csv(files, preds, probs, info["class_names"], out_csv)


# ----------------------------------------------------------------------------------------------- export
def export_stage(params: dict) -> dict:
    """ONNX + OpenVINO FP32/FP16/INT8 of the merged model, with manifests, parity and accuracy checks."""
    from deploy.export import export_all  # the torch side of the edge; imported only here

    run, e = run_dir(params), params["export"]
    model, info = load_merged(run / FILES["merged"])
    pre = ModelInfo.from_dict(info).preprocess
    data_dir = Path(params["paths"]["data"])
    ds_info = load_dataset_info(data_dir)
    train_files = [p for p, _ in scan_split(data_dir / "train", ds_info.class_names)]
    g = torch.Generator().manual_seed(0)
    calib = [train_files[i] for i in torch.randperm(len(train_files), generator=g)[: e["calibration_size"]].tolist()]
    test = scan_split(data_dir / "test", ds_info.class_names)
    version = e["model_version"] if e["model_version"] != "auto" else info["plan_hash"]
    report = export_all(
        model,
        pre,
        ds_info.class_names,
        run / FILES["export"],
        calibration_images=calib,
        eval_images=[p for p, _ in test],
        eval_labels=[y for _, y in test],
        model_name=info["model_args"]["name"],
        model_version=str(version),
        plan_hash=info["plan_hash"],
        data_version=ds_info.data_hash,
        precisions=tuple(e["precisions"]),
        calibration_size=e["calibration_size"],
        int8_max_drop=e["int8_max_drop"],
        opset=e["opset"],
    )
    if not report.get("passed", False):
        raise SensituneError(
            f"export parity check failed (see {run / FILES['export'] / 'export_report.json'}); the artifacts are "
            "kept for inspection but must not be deployed"
        )
    return report
