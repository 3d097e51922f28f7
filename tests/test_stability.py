"""The stability of sensitivity (`benchmarks/stability.py`): agreement measures on known vectors, the per-row
plan's overlap, and the script end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_stability_agreement_on_known_vectors() -> None:
    from benchmarks.stability import agreement

    a = np.arange(1000, dtype=np.float64)  # two "tensors" of 500 entries
    same = agreement(a, a.copy(), [500, 500])
    assert same["spearman"] == pytest.approx(1.0) and same["overlap@0.01"] == 1.0
    rev = agreement(a, a[::-1].copy(), [500, 500])
    # reversed: rank correlation -1, no top entry shared, and the top-k counts per tensor are opposite
    assert rev["spearman"] == pytest.approx(-1.0) and rev["overlap@0.01"] == 0.0
    assert rev["matrix_r@0.02"] == pytest.approx(-1.0)
    half = a.copy()
    half[990:] = -1  # the top 10 (1 %) of a drop to the bottom: the top-1 % sets are disjoint, top-2 % share half
    h = agreement(a, half, [500, 500])
    assert h["overlap@0.01"] == 0.0 and h["overlap@0.02"] == 0.5


def test_stability_per_row_overlap_is_the_default_plans_entry_sets() -> None:
    """Two 10x50 matrices: flipping the order within the top row empties the global top-1 % overlap, but the
    per-row plan (1 % = 10 entries: each of the 10 best rows its best entry) still shares 9 of 10."""
    from benchmarks.stability import agreement, per_row_entries
    from spt_core.candidates import Candidate

    cands = {f"m{i}.weight": Candidate(f"m{i}.weight", f"m{i}", "weight", "linear", (10, 50), i) for i in (0, 1)}
    a = np.arange(1000, dtype=np.float32)
    assert sorted(per_row_entries(a, cands, 0.01)) == list(range(549, 1000, 50))  # the max of rows 10-19
    b = a.copy()
    b[950:] = a[950:][::-1]  # the top row (m1's last) now peaks at its first entry
    r = agreement(a, b, [500, 500], cands)
    assert r["overlap@0.01"] == 0.0 and r["per_row@0.01"] == 0.9
    assert agreement(a, a.copy(), [500, 500], cands)["per_row@0.02"] == 1.0


def test_stability_script_end_to_end(tmp_path: Path) -> None:
    from benchmarks import stability

    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "128", "--n-val", "20", "--pool", "4",
            "--ns", "1,2", "--reps", "2", "--threads", "1", "--random-head", "--augmented",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)]  # fmt: skip
    md = stability.main(argv)
    r = json.loads(md.with_suffix(".json").read_text())
    assert [x["batches"] for x in r["rows"]] == [1, 2] and r["heads"]["batches"] == r["augmented"]["batches"] == 4
    assert -1 <= r["augmented"]["spearman"] < 1  # augmented images give other gradients than the plain ones
    assert "Augmented vs plain" in md.read_text() and "Random head" in md.read_text()
