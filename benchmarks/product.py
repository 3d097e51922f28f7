"""The product column: `sensitune run` with the shipped defaults on a method table's own images, one row per seed.

The harness rows of a table (`benchmarks/compare.py`) tune each method's lr on validation; a user runs the product,
which trains one recipe. This script measures that recipe beside them: for each seed a fresh project directory and
``sensitune run`` as a subprocess (a user's exact path, so its wall time is theirs), every key at the package's
default (params.yaml / `pipelines.config`: model.input_size, train.lr, train.epochs, plan.budget, train.below_probe,
...) except what the table forces (each row records the input side the run used, metrics.json's ``input_size``):

- ``data.source``: the table's prepared split (its exact train / val / test images; made again the way the table's
  own command made it, `benchmarks.compare.prepare_table_data`, when this machine lacks it), ``data.split: null``
  (the count mode keeps a split folder's splits as they are);
- ``data.ok_class``: the line's good class on a line table (``--imbalance``), ``ok`` on demo defects, else null
  (plain classification);
- ``train.seed``: the table's seeds 0..N-1;
- ``model.name`` / ``model.weights``: the table's backbone where it is not the default (ViT-S/14: the weights file
  ``../shared/tools/make_vit_s14.py`` writes), a key any user can set; the input side stays the default.

The child gets the harness's environment (`benchmarks.protocol.MALLOC_ENV`, the table's thread count as
OMP_NUM_THREADS, no progress bars) and no MLFLOW_TRACKING_URI (`sensitune run` tracks nothing without one). Each
row (``method: product``) goes into the table's JSON under ``product`` with its command, machine, load and the
defaults' fingerprint; rows made under other defaults move to ``replaced``, so a re-run after a default changes
re-measures every seed, and an unchanged one resumes. The table's .md is rewritten by `benchmarks.report`.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python -m benchmarks.product --backbone lite0 --task digits --seeds 3

``--task`` is the table's name after the backbone (``demo-defects-imbalanced90`` for a line table). ``--out-dir D``
reads and writes D's copy of the table (copied from benchmarks/results/ when D has none). ``--smoke`` (1 epoch, a
few images) checks the harness and refuses to write into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import compare
from benchmarks.protocol import BACKBONES, MALLOC_ENV, retire, script
from benchmarks.report import write_any_report
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_json

KEYWORDS = ("embedded", "hub", "none")  # model.weights values that name no file
DEMO_OK = "ok"  # the demo generator's good class: a user of demo-defects declares it
SMOKE = {"train.epochs": 1, "train.probe_epochs": 5, "sensitivity.batches": 2}
# and a few images, class-balanced (a line table's rare classes have too few: it keeps its split)
SMOKE_DATA = {"data.n_train": 40, "data.n_val": 20, "data.n_test": 40}
# metrics.json keys a row keeps: the kept model's numbers, the product's own probe, what the run chose and cost
KEEP = ("val_acc", "val_score", "select", "test_acc", "test_balanced_acc", "probe_val_acc", "probe_val_score",
        "probe_test_acc", "probe_test_balanced_acc", "best_epoch", "epochs", "trainable", "trainable_pct", "budget",
        "escape_rate", "overkill", "threshold", "sensitivity_seconds", "train_seconds", "probe_seconds", "device",
        "plan_hash", "sensitune_version", "input_size")  # fmt: skip


def table_args(meta: dict) -> argparse.Namespace:
    """The table's own compare.py options, parsed from its recorded command (what follows ``#`` is a note)."""
    words = shlex.split(meta["command"], comments=True)
    at = next((i for i, w in enumerate(words) if w.endswith("compare.py")), None)
    if at is None:
        raise SensituneError(f"table command {meta['command'][:80]!r}: not a benchmarks/compare.py run")
    return compare.build_parser().parse_args(words[at + 1 :])


def table_data(meta: dict, work_dir: Path | None) -> Path:
    """The table's prepared split: its recorded folder when this machine has it, else prepared again from the
    table's own options under `work_dir` (default: the command's --work-dir); the folder name must match."""
    recorded = Path(meta["data_dir"])
    if (recorded / "dataset.json").is_file():
        return recorded
    args = table_args(meta)
    args.work_dir = work_dir or args.work_dir
    data_dir, _ = compare.prepare_table_data(args, compare.table_slug(args)[1])
    if data_dir.name != recorded.name:
        raise SensituneError(f"{data_dir}: not the table's split {recorded.name}; the table's command no longer "
                             "makes it, prepare it with that command's options")  # fmt: skip
    return data_dir


def overrides(meta: dict, backbone: str, data_dir: Path, seed: int) -> dict[str, Any]:
    """The keys the table forces (module docstring), everything else stays at the package's default."""
    from pipelines.config import defaults

    model = defaults()["model"]
    name, weights = meta["backbone"], meta["weights"]
    if backbone in BACKBONES and weights not in KEYWORDS and not Path(weights).is_file():
        weights = BACKBONES[backbone][1]  # the table's file was recorded on another machine: the preset's here
    line_ok = meta.get("ok_class") if meta.get("imbalance") is not None else None
    ok = line_ok or (DEMO_OK if meta["task"] == "demo-defects" else None)
    out: dict[str, Any] = {"data.source": str(data_dir), "data.split": None, "data.ok_class": ok, "train.seed": seed}
    if name != model["name"] or weights != model["weights"]:
        if weights not in KEYWORDS and not Path(weights).is_file():
            raise SensituneError(f"{weights}: the table's {backbone} weights are not here; make them with "
                                 "../shared/tools/make_vit_s14.py (ViT-S/14), then run again")  # fmt: skip
        out |= {"model.name": name, "model.weights": weights}
    return out


def smoke_sets(meta: dict) -> dict[str, Any]:
    """``--smoke``'s keys: 1 epoch, a short probe and sensitivity pass, and few images except on a line table."""
    return SMOKE | ({} if meta.get("imbalance") is not None else SMOKE_DATA)


def run_command(sets: dict[str, Any], no_export: bool) -> list[str]:
    """``sensitune run --set k=v ...`` (the installed console script beside this Python, as a user runs it)."""
    exe = Path(sys.executable).with_name("sensitune")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "pipelines.cli"]
    sets_ = [w for k, v in sets.items() for w in ("--set", f"{k}={json.dumps(v) if v is None else v}")]
    return [*head, "run", *sets_, *(["--no-export"] if no_export else [])]


# keys added after the column was first measured whose default keeps the product as it was (the same plans: each
# row records its plan_hash); at these values they leave the fingerprint, so adding them re-runs nothing
ADDED_NEUTRAL = {("sensitivity", "include_stem"): False, ("plan", "whole"): [], ("plan", "row_k"): "count"}
# keys whose default changed where no default run reads them (train.lr_grid: plan.search: halving's trials, read
# only with plan.budget: auto): while unread they are hashed at the value the columns ran under, so the change
# re-runs nothing; once the default run reads them, their own value counts
UNREAD_AS = {("train", "lr_grid"): [1 / 3, 1.0, 3.0]}


def defaults_fingerprint() -> str:
    """A hash of every package default: a row made under other defaults is not this product's."""
    from pipelines.config import defaults

    d = defaults()
    for (section, key), neutral in ADDED_NEUTRAL.items():
        if d[section].get(key) == neutral:
            del d[section][key]
    if (d["plan"]["budget"], d["plan"]["search"]) != ("auto", "halving"):
        for (section, key), was in UNREAD_AS.items():
            d[section][key] = was
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_seed(project: Path, sets: dict[str, Any], threads: int, no_export: bool) -> dict[str, Any]:
    """One `sensitune run` in a fresh `project`; the row from its metrics.json, its exit code and wall time."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({**MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "SENSITUNE_NO_PROGRESS": "1"})
    cmd = run_command(sets, no_export)
    shown = " ".join([*(f"{k}={env[k]}" for k in (*MALLOC_ENV, "OMP_NUM_THREADS")), "sensitune",
                      *map(shlex.quote, cmd[cmd.index("run") :])])  # fmt: skip
    load0, t0, started = os.getloadavg()[0], time.perf_counter(), time.time()
    with open(project / "run.log", "w") as log:
        code = subprocess.run(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    row: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 1), "exit_code": code, "command": shown,
                           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
                           "started": round(started, 1), "finished": round(time.time(), 1)}  # fmt: skip
    return row | read_outcome(project / "runs" / "main" / "metrics.json", code, project / "run.log")


def read_outcome(metrics_path: Path, code: int, log: Path) -> dict[str, Any]:
    """What the run kept (``outcome``: model | probe | stopped) and its numbers; an ``error`` when it failed."""
    from pipelines.below_probe import STOP_EXIT

    if code not in (0, STOP_EXIT) or not metrics_path.is_file():
        return {"error": f"exit {code}, see {log}"}
    m = json.loads(metrics_path.read_text())
    outcome = "stopped" if code == STOP_EXIT or m.get("stopped") else m.get("model", "model")
    out = {k: m.get(k) for k in KEEP} | {"outcome": "model" if outcome == "tuned" else outcome}
    out["val_balanced_acc"] = (m.get("val") or {}).get("balanced_accuracy")
    if "tuned" in m:  # the probe replaced it: the tuned model's own numbers
        out["tuned"] = {k: m["tuned"].get(k) for k in ("val_acc", "val_score", "test_acc", "test_balanced_acc")}
    return out


def _device() -> str:
    """Where `train.device: auto` trains: the machine label says which."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="lite0", help=f"the table's backbone preset ({', '.join(BACKBONES)})")
    ap.add_argument("--task", default="digits", help="the table's name after the backbone, e.g. digits, "
                    "demo-defects-imbalanced90")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3, help="train.seed = 0 .. N-1")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: the table's --threads)")
    ap.add_argument("--no-export", action="store_true", help="`sensitune run --no-export` (wall time to merge only)")
    ap.add_argument("--out-dir", type=Path, default=compare.RESULTS, help="where the table's JSON/.md are")
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-product").expanduser(),
                    help="the projects (one per seed) and, where missing, the table's prepared split")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help=f"a check: {SMOKE | SMOKE_DATA}; never into results/")
    return ap


def load_table(out_dir: Path, slug: str, smoke: bool) -> tuple[dict, Path]:
    """The table's state and the JSON to write: ``out_dir``'s copy, else benchmarks/results/'s."""
    out = out_dir / f"compare_{slug}.json"
    if smoke and out.resolve().parent == compare.RESULTS.resolve():
        raise SensituneError("--smoke: give --out-dir /tmp/... (smoke rows are never committed)")
    src = out if out.is_file() else compare.RESULTS / out.name
    if not src.is_file():
        raise SensituneError(f"{src}: no such table; run benchmarks/compare.py for it first, or check --backbone "
                             "and --task (the name after the backbone)")  # fmt: skip
    return json.loads(src.read_text()), out


def main(argv: list[str] | None = None) -> Path:
    """Run the seeds the table lacks under today's defaults; returns the table's JSON path."""

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    slug = f"{args.backbone.replace('/', '-')}_{args.task}"
    state, out = load_table(args.out_dir, slug, args.smoke)
    meta = state["meta"]
    how = {"defaults": defaults_fingerprint(), "no_export": args.no_export, "smoke": args.smoke,
           "threads": args.threads or meta.get("threads", 1)}  # fmt: skip
    retire_stale(state, how)
    data_dir = table_data(meta, args.work_dir)
    fixed = {"method": "product", **how,  # input_size: the side the run used, from its metrics.json
             "stages": "sensitune run" + " --no-export" * args.no_export, "machine": compare.machine_label(_device()),
             "product_command": "python -m benchmarks.product " + " ".join(argv)}  # fmt: skip
    for seed in range(args.seeds):
        if any(r["seed"] == seed and "error" not in r for r in state["product"]):
            continue
        sets = overrides(meta, args.backbone, data_dir, seed) | (smoke_sets(meta) if args.smoke else {})
        print(f"[product {slug}] seed {seed}: sensitune run ({how['threads']} threads)", flush=True)
        ran = run_seed(args.work_dir / "projects" / slug / f"seed{seed}", sets, how["threads"], args.no_export)
        row = {**fixed, "seed": seed, "overrides": sets, **ran,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        print(f"[product {slug}] {json.dumps(row)}", flush=True)
        state["product"] = [r for r in state["product"] if r["seed"] != seed] + [row]
        write_json(out, state)
        write_any_report(state, out.with_suffix(""))
    return out


def retire_stale(state: dict, how: dict[str, Any]) -> None:
    """Product rows made another way (other defaults, threads, export or smoke) move to ``replaced``: every seed
    of the column is then measured the same way."""
    state.setdefault("product", [])
    if stale := [r for r in state["product"] if any(r.get(k) != v for k, v in how.items())]:
        retire(state, stale, f"product re-run with {how}", key="product")


if __name__ == "__main__":
    script(main)
