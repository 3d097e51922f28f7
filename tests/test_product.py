"""benchmarks/product.py and its block (benchmarks/product_report.py) on hand-made rows: no training runs here.

The real column is `python -m benchmarks.product` (minutes per seed); these tests pin what the table says of its rows
and that the command it runs changes only the keys the table forces.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import compare, product
from benchmarks.product import overrides, read_outcome, retire_stale, run_command, table_args
from benchmarks.product_report import product_gaps, product_lines
from pipelines import cli, config
from spt_core.portable.errors import SensituneError


def _product(seed: int, test: float, probe_test: float, outcome: str = "model", wall: float = 600.0) -> dict:
    return {"method": "product", "seed": seed, "outcome": outcome, "val_acc": 0.9, "val_score": 0.9,
            "test_acc": test, "test_balanced_acc": test - 0.01, "probe_val_score": 0.88, "probe_test_acc": probe_test,
            "probe_test_balanced_acc": probe_test - 0.01, "wall_s": wall, "select": "balanced_accuracy",
            "input_size": 128, "overrides": {"train.seed": seed}, "command": "sensitune run"}  # fmt: skip


META = {"backbone": "tf_efficientnet_lite0", "task": "digits", "weights": "embedded", "budget": "2%"}


def test_product_block_compares_means_over_each_side_s_own_seeds():
    # product seeds 0..2 at test 90, 94, 95 (mean 93); the table's linear probe ran seeds 0 and 1 only (96, 98: mean
    # 97). The published gap is 93 - 97 = -4.00; averaging the matched per-seed gaps would say -5.00 instead.
    rows = [_product(0, 0.90, 0.92), _product(1, 0.94, 0.92, "probe", 500.0), _product(2, 0.95, 0.99, wall=700.0)]
    rows[1]["tuned"] = {"val_score": 0.85, "test_acc": 0.8}  # the model the probe replaced: shown, not averaged
    linear = [{"seed": 0, "test_acc": 0.96}, {"seed": 1, "test_acc": 0.98}]
    state = {"meta": META, "product": rows}
    gaps = product_gaps(state, linear)
    assert gaps["linear"] == pytest.approx(-4.0) and gaps["own_probe"] == pytest.approx(-1.3333)
    text = "\n".join(product_lines(state, linear))
    assert "| 0 | model | 90.00 | 90.00 | 90.00 | 89.00 | 88.00 | 92.00 | 91.00 | -6.00 | -2.00 | 600 |" in text
    assert "| 1 | probe exported (tuned: val score 85.00, test 80.00) | 90.00 |" in text
    assert "| 2 | model | 90.00 | 90.00 | 95.00 | 94.00 | 88.00 | 99.00 | 98.00 | - | -4.00 | 700 |" in text
    mean_row = next(ln for ln in text.splitlines() if ln.startswith("| mean"))
    assert mean_row.startswith("| mean ± half range (3 seeds) | model 2, probe exported 1 | 90.00 ± 0.00 |")
    assert "| 93.00 ± 2.50 |" in mean_row and mean_row.endswith("| -4.00 | -1.33 | 600 ± 100 |")
    assert "miss the table's linear probe by 4.00 points and its own probe by 1.33 points" in text


def test_line_table_compares_balanced_accuracy_and_a_failed_seed_is_counted_not_averaged():
    rows = [_product(0, 0.80, 0.70), {"seed": 1, "method": "product", "error": "exit 2, see log", "wall_s": 3.0}]
    state = {"meta": {**META, "imbalance": 0.9}, "product": rows}
    linear = [{"seed": 0, "test_acc": 0.99, "test_balanced_acc": 0.60}]
    assert product_gaps(state, linear) == {"linear": pytest.approx(19.0), "own_probe": pytest.approx(10.0)}
    text = "\n".join(product_lines(state, linear))
    assert "test bal. acc − linear (table)" in text and "(1 seed) | model 1, failed 1 |" in text
    assert "miss" not in text  # above both probes on the line's metric, though below the table's probe on accuracy
    assert product_lines({"meta": META, "rows": []}, linear) == []  # a table without a product column: no block


@pytest.mark.parametrize(
    ("meta", "ok"),
    [(META, None), ({**META, "task": "demo-defects"}, "ok"), ({**META, "imbalance": 0.9, "ok_class": "Coat"}, "Coat")],
)
def test_the_run_changes_only_the_forced_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta: dict, ok):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: `sensitune run` starts from the package's defaults
    sets = overrides(meta, "lite0", tmp_path / "data split", seed=2)
    cmd = run_command(sets, no_export=False)
    args = cli.build_parser().parse_args(cmd[cmd.index("run") :])
    got, want = cli.params_from_args(args), config.defaults()
    changed = {f"{s}.{k}": v for s in got for k, v in got[s].items() if want[s][k] != v}
    assert changed == {"data.source": str(tmp_path / "data split"), "data.split": None, "train.seed": 2,
                       **({"data.ok_class": ok} if ok != want["data"]["ok_class"] else {})}  # fmt: skip


def test_a_vit_table_sets_its_backbone_and_names_missing_weights(tmp_path: Path):
    weights = tmp_path / "vit.safetensors"
    meta = {**META, "backbone": "vit_small_patch14_dinov2", "weights": str(weights)}
    with pytest.raises(SensituneError, match="make_vit_s14.py"):
        overrides(meta, "vit-other", tmp_path, 0)
    weights.write_bytes(b"x")
    sets = overrides(meta, "vit-other", tmp_path, 0)
    assert sets["model.name"] == "vit_small_patch14_dinov2" and sets["model.weights"] == str(weights)
    assert "model.input_size" not in sets  # the product's own input side


def test_every_committed_table_is_found_again_from_its_own_command():
    for path in sorted(compare.RESULTS.glob("compare_*.json")):
        meta = json.loads(path.read_text())["meta"]
        args = table_args(meta)
        assert f"compare_{compare.table_slug(args)[0]}.json" == path.name
        assert args.imbalance == meta.get("imbalance")


def test_outcome_from_metrics_and_exit_code(tmp_path: Path):
    m = tmp_path / "metrics.json"
    base = {"val_acc": 0.8, "test_acc": 0.7, "model": "probe", "tuned": {"test_acc": 0.6}, "val": {}}
    m.write_text(json.dumps(base))
    got = read_outcome(m, 0, tmp_path / "log")
    assert got["outcome"] == "probe" and got["tuned"]["test_acc"] == 0.6 and got["test_acc"] == 0.7
    m.write_text(json.dumps({**base, "model": None, "stopped": "no candidate beats the probe"}))
    assert read_outcome(m, 3, tmp_path / "log")["outcome"] == "stopped"
    m.write_text(json.dumps({**base, "model": "tuned"}))
    assert read_outcome(m, 0, tmp_path / "log")["outcome"] == "model"
    assert "error" in read_outcome(m, 2, tmp_path / "log")


def test_rows_made_under_other_defaults_are_retired_before_a_rerun():
    how = {"defaults": "new", "no_export": False, "smoke": False, "threads": 1}
    keep, old = {"seed": 0, **how}, {"seed": 1, **how, "defaults": "old"}
    state = {"product": [keep, old]}
    retire_stale(state, how)
    assert state["product"] == [keep] and [r["seed"] for r in state["replaced"]] == [1]


def test_every_committed_product_column_ran_under_todays_defaults(monkeypatch: pytest.MonkeyPatch):
    """A default changed without re-measuring the columns would leave the README's product numbers another
    product's. A key no default run reads (train.lr_grid: only plan.budget: auto with plan.search: halving reads
    it) changes nothing until a default run reads it."""
    fp = product.defaults_fingerprint()
    for path in sorted(compare.RESULTS.glob("compare_*.json")):
        rows = json.loads(path.read_text()).get("product", [])
        assert all(r["defaults"] == fp for r in rows), f"{path.name}: re-run `python -m benchmarks.product`"
    base = config.defaults()

    def with_(plan: dict, lr_grid: list[float]) -> str:
        d = copy.deepcopy(base)
        d["plan"].update(plan)
        d["train"]["lr_grid"] = lr_grid
        monkeypatch.setattr(config, "defaults", lambda: copy.deepcopy(d))
        return product.defaults_fingerprint()

    assert with_({}, [2.0]) == with_({}, [1.0]) == fp  # unread under today's plan
    searched = {"budget": "auto", "search": "halving"}
    assert len({with_(searched, [2.0]), with_(searched, [1.0]), fp}) == 3  # read: its value counts
