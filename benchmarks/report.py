"""The tables of `benchmarks/compare.py`: aggregate its rows, write the markdown + plot, pick learning rates.

summarize(state)        per method at the main budget: rows at the chosen lr, means over seeds
write_report(state, s)  s.md (main table, sensitivity pass, budget curve) and s.png (accuracy vs trainable
                        values across budgets; training memory per method)
write_any_report        the same for any results JSON (an `--imbalance` table: `imbalance.write_imbalance_report`)
summary_metrics(state)  the headline numbers as MLflow metrics
chosen_lr(rows, m, b)   the seed-0 lr with the best validation accuracy
budget_on_val(state, m) per seed, the rung `spt_core.budget.choose_rung` picks among m's budgets (and full)
rows_tied_without_loss  the rows whose missing val_loss leaves such a choice to the old tie-break
rows_without_loss       every row a table's numbers rest on that recorded no val_loss (one rule for every method)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from benchmarks.methods import GAP_METHODS, METHODS
from benchmarks.product_report import product_lines
from benchmarks.search_job import NAMES, SEARCH_METHODS
from benchmarks.spread import mean as _mean
from benchmarks.spread import stat as _stat
from spt_core.api import FULL, Rung, choose_rung
from spt_core.portable.io import atomic_path
from spt_core.portable.metrics import best_by_selection, tied_at_best


def summarize(state: dict) -> list[dict]:
    """Per method at the main budget: its rows at the lr chosen on seed-0 validation, aggregated over seeds."""
    rows, budget = state["rows"], state["meta"]["budget"]
    out = []
    for m in (*METHODS, *SEARCH_METHODS, *GAP_METHODS):
        lr = chosen_lr(rows, m, budget)
        if lr is None:
            continue
        sel = [r for r in rows if r["method"] == m and r["budget"] == budget and r["lr"] == lr and "error" not in r]
        mem_key = "train_overhead_mb" if sel[0].get("train_overhead_mb") is not None else "peak_memory_mb"
        # the best measurement the rows have: peak reset after loading + heap trimmed, else peak reset only
        exact = [r for r in sel if r.get("overhead_peak") == "vmhwm_reset_trim"] or [
            r for r in sel if r.get("overhead_peak") == "vmhwm_reset"
        ]
        grid = [r for r in rows if r["method"] == m and r["budget"] == budget and r["seed"] == 0 and "error" not in r]
        out.append({
            "method": m, "lr": lr, "rows": sel, "seeds": sorted(r["seed"] for r in sel),
            "grid": {r["lr"]: r["val_acc"] for r in grid}, "trainable": sel[0]["trainable_backbone"],
            "head": sel[0]["trainable_head"], "pct": sel[0]["trainable_pct"], "details": sel[0]["details"],
            "mem": _mean([r[mem_key] for r in exact or sel]),
            "mem_exact": bool(exact) or mem_key != "train_overhead_mb",
            "peak": _mean([r["peak_memory_mb"] for r in sel]),
            "s_epoch": _mean([r["s_per_train_epoch"] for r in sel]), "wall": _mean([r["wall_s"] for r in sel]),
            "test": _mean([r["test_acc"] for r in sel]),
        })  # fmt: skip
    return out


def mean_accuracy(state: dict, split: str, seeds: int | None = None) -> dict[str, float]:
    """method -> mean accuracy % over its seeds on `split` ("val" or "test") at the main budget and chosen lr;
    with `seeds`, only the methods that have exactly that many."""
    key = f"{split}_acc"
    return {s["method"]: 100 * sum(r[key] for r in s["rows"]) / len(s["rows"])
            for s in summarize(state) if seeds is None or len(s["rows"]) == seeds}  # fmt: skip

def budget_on_val(
    state: dict, method: str, full_at_method_lr: bool = False, with_full: bool = True
) -> list[dict]:  # fmt: skip
    """Per seed: the row `choose_rung` picks among `method`'s budgets (each at the lr chosen at the main budget)
    and, `with_full`, full fine-tuning (at its own chosen lr; `full_at_method_lr`: at the method's, as the product's
    ladder trains every rung at `train.lr`), on validation accuracy. The ladder is the budgets every seed ran (a
    budget only some seeds ran is left out), and a seed needs every rung of it (and a full row, `with_full`).

    Without the full rung this is the method's own number; a ladder that ends in full fine-tuning is another method
    (on a table where full fine-tuning wins on validation it mostly picks the comparator's own row)."""
    rows, main = state["rows"], state["meta"]["budget"]
    lr = chosen_lr(rows, method, main)
    lr_full = lr if full_at_method_lr else chosen_lr(rows, "full", main)
    ok = [r for r in rows if "error" not in r and r.get("variant", "none") == "none"]
    mine = [r for r in ok if r["method"] == method and r["lr"] == lr]
    full = {r["seed"]: r for r in ok if r["method"] == "full" and r["lr"] == lr_full and r["budget"] == main}
    seeds = {r["seed"] for r in mine if r["budget"] == main}
    seeds = sorted(seeds & set(full) if with_full else seeds)
    ran = [{r["budget"]: r for r in mine if r["seed"] == seed} for seed in seeds]
    common = set.intersection(*(set(b) for b in ran)) if ran else set()
    if len(common) < 2:
        return []
    ladder = sorted(common, key=lambda b: ran[0][b]["trainable_backbone"])
    out = []
    for seed, rungs in zip(seeds, ran):
        cands = {b: rungs[b] for b in ladder} | ({FULL: full[seed]} if with_full else {})
        pick = choose_rung([Rung(b, r["trainable_backbone"], r["val_acc"], val_loss=r.get("val_loss"))
                            for b, r in cands.items()])  # fmt: skip
        out.append({"seed": seed, "budget": pick.budget, "row": cands[pick.budget], "ladder": list(cands),
                    "candidates": cands})  # fmt: skip
    return out


def ladders(state: dict) -> Iterator[tuple[str, str, list[dict]]]:
    """(method, its name in a table, `budget_on_val` picks) of every method with a ladder: its own budgets (the
    method's number), then, as other methods, the ladder ending in full fine-tuning at full fine-tuning's own lr
    (``m + full``) and at the method's lr (the product's ladder, ``m + full at lr X``) where that is another lr."""
    lr_full = chosen_lr(state["rows"], "full", state["meta"]["budget"])
    for m in METHODS:
        own = budget_on_val(state, m, with_full=False)
        if own:
            yield m, m, own
        for same_lr in (False, True):
            picks = budget_on_val(state, m, full_at_method_lr=same_lr)
            at = picks[0]["candidates"][FULL]["lr"] if picks else None
            if picks and not (same_lr and at == lr_full):
                yield m, f"{m} + full" + (f" at lr {at:g}" if same_lr else ""), picks


def rows_tied_without_loss(state: dict) -> list[dict]:
    """The rows a budget-on-val choice needs a validation loss from: per method and seed (full rung at its own lr
    or at the method's), the candidates tied at the best validation accuracy when some of them lack `val_loss`
    (rows made before they recorded it). Until they have one, `choose_rung` breaks that tie by the fewer values,
    not by the product's lower loss."""
    out: dict[int, dict] = {}
    for _, _, picks in ladders(state):
        for pick in picks:
            top = tied_at_best(list(pick["candidates"].values()), lambda r: r["val_acc"])
            if len(top) > 1:
                out.update({id(r): r for r in top if r.get("val_loss") is None})
    return list(out.values())


def rows_without_loss(state: dict) -> list[dict]:
    """The rows a table's numbers rest on that recorded no val_loss, of every method alike: each method's seed-0
    rows at the main budget (its lr choice), its rows at the chosen lr (every seed), and the candidates of every
    budget-on-val choice. Made before rows recorded a loss, they chose their epoch (and tied lrs and rungs) by the
    old tie-break; re-run, every choice in the table is the product's (`best_by_selection`)."""
    budget, out = state["meta"]["budget"], {}
    grid = [r for r in state["rows"] if r["seed"] == 0 and r["budget"] == budget and "error" not in r]
    for r in [*grid, *(r for s in summarize(state) for r in s["rows"])]:
        out[id(r)] = r
    for _, _, picks in ladders(state):
        out.update({id(r): r for pick in picks for r in pick["candidates"].values()})
    return [r for r in out.values() if r.get("val_loss") is None and r.get("kind", "train") == "train"]


def write_report(state: dict, stem: Path) -> None:
    """stem.md (tables) and stem.png (accuracy vs trainable values; training memory per method)."""
    meta, summ = state["meta"], summarize(state)
    by = {s["method"]: s for s in summ}
    mem_name = "train overhead MB (peak RSS - RSS before fit)" if meta["device"] == "cpu" else "peak CUDA MB"
    linear = by["linear"]["rows"] if "linear" in by else []  # the product block's yardstick
    lines = _header_lines(state, mem_name) + _method_lines(summ, by) + product_lines(state, linear)
    lines += _note_lines(state, summ)
    lines += _sensitivity_lines(state, by) + _curve_lines(state, summ) + _budget_on_val_lines(state, by)
    lines += _search_lines(state, by)
    lines += ["", f"Raw numbers: `{stem.name}.json`; plot: `{stem.name}.png`."]
    with atomic_path(stem.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if summ:
        _plot(state, summ, stem.with_suffix(".png"), mem_name)


def _header_lines(state: dict, mem_name: str) -> list[str]:
    """Title, command, machine, protocol and the main table's header."""
    meta = state["meta"]
    lines = [
        f"# {meta['backbone']} @ {meta['img_size']} px on {meta['task']}: methods at equal budget {meta['budget']}",
        "", f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']}; {meta['threads']} threads"
        + (f", {meta['parallel']} runs at a time (sharing the machine)" if meta.get("parallel", 1) > 1 else "")
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f". Date: {meta['date']}.", "",
        *_machines_line(state),
        f"Protocol: {meta['n_train']} train / val / test from `{meta['data_dir']}`, {meta['epochs']} epochs, batch "
        f"{meta['batch']}, AdamW + cosine (`TrainConfig.scaled`), epoch chosen on validation only, test evaluated "
        "once at that epoch. "
        + ("Every method trains on augmented images (`spt_core.data.Augment`). " if meta.get("augment") else "")
        + "BatchNorm statistics frozen for every method (full fine-tuning too). lr chosen per "
        "method on seed-0 validation accuracy, then used for the other seeds. Accuracy: mean ± half range over "
        "seeds. Each (method, seed, lr) ran in its own process.", "",
        f"| method | lr (grid: val %) | trainable backbone | % | head | val % | test % | seeds | {mem_name} "
        "| x full | x peft-lora | peak MB | s/train epoch | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    return lines


def _method_lines(summ: list[dict], by: dict) -> list[str]:
    """One row per method at the main budget (`summarize`), memory also as a ratio to full FT and peft LoRA."""
    lines = []
    full, lora = by.get("full"), by.get("peft-lora")
    for s in summ:
        grid = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in sorted(s["grid"].items()))
        name = NAMES.get(s["method"], s["method"]) + (f" (r={s['details']['rank']})" if "rank" in s["details"] else "")
        rf = f"{s['mem'] / full['mem']:.2f}" if full and full["mem"] else "-"
        rl = f"{s['mem'] / lora['mem']:.2f}" if lora and lora["mem"] else "-"
        lines.append(
            f"| {name} | {s['lr']:g} ({grid}) | {s['trainable']:,} | {s['pct']:.2f} | {s['head']:,} | "
            f"{_stat([r['val_acc'] for r in s['rows']], 100)} | {_stat([r['test_acc'] for r in s['rows']], 100)} | "
            f"{len(s['seeds'])} | {s['mem']:.0f}{'' if s['mem_exact'] else '*'} | "
            f"{rf} | {rl} | {s['peak']:.0f} | {s['s_epoch']:.1f} | "
            f"{s['wall']:.0f} |"
        )
    return lines


def _note_lines(state: dict, summ: list[dict]) -> list[str]:
    """The caveats of older memory measurements, the plans' composition and the failed runs."""
    lines: list[str] = []
    if any(not s["mem_exact"] for s in summ):
        lines += ["", "\\* upper bound: these runs predate the peak reset, so their peak is the process lifetime's "
                  "(ru_maxrss), which includes the weight-load spike (~80 MB above the loaded RSS for ViT-S). "
                  "Unstarred: peak RSS (VmHWM) reset after loading the weights, i.e. over `fit` only."]  # fmt: skip
    if any(r.get("overhead_peak") == "vmhwm_reset" for r in state["rows"]):
        lines += ["", "Caveat: rows marked `vmhwm_reset` in the JSON measured the baseline without `malloc_trim`, so "
                  "freed-but-retained heap pages (the weight file, and for SPT methods the score file, freed before "
                  "`fit`; glibc keeps them with the malloc variables set) are reused by training before RSS grows: "
                  "overheads smaller than that garbage (~90-180 MB for ViT-S) read too low. Compare such small "
                  "overheads as 'small', not by their ratio; the harness now trims first "
                  "(`vmhwm_reset_trim`)."]  # fmt: skip
    kinds = [f"{s['method']}: {s['details']['by_kind']}" for s in summ if "by_kind" in s["details"]]
    if kinds:
        lines += ["", "Plan composition (trainable values by tuner kind): " + "; ".join(kinds) + "."]
    errors = [r for r in state["rows"] if "error" in r]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(f"{r['method']} seed {r['seed']} lr {r['lr']}: {r['error']}"
                                                   for r in errors)]  # fmt: skip
    return lines


def _sensitivity_lines(state: dict, by: dict) -> list[str]:
    """The sensitivity passes: their time against one training epoch on as many images."""
    meta, lines = state["meta"], []
    sens = state.get("sensitivity", [])
    if sens:
        n_img, n_train = meta["sens_images"], meta["n_train"]
        lines += ["", f"Sensitivity pass ({n_img} training images, one forward+backward per batch of 32; head "
                  "fitted first by a linear probe on cached features):", "",
                  "| seed | probe s | sensitivity s | peak MB | vs 1 full-FT epoch, same images | vs sparse-only |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in sens:
            if "error" in r:
                lines.append(f"| {r.get('seed')} | failed: {r['error']} | | | | |")
                continue
            ratios = []
            for m in ("full", "sparse-only"):
                s = by.get(m)
                n_img = r["images"]  # the epoch's time scaled to the images the sensitivity pass saw
                ratios.append(f"{r['seconds'] / (s['s_epoch'] * n_img / n_train):.2f}x" if s and s["s_epoch"] else "-")
            seed = f"{r['seed']} (with the stem)" if r.get("include_stem") else r["seed"]
            lines.append(f"| {seed} | {r['probe_seconds']:.1f} | {r['seconds']:.1f} | {r['peak_memory_mb']:.0f} | "
                         f"{ratios[0]} | {ratios[1]} |")  # fmt: skip
    return lines


def _curve_lines(state: dict, summ: list[dict]) -> list[str]:
    """The rows at other budgets than the main one, beside the main budget's rows of the same (method, seed)."""
    meta, lines = state["meta"], []
    curve = [r for r in state["rows"] if r["budget"] != meta["budget"] and "error" not in r]
    if curve:
        lines += ["", "Budget curve (each method at its chosen lr unless the lr column says otherwise; one row per "
                  "seed):", "", "| budget | method | seed | lr | trainable backbone | val % | test % |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        seeds = {(c["method"], c["seed"]) for c in curve}
        pts = curve + [r for s in summ for r in s["rows"] if (s["method"], r["seed"]) in seeds]
        for r in sorted(pts, key=lambda r: (r["method"], r["trainable_backbone"], r["seed"])):
            lines.append(f"| {r['budget']} | {r['method']} | {r['seed']} | {r['lr']:g} | {r['trainable_backbone']:,} | "
                         f"{100 * r['val_acc']:.2f} | "
                         f"{100 * r['test_acc']:.2f} |")  # fmt: skip
    return lines


def write_any_report(state: dict, stem: Path) -> None:
    """stem.md/.png of a results JSON: the imbalanced-line report when its meta records `imbalance`, else the
    method table."""
    if state["meta"].get("imbalance") is not None:
        from benchmarks.imbalance import write_imbalance_report

        write_imbalance_report(state, stem)
    else:
        write_report(state, stem)


def _budget_on_val_lines(state: dict, by: dict) -> list[str]:
    """The budget chosen on validation (`budget_on_val`) per method with a ladder, against full and peft LoRA: the
    method's own ladder first, then the ladders that end in full fine-tuning."""
    lines: list[str] = []
    for _, name, picks in ladders(state):
        if not lines:
            lines += ["", "Budget chosen on validation (`spt_core.budget.choose_rung`, as `plan.budget: auto`): per "
                      "seed the rung with the best validation accuracy (ties: the lower validation loss where every "
                      "tied row records one, then the fewer values); test % of the chosen rung. A method's own row "
                      "chooses among its budgets only: that is its number. \"+ full\": the ladder ends in full "
                      "fine-tuning, as the product's `plan.budget: auto` does, another method (where full "
                      "fine-tuning wins on validation it picks the comparator's own row); \"at lr\": the full rung "
                      "trained at the method's lr, as the product trains every rung at `train.lr`.", "",
                      "| method | ladder | chosen per seed | test % | seeds | vs full, points | vs peft-lora |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
        test = _mean([p["row"]["test_acc"] for p in picks])
        d = [f"{100 * (test - by[o]['test']):+.2f}" if o in by and by[o]["test"] is not None else "-"
             for o in ("full", "peft-lora")]  # fmt: skip
        lines.append(
            f"| {name} | {', '.join(picks[0]['ladder'])} | {', '.join(p['budget'] for p in picks)} | "
            f"{_stat([p['row']['test_acc'] for p in picks], 100)} | {len(picks)} | {d[0]} | {d[1]} |"
        )
    return lines


def _search_lines(state: dict, by: dict) -> list[str]:
    """The searches (`benchmarks.search_job`) per seed: the (budget, lr) chosen on validation, its val and test %,
    the cost in trainings, and the wall time against one fixed-budget training (the per-row-sparse row of the same
    seed at the main budget, at its chosen lr)."""
    rows = [r for r in state["rows"] if r.get("method") in SEARCH_METHODS and "error" not in r]
    if not rows:
        return []
    fixed = {r["seed"]: r["wall_s"] for r in by["per-row-sparse"]["rows"]} if "per-row-sparse" in by else {}
    lines = ["", "Budget and lr searched on validation by successive halving (`plan.search: halving`, "
             "`benchmarks/search_job.py`): the product's `plan.ladder` (full: every candidate value, as `sensitune "
             "train` trains it) x `train.lr_grid` around the row's lr, the trials' runs paused and continued, pruned "
             "on validation only. Trainings: the trials' optimizer steps over one training's. x fixed: the search's "
             "wall time over the per-row-sparse row's of the same seed (one training at the main budget).", "",
             "| method | seed | lr | chosen budget | chosen lr | val % | test % | trainings | wall s | x fixed |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"], r["lr"])):
        d = r["details"]
        ratio = f"{r['wall_s'] / fixed[r['seed']]:.2f}" if fixed.get(r["seed"]) else "-"
        lines.append(f"| {NAMES.get(r['method'], r['method'])} | {r['seed']} | {r['lr']:g} | {d['chosen_budget']} | "
                     f"{d['chosen_lr']:.3g} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} | "
                     f"{r['trainings']:.2f} | {r['wall_s']:.0f} | {ratio} |")  # fmt: skip
    return lines


def _machines_line(state: dict) -> list[str]:
    """When rows of a resumed table ran elsewhere (another machine, another --parallel), say where."""
    where: dict[str, int] = {}
    for r in state["rows"]:
        if r.get("machine") and "error" not in r:
            label = f"{r['machine']}, {r.get('parallel', 1)} at a time"
            where[label] = where.get(label, 0) + 1
    here = f"{state['meta']['machine']}, {state['meta'].get('parallel', 1)} at a time"
    if not where or set(where) == {here}:
        return []
    return ["Rows ran on: " + "; ".join(f"{k} ({n} rows)" for k, n in where.items()) + ".", ""]


def _plot(state: dict, summ: list[dict], path: Path, mem_name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the tables are what matter
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in summ:
        xs = [r["test_acc"] * 100 for r in s["rows"]]
        x = max(s["trainable"], 1)
        ax.errorbar([x], [sum(xs) / len(xs)], yerr=[(max(xs) - min(xs)) / 2], fmt="o", capsize=3, label=s["method"])
        pts = sorted(
            (r["trainable_backbone"], r["test_acc"] * 100)
            for r in state["rows"]
            if r.get("method") == s["method"] and r["seed"] == 0 and r["lr"] == s["lr"] and "error" not in r
        )
        if len(pts) > 1:
            ax.plot(*zip(*pts), "--", color=ax.lines[-1].get_color() if ax.lines else None, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable backbone values (head excluded; linear probe plotted at 1)")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.bar([s["method"] for s in summ], [s["mem"] for s in summ])
    bx.set_ylabel(mem_name, fontsize=8)
    bx.tick_params(axis="x", rotation=45, labelsize=8)
    m = state["meta"]
    fig.suptitle(f"{m['backbone']} @ {m['img_size']} px, {m['task']}, budget {m['budget']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_metrics(state: dict) -> dict[str, float]:
    """The table's headline numbers per method, as MLflow metrics (``test_acc.spt-lora``, ``memory_mb.full``)."""
    out: dict[str, float] = {}
    for s in summarize(state):
        m = s["method"]
        val = _mean([r["val_acc"] for r in s["rows"]])
        out.update({
            f"test_acc.{m}": s["test"], f"val_acc.{m}": val, f"trainable_backbone.{m}": s["trainable"],
            f"memory_mb.{m}": s["mem"], f"s_per_train_epoch.{m}": s["s_epoch"], f"lr.{m}": s["lr"],
        })  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def chosen_lr(rows: list[dict], method: str, budget: str, variant: str = "none") -> float | None:
    """The seed-0 learning rate `best_by_selection` ranks first on validation accuracy (then the lower validation
    loss where every tied row has one, as the product ranks epochs and rungs); ties: the smaller lr, whatever
    order ran."""
    cands = [r for r in rows if r.get("method") == method and r["seed"] == 0 and r["budget"] == budget
             and "error" not in r and r.get("variant", "none") == variant]  # fmt: skip
    if not cands:
        return None
    return best_by_selection(cands, lambda r: r["val_acc"], lambda r: r.get("val_loss"), lambda r: -r["lr"])["lr"]
