"""The workflow: one function per stage, and THE stage order that the CLI's `run`, the Prefect flow and dvc.yaml use.

Each stage reads the files the previous one wrote (`pipelines.layout`) and writes its own, atomically:

    prepare   paths.data/{train,val,test}/, dataset.json
    measure   run/sensitivity.safetensors             (head fitted by a linear probe first, or random as SPT)
    plan      run/plan.json + plan.safetensors, run/plan.png (sensitivity and allocation maps)
    train     run/tuned/, run/metrics.json, run/history.csv, run/confusion.png (threshold chosen on validation)
    evaluate  run/eval.json
    merge     run/merged/ (model.safetensors + merged.json)
    export    run/export/ (ONNX + OpenVINO FP32/FP16/INT8 + manifests + report)
    track     run/mlflow_run.json, run/published/ (MLflow run, the model registered once, the export sealed)

A plan whose tuners cannot be folded into a plain model (adapters are nonlinear) skips merge and export: both
stages then write a record that says so instead of a model, so every path (CLI, DVC, Prefect) treats it alike
and evaluate and track still run.

When no candidate beats the linear probe on validation (`pipelines.below_probe`), train.below_probe decides: with
export_probe train keeps the probe as the model and the later stages carry it (``model: probe``); with stop train
keeps no model, says ``stopped`` in metrics.json, and merge and export refuse the run (`below_probe.Stopped`).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from spt_core import __version__
from spt_core.api import (
    DEMO_CLASSES,
    ModelInfo,
    Plan,
    Sensitivity,
    collect,
    evaluate,
    generate_demo_defects,
    init_from_env,
    load_dataset_info,
    measure_task,
    merge,
    plan_budget,
    plan_is_mergeable,
    plot_plan,
    prepare,
    read_tuned,
    resolve_device,
    scan_split,
)
from spt_core.portable.errors import DataError, SensituneError
from spt_core.portable.io import atomic_path, umask, write_json
from spt_core.portable.operating_point import OperatingPoint

from .below_probe import refuse_if_stopped
from .config import SECTIONS, Params
from .layout import FILES
from .models import build_model, load_any, load_merged, load_tuned, model_args
from .track import track_stage
from .training import _TRAIN_EXTRA, run_dir, train_config, train_stage  # noqa: F401  (stages.* is the API)
from .training import data_loaders as _loaders

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- data
def demo_stage(params: Params) -> Path:
    """Write one batch of demo defect images into paths.raw (new batches simulate new data arriving)."""
    d = params["demo"]
    out = Path(params["paths"]["raw"])
    counts = dict(zip(DEMO_CLASSES, d["counts"])) if d["counts"] is not None else None
    return generate_demo_defects(out, n_per_class=d["n_per_class"], seed=d["seed"], batch=d["batch"], size=d["size"],
                                 counts=counts, bit_depth=d["bit_depth"])  # fmt: skip


def prepare_stage(params: Params) -> dict:
    """Split the source into train/val/test under paths.data (proportional per class, or by counts; seeded)."""
    d = params["data"]
    source = str(params["paths"]["raw"]) if d["source"] == "raw" else str(d["source"])
    if d["source"] == "raw" and not Path(source).is_dir():
        raise DataError(f"paths.raw={source} does not exist: run `sensitune demo` or set data.source to your images")
    info = prepare(source, Path(params["paths"]["data"]), n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"],
                   seed=d["seed"], skip_bad=d["skip_bad"], image_size=d["file_size"], split=d["split"],
                   min_per_class=d["min_per_class"], ok_class=d["ok_class"], bit_depth=d["bit_depth"])  # fmt: skip
    return info.to_dict()


# ---------------------------------------------------------------------------------------------- measure
def measure_stage(params: Params) -> Sensitivity:
    """Sensitivity of every candidate, measured on the training split; writes run/sensitivity.safetensors."""
    s_cfg, data_dir = params["sensitivity"], Path(params["paths"]["data"])
    w = init_from_env(s_cfg["device"])  # under torchrun: each rank measures its share of the batches
    ds_info = load_dataset_info(data_dir)
    args = model_args(params, len(ds_info.class_names))
    seed = params["train"]["seed"]
    model, info = build_model(args, seed)
    device = resolve_device(s_cfg["device"])
    model.to(device)
    loaders = _loaders(params, info.preprocess, s_cfg["batch_size"], seed)
    sens = measure_task(
        model, loaders["train"].dataset, loaders, head=s_cfg["head"], probe_epochs=s_cfg["probe_epochs"],
        batches=s_cfg["batches"], batch_size=s_cfg["batch_size"], seed=seed, device=device, amp=s_cfg["amp"],
        include_stem=s_cfg["include_stem"],
    )  # fmt: skip
    sens.meta.update(
        {
            "model_args": args,
            "model_info": info.to_dict(),
            "class_names": ds_info.class_names,
            "ok_class": ds_info.ok_class,
            "data_hash": ds_info.data_hash,
        }  # fmt: skip
    )
    if w.main:  # rank 0 alone writes
        sens.save(run_dir(params) / FILES["sensitivity"])
    return sens


# ------------------------------------------------------------------------------------------------- plan
def plan_stage(params: Params) -> Plan:
    """Allocate the budget; writes run/plan.json, plan.safetensors and plan.png.

    ``plan.budget: auto``: every budget of ``plan.ladder`` is allocated from the same scores; plan.json holds the
    smallest and records the ladder (budget, hash, count of each rung) for the train stage, which trains them all
    (plan.search: ladder) or searches them by successive halving (halving).
    """
    p = params["plan"]
    sens = Sensitivity.load(run_dir(params) / FILES["sensitivity"])
    kw = {k: p[k] for k in ("structured", "rank", "alpha", "beta", "allocation")}
    kw |= {k: p[k] for k, off in (("whole", []), ("row_k", "count")) if p[k] != off}  # unset: plan.json as before
    plan = plan_budget(sens, p["budget"], p["ladder"], p["search"], **kw)
    keep = ("model_args", "model_info", "class_names", "ok_class", "data_hash", "head", "seconds")
    plan.meta.update({k: sens.meta[k] for k in keep if k in sens.meta})
    plan.meta["sensitivity_seconds"] = sens.meta.get("seconds")
    plan.save(run_dir(params) / FILES["plan"])
    try:
        plot_plan(sens, plan, run_dir(params) / FILES["plan_png"])
    except ImportError:  # matplotlib missing: the plan itself is what matters
        log.warning("matplotlib not installed: skipping plan.png")
    return plan


# --------------------------------------------------------------------------------------------- evaluate
def evaluate_stage(params: Params, model_path: Path | None = None, split: str = "test") -> dict:
    """Accuracy, per-class precision/recall, confusion matrix, balanced accuracy and, at the model's own threshold
    (chosen on validation at training), escape rate and overkill of the tuned (or a merged) model on a split."""
    run = run_dir(params)
    model, info = load_any(model_path or run / FILES["tuned"])
    ds_info = load_dataset_info(Path(params["paths"]["data"]))
    if ds_info.class_names != info["class_names"]:
        raise DataError(f"model classes {info['class_names']} differ from the data's {ds_info.class_names}")
    loader = _loaders(params, ModelInfo.from_dict(info).preprocess, 64, 0)[split]
    result = {"split": split, **evaluate(model, loader, num_classes=len(ds_info.class_names))}
    op = OperatingPoint.from_dict(info, where=str(model_path or run / FILES["tuned"]))
    result.update({"class_names": ds_info.class_names, "ok_class": op.ok_class, "threshold": op.threshold})
    result["defect"] = op.metrics(*collect(model, loader)[:2], ds_info.class_names)
    write_json(run / FILES["eval"], result)
    return result


# ------------------------------------------------------------------------------------------------ merge
def merge_stage(params: Params, check_images: int = 16, from_peft: Path | None = None) -> dict:
    """Fold the tuners into the backbone (checked equal on validation images); skipped for unmergeable plans.
    With `from_peft`, a peft adapter directory is merged into the configured base instead (`pipelines.peft_import`)."""
    if from_peft is not None:
        from .peft_import import merge_from_peft  # peft loads only when asked: its import costs seconds

        return merge_from_peft(params, Path(from_peft), check_images)
    run = run_dir(params)
    refuse_if_stopped(run, "merge")  # train.below_probe: stop kept no model
    plan = read_tuned(run / FILES["tuned"])[0]  # the trained plan (with plan.budget: auto, the chosen rung)
    (run / FILES["merged"]).unlink(missing_ok=True)  # never leave an older run's model beside a new record
    if not plan_is_mergeable(plan):
        record = {"skipped": _unmergeable(plan), "plan_hash": plan.hash(), "sensitune_version": __version__}
        write_json(run / FILES["merged_info"], record)
        log.warning("merge skipped: %s", record["skipped"])
        return record
    model, info = load_tuned(run / FILES["tuned"])
    val = _loaders(params, ModelInfo.from_dict(info).preprocess, check_images, 0)["val"]
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


def merge_skipped(params: Params) -> str | None:
    """Why the last merge made no model (its record says so), or None: the stages that need the merged model ask."""
    info = run_dir(params) / FILES["merged_info"]
    return json.loads(info.read_text()).get("skipped") if info.is_file() else None


def _unmergeable(plan: Plan) -> str:
    kinds = sorted({t.kind for t in plan.targets})
    return (f"plan.structured={plan.structured!r} gives tuners ({', '.join(kinds)}) that cannot be folded into a "
            "plain model; for a model the edge can serve use plan.structured: none (the default) or lora "
            "(with plan.allocation: global)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- predict
def predict_stage(model_path: Path, inputs: list[Path], out_csv: Path, force: bool = False) -> dict:
    """Images (files or folders) -> CSV; any artifact (`pipelines.predict`)."""
    from .predict import predict_files

    return predict_files(Path(model_path), inputs, out_csv, force=force)


# ----------------------------------------------------------------------------------------------- export
def export_stage(params: Params) -> dict:
    """ONNX + OpenVINO FP32/FP16/INT8 of the merged model, with manifests, parity and accuracy checks."""
    from deploy.compile.export import export_all  # the torch side of the edge; imported only here

    run, e = run_dir(params), params["export"]
    refuse_if_stopped(run, "export")  # an older run's merged model may still lie beside the stop record
    skipped = merge_skipped(params)
    if skipped is not None:
        report = {"skipped": skipped, "passed": False, "promotable": {}}
        _replace_dir_with_report(run / FILES["export"], report)
        log.warning("export skipped: %s", report["skipped"])
        return report
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
        model, pre, ds_info.class_names, run / FILES["export"], calibration_images=calib,
        eval_images=[p for p, _ in test], eval_labels=[y for _, y in test], model_name=info["model_args"]["name"],
        model_version=str(version), plan_hash=info["plan_hash"], data_version=ds_info.data_hash,
        precisions=tuple(e["precisions"]), calibration_size=e["calibration_size"],
        max_drop={"int8": e["int8_max_drop"]}, opset=e["opset"], int8_recovery=e["int8_recovery"],
        validation_images=[p for p, _ in scan_split(data_dir / "val", ds_info.class_names)],  # never the test split
        decision=OperatingPoint.from_dict(info, where=str(run / FILES["merged"])).to_dict(),
        weights_source=info.get("weights_source"),  # a merged peft adapter (`sensitune merge --from-peft`)
        model_kind=info.get("model"),  # probe: no candidate beat the linear probe (train.below_probe)
        graph_preprocess=e["graph_preprocess"], graph_parity_min_agreement=e["graph_parity_min_agreement"],
        graph_parity_max_dp=e["graph_parity_max_dp"], eval_split="test",
    )  # fmt: skip
    if not report.get("passed", False):
        raise SensituneError(
            f"export parity check failed (see {run / FILES['export_report']}); the artifacts are "
            "kept for inspection but must not be deployed"
        )
    return report


def _replace_dir_with_report(target: Path, report: dict) -> None:
    """`target` becomes a folder holding only export_report.json (built beside it, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~umask())
    write_json(tmp / Path(FILES["export_report"]).name, report)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# ------------------------------------------------------------------------------------------- the order
@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: the CLI verb, the dvc.yaml stage and the Prefect task share its name.

    The CLI (its verbs and `run`), the Prefect flow and dvc.yaml read these fields; none of them names a stage.
    `run` takes the params and, by name, what a caller offers and it accepts (``on_epoch``, ``model_path``, ...).
    """

    name: str
    run: Callable[..., Any]
    params: tuple[str, ...]  # the params.yaml sections or keys whose values change its outputs (dvc.yaml `params:`)
    help: str  # the CLI verb's one line
    report: Callable[[Any, Params], str]  # what the verb and `sensitune run` print of its result
    needs_merge: bool = False  # reads the merged model: `run --no-export` stops before it, the flow after a skip
    tracks: bool = False  # records in MLflow and the registry: DVC runs it, `sensitune run` and the flow do not
    command: str = ""  # dvc.yaml `cmd` when not `sensitune <name>`

    @property
    def cmd(self) -> str:
        return self.command or f"sensitune {self.name}"


def _json(result: Any, params: Params) -> str:
    return json.dumps(result, indent=2, default=str)


def _said_prepare(info: dict, params: Params) -> str:
    """The split's counts and hash, and the bit depth when prepare measured it (data.bit_depth: null)."""
    said = f"prepared {params['paths']['data']}: {json.dumps(info['counts'])} (hash {info['data_hash'][:12]})"
    if info.get("bit_depth_inferred"):
        said += (f"\nnote: 16-bit frames read as {info['bit_depth']}-bit (largest value {info['max_value']}; "
                 f"data.bit_depth is null); set data.bit_depth: {info['bit_depth']} to pin it")  # fmt: skip
    return said


def _said_merge(r: dict, params: Params) -> str:
    return f"merge skipped: {r['skipped']}" if "skipped" in r else (
        f"merged; max |merged - tuned| on val images = {r['merge_max_abs_diff']:.2e}")  # fmt: skip


def _said_train(metrics: dict, params: Params) -> str:
    from .assess import summary_line

    keys = ("test_acc", "test_balanced_acc", "escape_rate", "overkill", "threshold", "val_acc", "val_score",
            "probe_val_score", "probe_test_acc", "trainable", "best_epoch", "below_probe", "model")  # fmt: skip
    out = {k: metrics.get(k) for k in keys}
    if metrics.get("ladder"):  # plan.budget: auto
        out["budget_chosen"] = metrics["budget_chosen"]
        out["ladder_val_score"] = {r["budget"]: round(r["val_score"], 4) for r in metrics["ladder"]}
    if metrics.get("search"):  # plan.search: halving
        out.update({k: metrics[k] for k in ("budget_chosen", "lr_chosen")}, trainings=metrics["search"]["trainings"])
    said = f"{_json(out, params)}\n{summary_line(metrics)}"
    return said if metrics.get("outcome") is None or metrics.get("stopped") else f"{said}\n{metrics['outcome']}"


STAGES: tuple[Stage, ...] = (
    Stage("prepare", prepare_stage, ("data",), "split a source into train/val/test", _said_prepare),
    Stage("measure", measure_stage, ("model", "sensitivity", "train.seed"), "measure parameter sensitivity",
          lambda s, p: f"sensitivity of {len(s.candidates)} candidates in {s.meta['seconds']}s -> {p['paths']['run']}"),
    Stage("plan", plan_stage, ("plan",), "allocate the trainable budget", lambda plan, p: plan.summary()),
    Stage("train", train_stage, ("train", "evaluate"), "train the plan (validation-selected)", _said_train),
    Stage("evaluate", evaluate_stage, (), "evaluate on a split",
          lambda r, p: f"{r['split']} accuracy {r['accuracy']:.4f} on {r['n']} images"),
    Stage("merge", merge_stage, (), "fold the tuners into the backbone", _said_merge),
    Stage("export", export_stage, ("export",), "export ONNX/OpenVINO artifacts", _json, needs_merge=True),
    Stage("track", track_stage, tuple(SECTIONS), "log the run in MLflow, register the merged model once and seal "
          "its export with the registry version", _json, needs_merge=True, tracks=True,
          command="python -m pipelines.track"),
)  # fmt: skip


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def stages_until(last: str) -> tuple[Stage, ...]:
    """The stages in order up to and including `last`."""
    names = [s.name for s in STAGES]
    return STAGES[: names.index(last) + 1]


def call(s: Stage, params: Params, **offered: Callable[[], Any]) -> Any:
    """Run stage `s` with the params and each offered option its function accepts (offers are made lazily:
    e.g. an MLflow live run is opened only for a stage that reports epochs)."""
    names = inspect.signature(s.run).parameters
    return s.run(params, **{k: make() for k, make in offered.items() if k in names})
