"""The imbalanced-line protocol of `benchmarks/compare.py` (``--imbalance 0.9``): data, per-run metrics, report.

A line's data: one good class at ~90 % and a few defect classes with few images each (docs/line-realities.md);
`LINES` names each task's good class and its defects, the common one first.

- ``demo-defects``: the demo generator with per-class counts (good ``ok``; scratch > spot > crack).
- ``fashion-mnist``: a real set made imbalanced: ``Coat`` is the good class, ``Pullover``, ``Shirt`` and
  ``T-shirt_top`` (the look-alikes) are the defects, the first of each from the official training images.
- ``elpv`` and ``animal-shapes`` (held out: they report, never choose): ELPV's cells by the expert's level
  (``functional`` at 0 is good; ``defective`` at 1, ``possible`` at 1/3, ``likely`` at 2/3), Animal-Shape's
  ``horse`` good and ``zebra`` > ``cow`` > ``dog`` (`benchmarks.heldout_tasks`), each class's images a seeded draw.

Both are split proportionally (``prepare(split=...)``: every image, each class in proportion, a minimum per class
in validation and test). Every run picks its epoch on validation (``--select``, balanced accuracy by default),
chooses the reject threshold on P(good) on validation for ``--max-escape-rate`` and reports test balanced
accuracy, escape rate and overkill at that threshold (`spt_core.portable.metrics`).

A variant is ``<balance>[+aug]``: ``none`` (plain), ``loss``/``sampler``/``both`` (`train.balance`), ``+aug`` adds
timm's train-time augmentation (`spt_core.data.Augment`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.product_report import product_lines
from spt_core.portable.io import write_text

# task -> (good class, defect classes by share: one common defect, two rare ones); declared before any line run
LINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo-defects": ("ok", ("scratch", "spot", "crack")),
    "fashion-mnist": ("Coat", ("Pullover", "Shirt", "T-shirt_top")),  # the look-alikes of the good class
    # held out (benchmarks/README.md, "Round 5"): their lines report, never choose
    "elpv": ("functional", ("defective", "possible", "likely")),  # the expert's levels 1, 1/3, 2/3
    "animal-shapes": ("horse", ("zebra", "cow", "dog")),  # the common defect: a horse's shape, striped
}
DEFECT_SHARES = (0.5, 0.3, 0.2)  # of the defect images
PICK_SEED = 0  # which images of a class a real set's line takes: a seeded draw, the same on every machine


def counts(n_images: int, good_fraction: float, good: str, defects: tuple[str, ...]) -> dict[str, int]:
    n_good = round(n_images * good_fraction)
    n_def = n_images - n_good
    return {good: n_good, **{d: max(1, round(n_def * s)) for d, s in zip(defects, DEFECT_SHARES)}}


def imbalanced_source(task: str, work_dir: Path, n_images: int, good_fraction: float) -> tuple[str, str, dict]:
    """(ImageFolder dir, ok_class, counts) of the imbalanced version of `task`; written once, then reused."""
    if task not in LINES:
        raise ValueError(f"--imbalance supports {', '.join(LINES)}, not {task!r}")
    good, defects = LINES[task]
    c = counts(n_images, good_fraction, good, defects)
    prefix = {"demo-defects": "demo-imb", "fashion-mnist": "fashion-imb"}.get(task, f"{task}-line")  # as committed
    src = work_dir / "data" / f"{prefix}_{n_images}_{good_fraction:g}"
    if (src / ".complete").is_file():
        return str(src), good, c
    if task == "demo-defects":
        from spt_core.api import generate_demo_defects

        generate_demo_defects(src, counts=c)
    elif task == "fashion-mnist":
        _write_fashion(src, c)
    else:  # a held-out set: its package's images, by level on ELPV
        from benchmarks.heldout_tasks import animal_shape_entries, elpv_entries, write_folder

        write_folder(line_entries(elpv_entries(grades=True) if task == "elpv" else animal_shape_entries(), c), src)
    (src / ".complete").touch()
    return str(src), good, c


def _write_fashion(src: Path, c: dict[str, int]) -> None:
    """The first images of each class from Fashion-MNIST's official training split."""
    from PIL import Image

    from spt_core.data.sources import read_source

    full = read_source("fashion-mnist", src, None, False, [])
    for name, n in c.items():
        label = full.class_names.index(name)
        items = [it for it in full.items if it.label == label and it.split == "train"][:n]
        (src / name).mkdir(parents=True, exist_ok=True)
        for it in items:
            Image.fromarray(it.array).save(src / name / f"{it.uid}.png")


def line_entries(entries: list, c: dict[str, int]) -> list:
    """`c[name]` entries of each class, drawn by one generator seeded `PICK_SEED`, class after class in `c`'s order (so
    the committed lines' images are these); a class with fewer is refused: no silent short line."""
    rng = np.random.default_rng(PICK_SEED)
    out = []
    for name, n in c.items():
        pool = [e for e in entries if e[1] == name]
        if len(pool) < n:
            raise ValueError(f"--n-images: the line needs {n} {name} images, the set has {len(pool)}; give fewer")
        out += [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
    return out


def parse_variant(variant: str) -> tuple[str, bool]:
    """``"loss+aug"`` -> ("loss", True); ``"none"`` -> ("none", False)."""
    balance, _, aug = variant.partition("+")
    if balance not in ("none", "loss", "sampler", "both") or aug not in ("", "aug"):
        raise ValueError(f"variant {variant!r}: write <none|loss|sampler|both>[+aug], e.g. loss+aug")
    return balance, aug == "aug"


def line_metrics(model: Any, loaders: dict, ok_index: int, max_escape_rate: float) -> dict[str, Any]:
    """Validation-chosen threshold; test balanced accuracy, escape rate and overkill at it (with Wilson CIs)."""
    from spt_core.api import collect
    from spt_core.portable.metrics import balanced_accuracy, confusion_matrix
    from spt_core.portable.operating_point import OperatingPoint

    yv, pv, _ = collect(model, loaders["val"])
    yt, pt, _ = collect(model, loaders["test"])
    names = [str(i) for i in range(pt.shape[1])]  # the labels are indices; the rule needs only which is good
    op = OperatingPoint.choose(yv, pv, names, names[ok_index], max_escape_rate)
    t = op.threshold
    at = op.rates(yt, op.decide(op.p_good(pt, names)), names)
    val_at = op.rates(yv, op.decide(op.p_good(pv, names)), names)
    k = pt.shape[1]
    return {
        "threshold": t,
        "val_balanced_acc": balanced_accuracy(confusion_matrix(yv, pv.argmax(1), k)),
        "test_balanced_acc": balanced_accuracy(confusion_matrix(yt, pt.argmax(1), k)),
        "val_escape_rate": val_at["escape_rate"]["value"],
        "escape_rate": at["escape_rate"]["value"],
        "escape_ci95": at["escape_rate"]["ci95"],
        "escapes": [at["escape_rate"]["k"], at["escape_rate"]["n"]],
        "overkill": at["overkill"]["value"],
        "overkill_ci95": at["overkill"]["ci95"],
        "overkills": [at["overkill"]["k"], at["overkill"]["n"]],
    }


def _ms(values: list[float | None], scale: float = 100.0) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{scale * np.mean(v):.1f} ± {scale * (max(v) - min(v)) / 2:.1f}"


def write_imbalance_report(state: dict, stem: Path) -> None:
    """stem.md: one row per (method, variant), means ± half range over seeds."""
    meta = state["meta"]
    rows = [r for r in state["rows"] if "error" not in r]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("variant", "none")), []).append(r)
    c = meta.get("counts", {})
    lines = [
        f"# {meta['backbone']} @ {meta['img_size']} px on an imbalanced {meta['task']}: good class at "
        f"{100 * meta['imbalance']:.0f} %",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"Date: {meta['date']}.",
        "",
        f"Data: {sum(c.values())} images, {c} (good class `{meta['ok_class']}`), split {meta['split']} per class "
        f"(proportional, min {meta['min_per_class']} per class in val and test): {meta.get('split_counts')}. "
        f"{meta['epochs']} epochs, batch {meta['batch']}, budget {meta['budget']}, lr per method as listed. "
        f"Epoch chosen on validation `{meta['select']}` only; the reject threshold on P(good) chosen on validation "
        f"for escape rate <= {meta['max_escape_rate']}; test evaluated once, at that epoch and threshold. "
        "Mean ± half range over seeds; escape/overkill in %, with the pooled counts over seeds.",
        "",
        "| method | variant | lr | seeds | test bal. acc % | test acc % | escape % (escaped/defects) | "
        "overkill % (rejected/good) | val bal. acc % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, variant), rs in sorted(groups.items()):
        esc = [sum(r["escapes"][i] for r in rs) for i in (0, 1)]
        ov = [sum(r["overkills"][i] for r in rs) for i in (0, 1)]
        lines.append(
            f"| {method} | {variant} | {rs[0]['lr']:g} | {len(rs)} | {_ms([r['test_balanced_acc'] for r in rs])} | "
            f"{_ms([r['test_acc'] for r in rs])} | {_ms([r['escape_rate'] for r in rs])} ({esc[0]}/{esc[1]}) | "
            f"{_ms([r['overkill'] for r in rs])} ({ov[0]}/{ov[1]}) | {_ms([r['val_balanced_acc'] for r in rs])} |"
        )
    lines += product_lines(state, groups.get(("linear", "none"), []))  # the plain probe: the product's yardstick
    notes = meta.get("notes")
    if notes:
        lines += ["", notes]
    write_text(f"{stem}.md", "\n".join(lines) + "\n")
