"""Pictures of where sensitivity sits and where the budget went: blocks × parameter kinds.

A parameter's *kind* is its name with the block prefix removed ("attn.qkv.weight", "conv_pw.weight",
"bn1.bias"), so the same picture works for any timm backbone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .plan import Plan
from .portable.io import atomic_path
from .sensitivity import Sensitivity


def _kind(name: str, block: str) -> str:
    return name[len(block) + 1 :] if block and name.startswith(block + ".") else name


def sensitivity_grid(sens: Sensitivity) -> tuple[list[str], list[str], np.ndarray]:
    """(block names, kinds, mean sensitivity per cell); NaN where a block has no such parameter."""
    blocks = sens.meta.get("block_names") or []
    cells: dict[tuple[int, str], float] = {}
    for name, c in sens.candidates.items():
        block = blocks[c.block] if c.block < len(blocks) else str(c.block)
        cells[(c.block, _kind(name, block))] = float(sens.scores[name].mean())
    return _grid(cells, blocks)


def allocation_grid(plan: Plan, sens: Sensitivity) -> tuple[list[str], list[str], np.ndarray]:
    """(block names, kinds, trainable values per cell)."""
    blocks = plan.block_names
    cells: dict[tuple[int, str], float] = defaultdict(float)
    for t in plan.targets:
        block = blocks[t.block] if t.block < len(blocks) else str(t.block)
        cells[(t.block, _kind(t.param, block))] += t.count
    return _grid(cells, blocks)


def _grid(cells: dict[tuple[int, str], float], blocks: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    rows = sorted({b for b, _ in cells})
    kinds = sorted({k for _, k in cells})
    grid = np.full((len(rows), len(kinds)), np.nan)
    for (b, k), v in cells.items():
        grid[rows.index(b), kinds.index(k)] = v
    names = [blocks[b] if b < len(blocks) else str(b) for b in rows]
    return names, kinds, grid


def plot_plan(sens: Sensitivity, plan: Plan, path: str | Path) -> Path:
    """Two heatmaps side by side: log10 mean sensitivity and the plan's trainable values per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1, k1, s = sensitivity_grid(sens)
    b2, k2, a = allocation_grid(plan, sens)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.45 * (len(k1) + len(k2)) + 4), max(4, 0.3 * len(b1) + 2)))
    for ax, (blocks, kinds, grid, title) in zip(
        axes,
        [
            (b1, k1, np.log10(s + 1e-30), "log10 mean sensitivity (Σ g²)"),
            (b2, k2, np.where(np.isnan(a), np.nan, a), f"trainable values ({plan.trainable:,} total)"),
        ],
    ):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(plan.summary().splitlines()[0], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
