"""Which selection protocol survives a small validation set? Replays rules on the per-epoch curves of a table.

`benchmarks/compare.py --curves --grid-seeds N` records, for every (method, seed, lr) run, each epoch's
validation accuracy, validation loss and test accuracy. Selection reads validation only; the test column is read
here only to score a rule after it has chosen. The rules:

  epoch rules   acc       the epoch with the best validation accuracy (first on ties): the committed tables
                          (an imbalanced line's table, `--imbalance`: balanced accuracy, on val and on test)
                loss      the epoch with the lowest validation loss
                smooth    the best centred 3-epoch mean of validation accuracy (ends: the 2 epochs there are)
                acc>loss  the best validation accuracy, ties broken by the lower validation loss (also between lrs):
                          the product's rule since 2026-11-30 (`spt_core.portable.metrics.selection_key`)
  lr rules      seed0     one lr per method from seed 0's validation (the harness so far)
                pooled    one lr per method from the mean validation score over every grid seed
                per-seed  each seed its own lr from its own validation

A rule's result is the mean test accuracy over seeds of the epochs it picks. "oracle" (the best test epoch and lr
per seed) is printed for scale only: it is not a protocol.

With `compare.py --kfold K` the table also holds K stratified folds of train+val and a refit on all of train+val,
for every (method, seed, lr). The k-fold rule (`kfold`): per seed, average the K folds' validation curves epoch by
epoch, take the lr and epoch with the best mean (accuracy, or the lowest mean loss), and report the refit's test
accuracy at that epoch of the same schedule. Every labelled image then trains the final model.

Writes <table>_selection.md beside the JSON.

    python benchmarks/selection.py benchmarks/results/compare_lite0_lfw-faces.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.methods import METHODS
from spt_core.portable.io import atomic_path
from spt_core.portable.metrics import selection_key

Curve = list[dict]


def _smooth(values: list[float]) -> list[float]:
    return [sum(values[max(0, i - 1) : i + 2]) / len(values[max(0, i - 1) : i + 2]) for i in range(len(values))]


Score = tuple[float, ...]  # compared left to right: a rule's criterion, then its tie-break


def _pick(values: list[Score]) -> int:
    """Index of the first maximum."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _scores(curve: Curve, rule: str) -> list[Score]:
    """Each epoch's validation score under `rule` (higher is better)."""
    if rule == "loss":
        return [(-e["val_loss"],) for e in curve]
    if rule == "smooth":
        return [(v,) for v in _smooth([e["val_acc"] for e in curve])]
    if rule == "acc>loss":
        return [selection_key(e["val_acc"], e["val_loss"]) for e in curve]
    return [(e["val_acc"],) for e in curve]


EPOCH_RULES = ("acc", "loss", "smooth", "acc>loss")


def _epoch(curve: Curve, rule: str) -> int:
    return _pick(_scores(curve, rule))


def _val_score(curve: Curve, rule: str) -> Score:
    """What a rule compares learning rates by: its own score at its chosen epoch."""
    return _scores(curve, rule)[_epoch(curve, rule)]


def replay(rows: list[dict], method: str, epoch_rule: str, lr_rule: str) -> dict[int, float]:
    """{seed: test accuracy} of the epoch and lr the rules pick for `method` (rows with curves at one budget)."""
    runs = {(r["seed"], r["lr"]): r["curve"] for r in rows if r["method"] == method}
    seeds, lrs = sorted({s for s, _ in runs}), sorted({lr for _, lr in runs})
    seeds = [s for s in seeds if all((s, lr) in runs for lr in lrs)]  # seeds that ran the whole grid
    if not seeds:
        return {}

    def score(seed: int, lr: float) -> Score:
        return _val_score(runs[seed, lr], epoch_rule)

    def pooled(lr: float) -> Score:  # each component summed over the seeds
        return tuple(map(sum, zip(*(score(s, lr) for s in seeds))))

    if lr_rule == "seed0":
        lr0 = max(lrs, key=lambda lr: (score(seeds[0], lr), -lr))
        chosen = {s: lr0 for s in seeds}
    elif lr_rule == "pooled":
        lr0 = max(lrs, key=lambda lr: (pooled(lr), -lr))
        chosen = {s: lr0 for s in seeds}
    elif lr_rule == "per-seed":
        chosen = {s: max(lrs, key=lambda lr, s=s: (score(s, lr), -lr)) for s in seeds}
    else:
        raise ValueError(lr_rule)
    return {s: runs[s, chosen[s]][_epoch(runs[s, chosen[s]], epoch_rule)]["test_acc"] for s in seeds}


def kfold(rows: list[dict], method: str, by: str = "acc") -> dict[int, float]:
    """{seed: the refit's test accuracy} at the lr and epoch with the best mean validation over the folds."""
    folds = sorted({r["fold"] for r in rows if r["fold"] != "refit"})
    runs = {(r["seed"], r["lr"], r["fold"]): r["curve"] for r in rows if r["method"] == method}
    seeds, lrs = sorted({s for s, _, _ in runs}), sorted({lr for _, lr, _ in runs})
    seeds = [s for s in seeds if all((s, lr, f) in runs for lr in lrs for f in [*folds, "refit"])]
    if not folds:
        return {}
    out = {}
    for s in seeds:
        best = None  # (mean score, -lr, -epoch index) -> the first best epoch, the smaller lr on ties
        for lr in lrs:
            curves = [runs[s, lr, f] for f in folds]
            for i in range(min(len(c) for c in [*curves, runs[s, lr, "refit"]])):
                mean = sum(c[i]["val_acc"] if by == "acc" else -c[i]["val_loss"] for c in curves) / len(curves)
                if best is None or (mean, -lr, -i) > best[0]:
                    best = ((mean, -lr, -i), lr, i)
        assert best is not None
        _, lr, i = best
        out[s] = runs[s, lr, "refit"][i]["test_acc"]
    return out


def oracle(rows: list[dict], method: str) -> dict[int, float]:
    runs = [r for r in rows if r["method"] == method]
    seeds = {r["seed"] for r in runs}
    return {s: max(e["test_acc"] for r in runs if r["seed"] == s for e in r["curve"]) for s in seeds}


def on_balanced_accuracy(rows: list[dict], test: str = "test_bacc") -> list[dict]:
    """An imbalanced line's rows (`compare.py --imbalance --curves`) with their curves read as balanced accuracy:
    the line's selection metric (`train.select`'s default). `test` is what a rule's pick is then scored by
    (balanced accuracy, or "test_overkill"); the rules read validation only, so it never changes a pick."""
    return [{**r, "curve": [{**e, "val_acc": e["val_bacc"], "test_acc": e[test]} for e in r["curve"]]}
            for r in rows]  # fmt: skip


def report(state: dict) -> str:
    meta = state["meta"]
    rows = [r for r in state["rows"] if "curve" in r and "error" not in r and r["budget"] == meta["budget"]]
    line = meta.get("imbalance") is not None
    plain = rows
    if line:
        rows = on_balanced_accuracy(plain)
    rules = [(e, lr) for lr in ("seed0", "pooled", "per-seed") for e in EPOCH_RULES]
    lines = [
        f"# Selection protocols on {meta['backbone']} @ {meta['img_size']} px, {meta['task']} "
        f"(budget {meta['budget']})",
        "",
        f"From `{meta['command']}`; replayed by `python benchmarks/selection.py` (rules: its docstring). Test % is "
        "the mean over the seeds that ran the whole lr grid, at the epoch and lr each rule picked on validation; "
        "'oracle' picks on test and is not a protocol."
        + (
            f" An imbalanced line (good class at {100 * meta['imbalance']:.0f} %): every accuracy here, on validation "
            "(what the rules read) and on test, is balanced accuracy."
            if line
            else ""
        ),
        "",
        "| method | seeds | lrs | " + " | ".join(f"{e} / {lr}" for e, lr in rules) + " | oracle |",
        "|---|---|---|" + "---|" * (len(rules) + 1),
    ]
    for m in METHODS:
        res = [replay(rows, m, e, lr) for e, lr in rules]
        if not res[0]:
            continue
        lrs = sorted({r["lr"] for r in rows if r["method"] == m})
        cells = [f"{100 * sum(d.values()) / len(d):.2f}" for d in res]
        orc = oracle(rows, m)
        lines.append(f"| {m} | {len(res[0])} | {', '.join(f'{x:g}' for x in lrs)} | " + " | ".join(cells)
                     + f" | {100 * sum(orc.values()) / len(orc):.2f} |")  # fmt: skip
    if line:  # what a line pays for a pick: good parts rejected at the validation-chosen escape threshold
        lines += ["", f"Test overkill % (good parts rejected at the threshold chosen on validation for escape "
                  f"<= {meta['max_escape_rate']:g}) at the same picks; lower is better:", "",
                  "| method | " + " | ".join(f"{e} / {lr}" for e, lr in rules) + " |",
                  "|---|" + "---|" * len(rules)]  # fmt: skip
        overkill = on_balanced_accuracy(plain, "test_overkill")
        for m in METHODS:
            res = [replay(overkill, m, e, lr) for e, lr in rules]
            if res[0]:
                lines.append(f"| {m} | " + " | ".join(f"{100 * sum(d.values()) / len(d):.2f}" for d in res) + " |")
    kf = [r for r in state.get("kfold", []) if "curve" in r and "error" not in r and r["budget"] == meta["budget"]]
    if kf:
        ks = ", ".join(str(k) for k in sorted({r.get("k") for r in kf}, key=str))
        lines += [
            "",
            f"k-fold ({ks} stratified folds of train+val; the refit trains on all of them, the test "
            "% is its test accuracy at the chosen epoch), beside the plain protocol (acc / seed0, acc / per-seed):",
            "",
            "| method | seeds | kfold acc | kfold loss | acc / seed0 | acc / per-seed |",
            "|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            res = [kfold(kf, m, "acc"), kfold(kf, m, "loss")]
            if not res[0]:
                continue
            res += [{s: t for s, t in replay(rows, m, "acc", rule).items() if s in res[0]} for rule in ("seed0",
                    "per-seed")]  # the plain protocol on the same seeds  # fmt: skip
            cells = [f"{100 * sum(d.values()) / len(d):.2f}" if d else "-" for d in res]
            lines.append(f"| {m} | {len(res[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("table", type=Path, help="a benchmarks/results/compare_*.json run with --curves")
    args = ap.parse_args(argv)
    out = args.table.with_name(args.table.stem + "_selection.md")
    text = report(json.loads(args.table.read_text()))
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
