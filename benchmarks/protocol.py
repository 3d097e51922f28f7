"""What one method table is: the backbone presets, the sensitivity recipe, a row's identity, the shared settings.

Every script that measures like `benchmarks/compare.py` (e.g. `benchmarks/stability.py`) takes these from here, so
that a "lite0" or "16 x 32 sensitivity images" means the same in each table.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spt_core.portable.errors import SensituneError

ISA_FLAGS = tuple("avx2 avx512f avx512_vnni avx_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16".split())


def cpu_info() -> tuple[str, list[str]]:
    """(the CPU's model name, which of `ISA_FLAGS` it has) from /proc/cpuinfo; elsewhere (the platform's processor
    name, []). The one reader of /proc/cpuinfo for every benchmark's machine line."""
    model, flags = platform.processor() or platform.machine() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name":
                    model = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


# glibc keeps freed memory mapped, so that RSS peaks are comparable between runs; set for every child process and
# recorded in each table's command
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
BACKBONES = {  # preset: (timm name, weights, img_size)
    "lite0": ("tf_efficientnet_lite0", "embedded", 64),
    "vit-s14": (
        "vit_small_patch14_dinov2",
        str(Path("~/.cache/sensitune-fixtures/vit_small_patch14_dinov2.safetensors").expanduser()),
        84,
    ),
    "vit-b16": ("vit_base_patch16_224.augreg_in21k", "hub", 224),
    "test-effnet": ("test_efficientnet", "none", 32),
}
SENS_BATCHES, SENS_BATCH_SIZE, PROBE_EPOCHS = 16, 32, 50  # SPT: 16 x 32 = 512 training images

ROWS = {False: "rows", True: "kfold"}  # where a row lives: the table's rows, or --kfold's (never in the table)

# The settings every row of one table shares: a resumed, re-run or merged table refuses rows made under others (a
# --img-size 56 run must not resume a 224 px table of the same backbone and task). Paths by file name only: a table
# travels between machines.
PROTOCOL = ("backbone", "weights", "img_size", "task", "data_dir", "budget", "epochs", "batch", "augment", "n_train",
            "device", "freeze_bn_stats", "sens_images", "imbalance", "select")  # fmt: skip
PATHS = ("weights", "data_dir")


def key_of(r: dict) -> tuple:
    """A row's identity in a table: (method, seed, lr, budget, variant, fold)."""
    return r.get("method"), r.get("seed"), r.get("lr"), r.get("budget"), r.get("variant", "none"), r.get("fold")


def sens_key(r: dict) -> tuple:
    """A sensitivity pass's identity in a table: (seed, whether it measured the stem too)."""
    return r.get("seed"), bool(r.get("include_stem"))


def retire(state: dict, rows: list[dict], why: str, key: str = "rows") -> None:
    """Move `rows` (objects of ``state[key]``: the harness's rows, or the product column's) to ``state["replaced"]``
    with the reason, before they re-run."""
    state["replaced"] = state.get("replaced", []) + [{**r, "replaced_because": why} for r in rows]
    state[key] = [r for r in state.get(key, []) if not any(r is x for x in rows)]


def protocol_differences(table: dict, run: dict) -> list[str]:
    """`key=run's (table: table's)` for each PROTOCOL setting in which a run's meta differs from a table's; a setting
    an older table did not record counts as off (None)."""

    def value(meta: dict, k: str) -> Any:
        v = meta.get(k) or None
        return Path(v).name if k in PATHS and v else v

    return [f"{k}={run.get(k)!r} (table: {table.get(k)!r})" for k in PROTOCOL if value(table, k) != value(run, k)]


def script(main: Callable[[], Any]) -> None:
    """Run a benchmark script's `main` as a command: print what it returns (unless None); a `SensituneError` (bad
    flags or input) is one line on stderr and exit 2, as the product's CLI does."""
    try:
        out = main()
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if out is not None:
        print(out)
