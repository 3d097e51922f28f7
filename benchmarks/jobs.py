"""One row of a method table: a sensitivity pass or one (method, seed, lr) training run, in its own process.

A job is a JSON-able dict (model, data, method, seed, lr, budget, ...) and its result is the row. `run_job` starts
``python benchmarks/jobs.py JOB`` so that the peak memory (CPU: ru_maxrss / VmHWM; CUDA: max_memory_allocated) is
the run's own; `--in-process` (tests) runs it here. Training is the product's: `spt_core.data.make_loaders`,
`spt_core.model.create_model` and `spt_core.train.fit` with `TrainConfig.scaled`; only the method's choice of
trainable values (`benchmarks/methods.py`) is the harness's.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.imbalance import line_metrics, parse_variant
from benchmarks.methods import SENSITIVITY_METHODS, MethodInfo, setup_method
from benchmarks.protocol import MALLOC_ENV, PROBE_EPOCHS, SENS_BATCH_SIZE, SENS_BATCHES
from benchmarks.search_job import SEARCH_METHODS, search_job


# ------------------------------------------------------------------------------------------------ memory probes
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so that loading the weights does not set the training peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not allowed: fall back to ru_maxrss (a lifetime peak)
        return False


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc); the malloc variables only stop *automatic* trimming."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include freed memory
        pass


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))


# ------------------------------------------------------------------------------------------------ the jobs
def _build(job: dict) -> tuple[Any, Any, dict]:
    """(model with its seeded random head, ModelInfo, loaders) as the product builds them; a training job's
    loaders balance and augment as its variant says, a sensitivity pass reads plain images."""
    import torch

    from spt_core.api import Augment, create_model, load_dataset_info, make_loaders

    torch.set_num_threads(job["threads"])
    balance, aug = parse_variant(job.get("variant", "none"))
    aug = aug or job.get("augment", False)  # --augment: every method of the table trains on augmented images
    n_classes = len(load_dataset_info(Path(job["data_dir"])).class_names)
    torch.manual_seed(job["seed"])  # the seeded random head, as spt_core.stages.build_model
    model, info = create_model(job["model"], n_classes, weights=job["weights"], img_size=job["img_size"])
    model.to(job["device"])
    loaders = make_loaders(
        Path(job["data_dir"]),
        info.preprocess,
        batch_size=job["batch"],
        seed=job["seed"],
        num_workers=job.get("workers", 0),
        balance=balance if job["kind"] == "train" else "none",
        augment=Augment() if aug and job["kind"] == "train" else None,
    )
    return model, info, loaders


def sensitivity_job(job: dict) -> dict:
    """Fit a linear probe head (cached features), then measure SPT sensitivity on 16 x 32 training images."""
    import torch

    from spt_core.api import measure_task

    model, _, loaders = _build(job)
    device = torch.device(job["device"])
    if device.type == "cuda":  # the peak covers the probe's feature pass too; the Σg² backward dominates it
        torch.cuda.reset_peak_memory_stats(device)
    sens = measure_task(
        model,
        loaders["train"].dataset,
        {"train": loaders["train"], "val": loaders["val"]},
        head="probe",
        probe_epochs=PROBE_EPOCHS,
        batches=SENS_BATCHES,
        batch_size=SENS_BATCH_SIZE,
        seed=job["seed"],
        device=device,
        include_stem=job.get("include_stem", False),
    )
    sens.save(job["sens_path"])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "kind": "sensitivity",
        "seed": job["seed"],
        "seconds": sens.meta["seconds"],
        "images": sens.meta["images"],
        "probe_seconds": sens.meta["probe_seconds"],
        "probe_val_acc": sens.meta["probe_val_acc"],
        "peak_memory_mb": round(peak, 1),
    }


def _curve_recorder(model: Any, loaders: dict, job: dict, curve: list[dict]) -> Any:
    """`fit`'s on_epoch for --curves: the selection study's per-epoch numbers (never used to select)."""
    import torch

    from spt_core.api import evaluate

    ok_index = job.get("ok_index")

    def record(epoch: dict) -> None:
        test = evaluate(model, loaders["test"], torch.device(job["device"]))
        curve.append({"epoch": epoch["epoch"], "val_acc": epoch["val_acc"], "val_loss": round(epoch["val_loss"], 6),
                      "test_acc": test["accuracy"]})  # fmt: skip
        if ok_index is not None:  # a line: balanced accuracy, and escape / overkill at that epoch's threshold
            lm = line_metrics(model, loaders, ok_index, job["max_escape_rate"])
            curve[-1].update({"val_bacc": lm["val_balanced_acc"], "test_bacc": lm["test_balanced_acc"],
                              "test_escape": lm["escape_rate"], "test_overkill": lm["overkill"]})  # fmt: skip

    return record


def train_job(job: dict) -> dict:
    """Build the model, apply the method, `fit` it; returns the row (counts, accuracies, memory, times). A search
    method (`benchmarks.search_job`) runs its whole search as one row."""
    if job["method"] in SEARCH_METHODS:
        return search_job(job, _build)
    import torch

    from spt_core.api import Sensitivity, TrainConfig, evaluate, fit

    t_start = time.perf_counter()
    model, _, loaders = _build(job)
    sens = Sensitivity.load(job["sens_path"]) if job["method"] in SENSITIVITY_METHODS else None
    model, minfo = setup_method(model, job["method"], job["budget"], sensitivity=sens, seed=job["seed"])
    model.to(job["device"])
    del sens
    gc.collect()
    _malloc_trim()  # freed weight/score buffers would otherwise sit in the baseline and hide training's first MBs
    base_rss = _rss_mb()
    hwm_reset = job["device"] == "cpu" and _reset_peak_rss()
    ok_index = job.get("ok_index")
    cfg = TrainConfig.scaled(
        job["epochs"], lr=job["lr"], batch_size=job["batch"], seed=job["seed"], device=job["device"], progress=False,
        balance=parse_variant(job.get("variant", "none"))[0], select=job.get("select", "accuracy"),
    )  # fmt: skip
    curve: list[dict] = []
    record = _curve_recorder(model, loaders, job, curve) if job.get("curves") else None
    hist = fit(model, loaders, cfg, None, ok_index=ok_index, max_escape_rate=job.get("max_escape_rate", 0.0),
               on_epoch=record)  # fmt: skip
    line = line_metrics(model, loaders, ok_index, job["max_escape_rate"]) if ok_index is not None else {}
    fit_peak = _hwm_mb() if hwm_reset else hist.peak_memory_mb
    t0 = time.perf_counter()  # one validation pass, to split s/epoch into training and validation time
    evaluate(model, loaders["val"], torch.device(job["device"]))
    val_s = time.perf_counter() - t0
    memory = {
        "peak_memory_mb": round(hist.peak_memory_mb, 1),
        "peak_memory_kind": hist.peak_memory_kind,
        "train_overhead_mb": round(fit_peak - base_rss, 1) if job["device"] == "cpu" else None,
        "overhead_peak": "vmhwm_reset_trim" if hwm_reset else "ru_maxrss",  # ru_maxrss includes the weight-load spike
    }
    row = _train_row(job, minfo, hist, memory, val_s, time.perf_counter() - t_start)
    return {**row, **({"curve": curve} if curve else {}),
            **({"variant": job["variant"], "select": cfg.select, **line} if ok_index is not None else {})}  # fmt: skip


def _train_row(job: dict, minfo: MethodInfo, hist: Any, memory: dict, val_s: float, wall_s: float) -> dict:
    """A training run's row in the table's order: the run, its counts, its accuracies, its memory and times."""
    n_ep = len(hist.epochs)
    s_epoch = hist.train_seconds / n_ep
    return {
        "kind": "train",
        "method": job["method"],
        "seed": job["seed"],
        "lr": job["lr"],
        "budget": job["budget_label"],
        "budget_count": job["budget"],
        "trainable_backbone": minfo.trainable_backbone,
        "trainable_head": minfo.trainable_head,
        "trainable_pct": round(minfo.trainable_pct, 4),
        "backbone_params": minfo.backbone_params,
        "details": minfo.details,
        "val_acc": hist.best_val_acc,
        "val_loss": round(hist.best_val_loss, 6),  # the chosen epoch's
        "test_acc": hist.test_acc,
        "best_epoch": hist.best_epoch,
        "epochs": n_ep,
        **memory,
        "s_per_epoch": round(s_epoch, 2),
        "s_per_train_epoch": round(s_epoch - val_s, 2),
        "wall_s": round(wall_s, 1),
    }


def run_here(job: dict) -> dict:
    """The job in this process."""
    return sensitivity_job(job) if job["kind"] == "sensitivity" else train_job(job)


def run_job(job: dict, in_process: bool, log_path: Path) -> dict:
    """One job in a fresh subprocess (own peak memory), or in this process (tests)."""
    if in_process:
        return run_here(job)
    env = {**os.environ, **MALLOC_ENV, "SENSITUNE_NO_PROGRESS": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        out = subprocess.run(
            [sys.executable, __file__, json.dumps(job)], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}, see {log_path}"}
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":  # the child of `run_job`: one JSON job in, one RESULT line out
    if len(sys.argv) != 2 or not sys.argv[1].startswith("{"):
        print("usage: python benchmarks/jobs.py JOB_JSON (the child of benchmarks/compare.py; run that instead)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    print("RESULT " + json.dumps(run_here(json.loads(sys.argv[1]))))
