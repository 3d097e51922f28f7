"""How many batches SPT's sensitivity needs: bootstrap rank correlation of Σg² vs the number of batches.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
        python benchmarks/stability.py --backbone lite0 --task digits --pool 32 --reps 10

The seed paper leaves the stability of its scores as future work. Here: fit the head by a linear probe (as the
product does), then measure g² of every candidate entry on each of ``--pool`` class-balanced training batches
separately (the same batches `spt_core.sensitivity.measure_task` would draw, batch size 32). For n batches, a
draw takes 2n distinct batches of the pool and splits them into two disjoint halves; each half's Σg² is one
n-batch measurement, so the pair shows how much two users who measured n batches each would agree:

- Spearman rank correlation of the two score vectors over all candidate entries (average ranks for ties);
- top-k overlap |A ∩ B| / k of the two top-k entry sets at the budgets below (what the global top-k allocates);
- the Pearson correlation of the per-matrix counts of top-k entries (what SPT's α rule turns into LoRA/adapter);
- the overlap of the two per-row plans at 1 % and 2 % (`allocate(..., allocation="per_row")`, the product's default
  plan: every output row its top-k entries), the entry sets the default actually trains.

With ``--random-head`` the same pool is also measured with the seeded random head (SPT's original), and the table
says how far a random head's ranking is from the probe's (16 batches of 32 each, SPT's setting).

Writes benchmarks/results/stability_<backbone>_<task>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch.utils.data import DataLoader

from benchmarks.protocol import BACKBONES, MALLOC_ENV, PROBE_EPOCHS, SENS_BATCH_SIZE
from benchmarks.task_data import task_source
from spt_core.api import (
    SPT_RULE,
    Augment,
    Candidate,
    Sensitivity,
    allocate,
    create_model,
    find_candidates,
    fit_probe,
    load_dataset_info,
    make_loaders,
    measure_sensitivity,
    prepare,
)
from spt_core.data.loaders import BalancedSampler

RESULTS = Path(__file__).resolve().parent / "results"

BUDGETS = (0.005, 0.01, 0.02, 0.04)  # top-k fractions of the candidate entries
PER_ROW_BUDGETS = (0.01, 0.02)  # the per-row plan's budgets, fractions of the candidate entries


def per_batch_scores(
    model: torch.nn.Module, dataset: Any, pool: int, seed: int
) -> tuple[np.ndarray, dict[str, Candidate]]:
    """(pool, entries) float32: g² of every candidate entry on each class-balanced batch (the candidates' order);
    the candidates."""
    cands = find_candidates(model)
    loader = DataLoader(dataset, batch_size=SENS_BATCH_SIZE, sampler=BalancedSampler(dataset.labels, seed))
    rows = []
    for k, batch in enumerate(loader):
        if k == pool:
            break
        sens = measure_sensitivity(model, [batch], batches=1, device="cpu", candidates=cands)
        rows.append(torch.cat([sens.scores[n].reshape(-1) for n in cands]).numpy())
    if len(rows) < pool:
        raise SystemExit(f"--pool {pool}: the training split has only {len(rows)} batches of {SENS_BATCH_SIZE}")
    return np.stack(rows), cands


def per_row_entries(scores: np.ndarray, cands: dict[str, Candidate], frac: float) -> np.ndarray:
    """Flat indices (into `scores`, the candidates' order) of the entries the per-row plan trains at `frac` of
    the candidate entries: the product's own rule, `allocate(..., structured="none", allocation="per_row")`."""
    split, offsets, start = {}, {}, 0
    for n, c in cands.items():
        split[n], offsets[n] = torch.from_numpy(scores[start : start + c.numel]).reshape(c.shape), start
        start += c.numel
    plan = allocate(Sensitivity(split, cands, {"backbone_params": start}), max(1, int(frac * start)),
                    **{**SPT_RULE, "structured": "none", "allocation": "per_row"})  # fmt: skip
    return np.concatenate([plan.indices[n].numpy() + offsets[n] for n in plan.indices])


def agreement(
    a: np.ndarray, b: np.ndarray, sizes: list[int], cands: dict[str, Candidate] | None = None
) -> dict[str, float]:
    """Spearman of the two score vectors, top-k overlap and per-matrix top-k count correlation per budget; with
    the candidates, also the overlap of the two per-row plans (`per_row@f`)."""
    out = {"spearman": float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])}
    for f in PER_ROW_BUDGETS if cands else ():
        ra, rb = per_row_entries(a, cands, f), per_row_entries(b, cands, f)
        out[f"per_row@{f:g}"] = len(np.intersect1d(ra, rb, assume_unique=True)) / len(ra)
    bounds = np.cumsum([0, *sizes])
    for f in BUDGETS:
        k = max(1, int(f * len(a)))
        ta, tb = np.argpartition(-a, k)[:k], np.argpartition(-b, k)[:k]
        out[f"overlap@{f:g}"] = len(np.intersect1d(ta, tb, assume_unique=True)) / k
        ca, cb = np.histogram(ta, bounds)[0], np.histogram(tb, bounds)[0]
        out[f"matrix_r@{f:g}"] = float(np.corrcoef(ca, cb)[0, 1])
    return out


def bootstrap(g2: np.ndarray, cands: dict[str, Candidate], ns: list[int], reps: int, seed: int) -> list[dict[str, Any]]:
    """`agreement` of two disjoint draws of n batches each (`reps` draws per n), averaged, with its 5th percentile."""
    rng, rows, sizes = np.random.default_rng(seed), [], [c.numel for c in cands.values()]
    for n in ns:
        draws = []
        for _ in range(reps):
            pick = rng.choice(len(g2), size=2 * n, replace=False)
            draws.append(agreement(g2[pick[:n]].sum(0), g2[pick[n:]].sum(0), sizes, cands))
        keys = draws[0].keys()
        rows.append({"batches": n, "images": n * SENS_BATCH_SIZE, "reps": reps,
                     **{k: float(np.mean([d[k] for d in draws])) for k in keys},
                     **{f"{k}_p05": float(np.percentile([d[k] for d in draws], 5)) for k in keys}})  # fmt: skip
        print(f"n={n}: spearman {rows[-1]['spearman']:.3f}, overlap@0.01 {rows[-1]['overlap@0.01']:.3f}", flush=True)
    return rows


def _model(name: str, weights: str, img: int, n_classes: int, seed: int) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(seed)  # the seeded random head, as the product builds it
    return create_model(name, n_classes, weights=weights, img_size=img)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="lite0", help=f"preset: {', '.join(BACKBONES)}")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--pool", type=int, default=32, help="batches measured one by one (2n <= pool)")
    ap.add_argument("--ns", default="1,2,4,8,16", help="batches per measurement")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-head", action="store_true", help="also compare SPT's random head with the probe's")
    ap.add_argument(
        "--augmented", action="store_true", help="also measure the same batches augmented (spt_core.data.Augment)"
    )
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-compare").expanduser())
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    if 2 * max(ns) > args.pool:
        raise SystemExit(f"--ns {args.ns}: the largest n needs 2n <= --pool ({args.pool}) distinct batches")
    torch.set_num_threads(args.threads)
    name, weights, img = BACKBONES[args.backbone]
    data_dir = args.work_dir / "data" / f"{args.task}_{args.n_train}_{args.n_val}_0"
    if not (data_dir / "dataset.json").is_file():
        prepare(task_source(args.task, args.work_dir, args.n_train + args.n_val + 2000), data_dir,
                n_train=args.n_train, n_val=args.n_val, n_test=None, seed=0, split=None, ok_class=None)  # fmt: skip
    n_classes = len(load_dataset_info(data_dir).class_names)
    t0 = time.perf_counter()
    model, info = _model(name, weights, img, n_classes, args.seed)
    loaders = make_loaders(data_dir, info.preprocess, batch_size=SENS_BATCH_SIZE, seed=args.seed)
    probe = fit_probe(model, loaders, epochs=PROBE_EPOCHS, seed=args.seed, device="cpu", select="accuracy")
    g2, cands = per_batch_scores(model, loaders["train"].dataset, args.pool, args.seed)
    measure_s = time.perf_counter() - t0
    sizes = [c.numel for c in cands.values()]
    rows = bootstrap(g2, cands, ns, args.reps, args.seed)
    heads = None
    if args.random_head:
        m = min(16, args.pool)
        rnd, _ = _model(name, weights, img, n_classes, args.seed)  # same seed: the head the probe started from
        g2r, _ = per_batch_scores(rnd, loaders["train"].dataset, m, args.seed)
        heads = {"batches": m, **agreement(g2[:m].sum(0), g2r.sum(0), sizes, cands)}
    augmented = None
    if args.augmented:  # the same images in the same order, through the training augmentation
        m = min(16, args.pool)
        aug = make_loaders(data_dir, info.preprocess, batch_size=SENS_BATCH_SIZE, seed=args.seed, augment=Augment())
        torch.manual_seed(args.seed)
        random.seed(args.seed)  # timm's RandomResizedCrop draws from `random`
        g2a, _ = per_batch_scores(model, aug["train"].dataset, m, args.seed)
        augmented = {"batches": m, **agreement(g2[:m].sum(0), g2a.sum(0), sizes, cands)}
    result = {"backbone": args.backbone, "model": name, "img_size": img, "task": args.task, "data_dir": str(data_dir),
              "entries": int(g2.shape[1]), "matrices": len(cands), "pool": args.pool, "batch_size": SENS_BATCH_SIZE,
              "probe_val_acc": probe.val_acc, "measure_seconds": round(measure_s, 1), "rows": rows, "heads": heads,
              "augmented": augmented,
              "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
              "command": " ".join([*(f"{k}={v}" for k, v in MALLOC_ENV.items()), "python benchmarks/stability.py",
                                   *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    out = args.out_dir / f"stability_{args.backbone}_{args.task}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(report(result))
    print(out.with_suffix(".md").read_text())
    return out.with_suffix(".md")


def report(r: dict[str, Any]) -> str:
    lines = [f"# Sensitivity stability: {r['model']} @ {r['img_size']} px on {r['task']}", "",
             f"Command: `{r['command']}`", "",
             f"{r['entries']:,} candidate entries in {r['matrices']} tensors; a pool of {r['pool']} class-balanced "
             f"training batches of {r['batch_size']} measured one by one after a linear-probe head (val "
             f"{100 * r['probe_val_acc']:.1f} %). For n batches: two disjoint sets of n batches from the pool, "
             f"{r['rows'][0]['reps']} draws; mean (5th percentile) of the agreement of their two Σg² measurements. "
             f"Machine: {r['machine']}; {r['measure_seconds']} s for the probe and the pool.", "",
             "| batches | images | Spearman (all entries) | top-0.5 % overlap | top-1 % overlap | top-2 % overlap | "
             "top-4 % overlap | per-tensor top-2 % count r | per-row plan 1 % overlap | per-row plan 2 % overlap |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["rows"]:
        cell = lambda k, x=x: f"{x[k]:.3f} ({x[k + '_p05']:.3f})"  # noqa: E731
        lines.append(f"| {x['batches']} | {x['images']} | {cell('spearman')} | {cell('overlap@0.005')} | "
                     f"{cell('overlap@0.01')} | {cell('overlap@0.02')} | {cell('overlap@0.04')} | "
                     f"{cell('matrix_r@0.02')} | {cell('per_row@0.01')} | {cell('per_row@0.02')} |")  # fmt: skip
    if r.get("heads"):
        h = r["heads"]
        lines += ["", f"Random head (SPT's original) vs the probe head, {h['batches']} batches each (16 x 32: SPT's "
                  f"setting), the same batches: Spearman {h['spearman']:.3f}, top-1 % overlap "
                  f"{h['overlap@0.01']:.3f}, top-2 % overlap {h['overlap@0.02']:.3f}, "
                  f"per-tensor top-2 % count r {h['matrix_r@0.02']:.3f}, per-row plan 1 % / 2 % overlap "
                  f"{h['per_row@0.01']:.3f} / {h['per_row@0.02']:.3f}."]  # fmt: skip
    if r.get("augmented"):
        a = r["augmented"]
        lines += ["", f"Augmented vs plain batches (the same {a['batches']} batches, the same probe head, through "
                  f"`spt_core.data.Augment`): Spearman {a['spearman']:.3f}, top-1 % overlap {a['overlap@0.01']:.3f}, "
                  f"top-2 % overlap {a['overlap@0.02']:.3f}, per-tensor top-2 % count r {a['matrix_r@0.02']:.3f}, "
                  f"per-row plan 1 % / 2 % overlap {a['per_row@0.01']:.3f} / {a['per_row@0.02']:.3f}. "
                  f"For scale: the {a['batches']}-batch row above (two disjoint sets of plain batches)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
