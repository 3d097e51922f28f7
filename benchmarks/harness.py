"""A method table being filled: its rows run (resumably, up to --parallel at a time) and the ways a table grows.

`Table` holds one results JSON and runs the rows it lacks; each finished row is written at once, so a killed run
resumes where it stopped. The modes of `benchmarks/compare.py` are functions over it: `run_protocol` (the lr grid
on the grid seeds, the chosen lr on the other seeds, k-fold runs, budget curves), `run_shard` (--seed-start),
`merge` (--merge), `rerun` (--rerun-ties, --rerun-lossless) and `retire_stale` (--rerun-stale).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.jobs import run_job
from benchmarks.methods import SENSITIVITY_METHODS, STEM_METHODS
from benchmarks.protocol import ROWS, key_of, retire, sens_key
from benchmarks.report import chosen_lr, rows_tied_without_loss, rows_without_loss, write_any_report
from benchmarks.task_data import kfold_dirs
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_json

Key = tuple  # (method, seed, lr, budget[, variant[, fold]]): `protocol.key_of` of the row it makes


@dataclass
class Table:
    """One results JSON (``state``) and what its runs share: the job fields, the work directory, the pacing."""

    state: dict
    out_json: Path
    work: Path  # sensitivity files and one log per job
    slug: str  # <backbone>_<task>: the table's name in file names and progress lines
    base: dict  # job fields of every run: model, weights, img_size, data_dir, epochs, batch, device, ...
    line_job: dict  # --imbalance: ok_index, select, max_escape_rate; else empty
    n_backbone: int  # backbone values: what a budget such as "2%" is a share of
    in_process: bool = False
    parallel: int = 1
    k: int = 0  # --kfold K (0: none)
    kfold: dict[int | str, Path] = field(default_factory=dict)  # fold -> data dir, filled before the k-fold runs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # rows are added one at a time

    def save(self) -> None:
        write_json(self.out_json, self.state)
        write_any_report(self.state, self.out_json.with_suffix(""))

    def job_log(self, name: str) -> Path:
        """One stderr log per job: parallel jobs never interleave."""
        return self.work / "logs" / (re.sub(r"[^A-Za-z0-9._%-]+", "_", name) + ".log")

    def sens_path(self, seed: int, stem: bool = False) -> Path:
        """The seed's pass; ``stem``: the pass that also measured the stem (`STEM_METHODS` read it)."""
        return self.work / f"sensitivity{'_stem' * stem}_seed{seed}.safetensors"

    def ensure_sensitivity(self, seed: int, stem: bool = False) -> None:
        path = self.sens_path(seed, stem)
        if not path.is_file():
            job = {**self.base, "kind": "sensitivity", "seed": seed, "sens_path": str(path), "include_stem": stem}
            row = run_job(job, self.in_process, self.job_log(path.stem))
            row = {"seed": seed, **row, **({"include_stem": True} if stem else {})}  # failed ones too: a retry replaces
            print(f"[{self.slug}] sensitivity seed {seed}{' (with the stem)' * stem}: {row}", flush=True)
            self.state["sensitivity"] = [s for s in self.state["sensitivity"] if sens_key(s) != sens_key(row)] + [row]
            self.save()

    def done(self, key: Key) -> bool:
        """A finished row of that key is in the table (a failed run is retried by the next invocation)."""
        return any(key_of(r) == key and "error" not in r for r in self.state.get(ROWS[key[5] is not None], []))

    def run(self, method: str, seed: int, lr: float, budget: str, variant: str = "none",
            fold: int | str | None = None) -> None:  # fmt: skip
        """One training run; its row (or its error) replaces any row of the same key, and the table is saved."""
        from spt_core.api import parse_budget

        job = {**self.base, "kind": "train", "method": method, "seed": seed, "lr": lr, "budget_label": budget,
               "budget": parse_budget(budget, self.n_backbone), "variant": variant, **self.line_job}  # fmt: skip
        if fold is not None:  # --kfold: a fold (or the refit on train+val), curves recorded for the replay
            job.update({"data_dir": str(self.kfold[fold]), "curves": True})
        t0 = time.time()
        sens = self.sens_path(seed, method in STEM_METHODS)
        if method in SENSITIVITY_METHODS:
            job["sens_path"] = str(sens)
        name = f"{method}_{variant}_seed{seed}_lr{lr:g}_{budget}" + ("" if fold is None else f"_fold{fold}")
        if method in SENSITIVITY_METHODS and not sens.is_file():
            row = {"error": f"no sensitivity pass for seed {seed}: see {self.job_log(sens.stem)}"}
        else:
            row = run_job(job, self.in_process, self.job_log(name))
        # where and when it ran: a resumed table can hold rows of several invocations (machines)
        row.update({"method": method, "seed": seed, "lr": lr, "budget": budget, "variant": variant,
                    "machine": self.state["meta"]["machine"], "parallel": self.parallel, "started": round(t0, 1),
                    "finished": round(time.time(), 1)})  # fmt: skip
        if fold is not None:
            row.update({"fold": fold, "k": self.k})
        with self._lock:
            print(f"[{self.slug}] {json.dumps(row)}", flush=True)
            rows = ROWS[fold is not None]
            self.state[rows] = [r for r in self.state.get(rows, []) if key_of(r) != key_of(row)] + [row]
            self.save()

    def run_all(self, keys: list[Key]) -> None:
        """The (method, seed, lr, budget[, variant[, fold]]) runs not yet in the JSON, up to --parallel at a time."""
        keys = [(*k, "none", None) if len(k) == 4 else (*k, None)[:6] for k in keys]  # variant "none", fold None
        todo = [k for k in dict.fromkeys(keys) if not self.done(k)]
        for seed, stem in sorted({(k[1], k[0] in STEM_METHODS) for k in todo if k[0] in SENSITIVITY_METHODS}):
            self.ensure_sensitivity(seed, stem)  # before the runs that read it, never two passes of one at once
        with ThreadPoolExecutor(max_workers=1 if self.in_process else self.parallel) as ex:
            list(ex.map(lambda k: self.run(*k), todo))


def run_protocol(table: Table, args: argparse.Namespace, methods: list[str], grid: dict[str, list[float]]) -> None:
    """The table's runs from `compare.py`'s options: the lr grid on --grid-seeds, the lr chosen on seed-0 validation
    for the other seeds, every --kfold fold and refit at every lr, then the --curve-budgets rungs."""
    variants = args.variants.split(",") if args.imbalance is not None else ["none"]
    table.run_all([(m, seed, lr, args.budget, v) for seed in range(args.grid_seeds) for v in variants
                   for m in methods for lr in grid[m]])  # fmt: skip

    def at_chosen_lr(seeds: range, budget: str) -> list[Key]:
        lrs = {(m, v): chosen_lr(table.state["rows"], m, args.budget, v) for m in methods for v in variants}
        return [(m, seed, lrs[m, v], budget, v) for seed in seeds for v in variants for m in methods
                if lrs[m, v] is not None]  # fmt: skip

    table.run_all(at_chosen_lr(range(1, args.seeds), args.budget))
    if args.kfold:  # every fold and the refit, at every lr of the grid: selection.py replays the k-fold rule
        folds, refit = kfold_dirs(Path(table.base["data_dir"]), args.kfold)
        table.kfold.update({**dict(enumerate(folds)), "refit": refit})
        table.run_all([(m, seed, lr, args.budget, "none", fold) for seed in range(args.kfold_seeds or args.grid_seeds)
                       for m in methods for lr in grid[m] for fold in [*range(args.kfold), "refit"]])  # fmt: skip
    curve_methods = [m for m in args.curve_methods.split(",") if m]
    for budget in [b for b in args.curve_budgets.split(",") if b]:
        table.run_all([k for k in at_chosen_lr(range(args.curve_seeds), budget) if k[0] in curve_methods])
    table.save()


def run_shard(table: Table, methods: list[str], grid: dict[str, list[float]], budget: str, seeds: range) -> None:
    """--seed-start: the later seeds at the first lr of each grid, run beside the seed-0 process (then --merge)."""
    table.run_all([(m, seed, grid[m][0], budget) for seed in seeds for m in methods])
    table.save()


def merge(table: Table, old_meta: dict | None, shard_path: Path) -> None:
    """--merge: a shard's rows are added, and replace failed rows of the same key; the table's own meta stays."""
    state = table.state
    state["meta"] = old_meta or state["meta"]  # the run's own command, machine and date stay
    other = json.loads(shard_path.read_text())
    for name, key in (("rows", key_of), ("kfold", key_of), ("sensitivity", sens_key)):
        state.setdefault(name, [])
        for r in other.get(name, []):
            mine = next((x for x in state[name] if key(x) == key(r)), None)
            if mine is None or ("error" in mine and "error" not in r):
                state[name] = [x for x in state[name] if key(x) != key(r)] + [r]
    state["meta"]["command"] += f"  # + rows of {shard_path.name}: `{other['meta']['command']}`"
    table.save()


RERUNS = {  # --rerun-<name>: which rows, and the reason kept with the old ones under "replaced"
    "ties": (rows_tied_without_loss, "tied on validation in a budget-on-val choice, recorded no val_loss"),
    "lossless": (rows_without_loss, "the table's numbers rest on it and it recorded no val_loss"),
}


def rerun(table: Table, old_meta: dict | None, command: str, which: str) -> None:
    """--rerun-ties / --rerun-lossless: re-run the rows `RERUNS[which]` selects (the table's own options), check
    each reproduces its validation accuracy, and say what is left; compare.py then runs what a moved lr needs."""
    if old_meta is None:
        raise SensituneError(f"--rerun-{which}: no table at {table.out_json}; copy the table's JSON into --out-dir")
    select, why = RERUNS[which]
    state, slug = table.state, table.slug
    state["meta"] = {**old_meta, "command": old_meta["command"] + f"  # + --rerun-{which}: `{command}`"}
    rows, budget = select(state), state["meta"]["budget"]
    lrs = {m: chosen_lr(state["rows"], m, budget) for m in {r["method"] for r in state["rows"]}}
    retire(state, rows, why)
    print(f"[{slug}] re-running {len(rows)} rows: {why}", flush=True)
    table.run_all([key_of(r) for r in rows])
    for old in rows:  # same seed, code path and threads: the run should reproduce its validation accuracy
        new = next((r for r in state["rows"] if key_of(r) == key_of(old)), {})
        if new.get("val_acc") != old["val_acc"]:
            print(f"[{slug}] {key_of(old)}: val_acc {old['val_acc']} -> {new.get('val_acc')}", flush=True)
    now = {m: chosen_lr(state["rows"], m, budget) for m in lrs}
    if moved := {m: (lr, now[m]) for m, lr in lrs.items() if now[m] != lr}:
        print(f"[{slug}] the chosen lr moved ({moved}): run the table's own command to fill those seeds", flush=True)
    elif left := select(state):  # a changed val_acc can make a new tie
        print(f"[{slug}] {len(left)} rows still without a loss: run --rerun-{which} again", flush=True)
    table.save()


def retire_stale(table: Table, methods: list[str], budget: str) -> None:
    """--rerun-stale: retire the chosen-lr rows whose CPU memory baseline was taken without a heap trim, so that
    the protocol run that follows measures them again."""
    state = table.state
    lrs = {m: chosen_lr(state["rows"], m, budget) for m in methods}
    stale = [
        r for r in state["rows"]
        if "error" not in r and r["budget"] == budget and r.get("train_overhead_mb") is not None
        and r.get("overhead_peak") != "vmhwm_reset_trim" and r["lr"] == lrs.get(r["method"])
    ]  # fmt: skip
    retire(state, stale, "memory baseline without heap trim")
    print(f"[{table.slug}] re-running {len(stale)} rows measured by an older harness", flush=True)
