"""The product block of a method table: `sensitune run` with the shipped defaults (`benchmarks/product.py`), per seed
and over seeds, against the table's linear probe and against the probe the product fits itself.

A product row (``state["product"]``, beside the harness's ``rows``) holds what the run's metrics.json says of the
model it kept: ``val_acc``, ``val_score``, ``test_acc``, ``test_balanced_acc``, the product's own linear probe
(``probe_val_score``, ``probe_test_acc``, ``probe_test_balanced_acc``), the ``outcome`` (``model``: the tuned model;
``probe``: the probe exported, ``train.below_probe: export_probe``; ``stopped``: ``train.below_probe: stop``) and the
run's ``wall_s``.

On a line table (``--imbalance``) the gaps are in test balanced accuracy, elsewhere in test accuracy. The gap to
the table's linear probe is the difference of the two published means (the product's seeds, the table's linear
seeds at its chosen lr); per seed, the table's linear row of that seed where there is one.
"""

from __future__ import annotations

from benchmarks.spread import mean, signed, stat

# the block's number columns (header -> row key), in %: the kept model's, then the product's own probe's
COLUMNS = {"val %": "val_acc", "val score %": "val_score", "test %": "test_acc", "test bal. acc %": "test_balanced_acc",
           "probe val score %": "probe_val_score", "probe test %": "probe_test_acc",
           "probe test bal. acc %": "probe_test_balanced_acc"}  # fmt: skip
OUTCOMES = {"model": "model", "probe": "probe exported", "stopped": "stopped"}  # outcome -> the block's words


def gap_metric(state: dict) -> str:
    """The test metric the product is compared on: balanced accuracy on a line table, else accuracy."""
    return "test_balanced_acc" if state["meta"].get("imbalance") is not None else "test_acc"


def product_gaps(state: dict, linear_rows: list[dict]) -> dict[str, float | None]:
    """Points (100 x) of the product's mean test metric over the table's linear probe's mean (``linear``) and over
    the mean of the product's own probes (``own_probe``); None where either side has no number."""
    key = gap_metric(state)
    rows = [r for r in state.get("product", []) if "error" not in r]
    ours = mean([r.get(key) for r in rows])
    theirs, own = mean([r.get(key) for r in linear_rows]), mean([r.get(f"probe_{key}") for r in rows])
    return {"linear": _gap(ours, theirs), "own_probe": _gap(ours, own)}


def _gap(ours: float | None, theirs: float | None) -> float | None:
    """Points, rounded off the float32 noise of a probe's accuracy (0.9447929859 vs 0.9447929737: no gap)."""
    return None if ours is None or theirs is None else round(100 * (ours - theirs), 4) + 0.0


def outcome_counts(rows: list[dict]) -> str:
    """``model 2, probe exported 1`` (failed runs too), in the order of `OUTCOMES`."""
    n = {k: sum(r.get("outcome") == k for r in rows if "error" not in r) for k in OUTCOMES}
    n_failed = sum("error" in r for r in rows)
    parts = [f"{OUTCOMES[k]} {v}" for k, v in n.items() if v] + ([f"failed {n_failed}"] if n_failed else [])
    return ", ".join(parts) or "-"


def _outcome(r: dict) -> str:
    """The seed's outcome; where the probe replaced the tuned model, the tuned model's own val score and test."""
    t = r.get("tuned")
    tuned = f" (tuned: val score {stat([t.get('val_score')], 100)}, test {stat([t.get('test_acc')], 100)})" if t else ""
    return OUTCOMES.get(r["outcome"], r["outcome"]) + tuned


def product_lines(state: dict, linear_rows: list[dict]) -> list[str]:
    """The block's markdown lines (none without product rows): what ran, one row per seed, the means, and a
    sentence when the product misses a probe on test."""
    rows = sorted(state.get("product", []), key=lambda r: r["seed"])
    if not rows:
        return []
    key = gap_metric(state)
    ok = [r for r in rows if "error" not in r]
    lin = {r["seed"]: r.get(key) for r in linear_rows}
    name = "test bal. acc" if key == "test_balanced_acc" else "test"
    first = rows[0]
    sides = " / ".join(map(str, sorted({r["input_size"] for r in rows if r.get("input_size")}))) or "-"
    lines = ["", "Product (`sensitune run` defaults): the shipped defaults (params.yaml / `pipelines.config`: "
             f"{sides} px, train.lr, train.epochs, plan.budget, train.below_probe) on this table's "
             f"own train/val/test images, changing only {', '.join(f'`{k}`' for k in first.get('overrides', {}))}; "
             "one fresh project per seed, `sensitune run` as a subprocess (`benchmarks/product.py`). Probe: the "
             "linear probe the run fits itself (`train.probe_baseline`); val score: `train.select` "
             f"({first.get('select')}) on validation, what `train.below_probe` compares. Gaps in {name} points; "
             f"wall: the whole `{first.get('stages', 'sensitune run')}`.", "",
             f"Command (seed {first['seed']}): `{first.get('command', '-')}`", "",
             "| seed | outcome | " + " | ".join(COLUMNS) + f" | {name} − linear (table) | {name} − probe (own) | "
             "wall s |", "|---" * (len(COLUMNS) + 5) + "|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seed']} | failed: {r['error']} |" + " |" * (len(COLUMNS) + 2) + f" {r['wall_s']} |")
            continue
        own = r.get(f"probe_{key}")
        gaps = [_gap(r[key], lin.get(r["seed"])), _gap(r[key], own)]
        cells = [stat([r.get(k)], 100) for k in COLUMNS.values()] + [signed(g) for g in gaps]
        lines.append(f"| {r['seed']} | {_outcome(r)} | {' | '.join(cells)} | {r['wall_s']:.0f} |")
    gaps = product_gaps(state, linear_rows)
    cells = [stat([r.get(k) for r in ok], 100) for k in COLUMNS.values()] + [signed(g) for g in gaps.values()]
    lines.append(f"| mean ± half range ({len(ok)} seed{'s' * (len(ok) != 1)}) | {outcome_counts(rows)} | "
                 f"{' | '.join(cells)} | {stat([r['wall_s'] for r in ok], digits=0)} |")  # fmt: skip
    misses = [f"the table's linear probe by {-gaps['linear']:.2f} points" if (gaps["linear"] or 0) < 0 else "",
              f"its own probe by {-gaps['own_probe']:.2f} points" if (gaps["own_probe"] or 0) < 0 else ""]  # fmt: skip
    if any(misses):
        lines += ["", f"On test the product's defaults miss {' and '.join(m for m in misses if m)} ({name}, means "
                  "over seeds)."]  # fmt: skip
    if any(r.get("smoke") for r in rows):
        lines += ["", "Smoke rows (`--smoke`: 1 epoch on a few images): a check of the harness, not a measurement."]
    return lines
