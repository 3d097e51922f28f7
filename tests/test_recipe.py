"""benchmarks/recipe.py: the recipe study's pairing, rule and runs, on hand-made rows (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import compare, product, recipe
from benchmarks.product_report import gap_metric
from pipelines import cli, config
from spt_core.portable.errors import SensituneError


def _row(seed: int, val: float, test: float, probe_test: float = 0.9, secs: float = 100.0, **kw) -> dict:
    return {"seed": seed, "val_score": val, "test_acc": test, "probe_test_acc": probe_test, "outcome": "model",
            "sensitivity_seconds": secs / 10, "probe_seconds": secs / 10, "train_seconds": secs * 0.8, **kw}


def _base(*vals: float) -> dict[int, dict]:
    return {s: _row(s, v, v) for s, v in enumerate(vals)}


def _study(variant: str, *vals: float, secs: float = 100.0) -> dict:
    return {"rows": [_row(s, v, v - 0.01, secs=secs, variant=variant) for s, v in enumerate(vals)]}


def test_differences_pair_by_seed_and_only_the_seeds_both_have():
    base = _base(0.90, 0.80, 0.60)
    study = {"rows": [_row(0, 0.92, 0.91, secs=50, variant="size-64"), _row(2, 0.75, 0.74, secs=50,
                                                                             variant="size-64")]}  # fmt: skip
    d = recipe.differences(study, base, "size-64")
    # seeds 0 and 2: val +2 and +15 -> +8.5; against every base seed's mean it would read 83.5 - 76.67 = +6.83
    assert d["seeds"] == [0, 2] and d["val"] == pytest.approx(8.5) and d["test"] == pytest.approx(7.5)
    assert d["cost"] == pytest.approx(0.5) and d["test_vs_probe"] == pytest.approx(100 * (0.01 - 0.16) / 2)
    assert recipe.differences(study, base, "epochs-8") is None


def test_the_pick_is_the_best_worst_validation_score_never_the_mean_or_the_test_split():
    base = _base(0.90, 0.90, 0.90)
    studies = {  # per choosing table: variant -> its seeds' val scores
        "digits": {"lr-3e-3": (0.95, 0.95, 0.95), "size-64": (0.92, 0.92, 0.92), "epochs-8": (0.89, 0.89, 0.89)},
        "mnist": {"lr-3e-3": (0.89, 0.89, 0.89), "size-64": (0.91, 0.91, 0.91), "epochs-8": (0.99, 0.99, 0.99)},
        "fashion-mnist": {"lr-3e-3": (0.95, 0.95, 0.95), "size-64": (0.91, 0.91, 0.91), "epochs-8": (0.99, 0.99,
                                                                                                        0.99)},
    }  # fmt: skip
    scored = {t: {v: recipe.differences(_study(v, *vals), base, v) for v, vals in by.items()}
              for t, by in studies.items()}  # fmt: skip
    for t in studies:  # best on test everywhere, below on validation: a test-split rule would take it
        rows = [{**_row(s, 0.89, 0.99), "variant": "budget-2%"} for s in range(3)]
        scored[t]["budget-2%"] = recipe.differences({"rows": rows}, base, "budget-2%")
    # lr-3e-3 has the best mean (+4.33) and epochs-8 the best on two tables; size-64 is the only one above 0 on all
    chosen, worst = recipe.pick(scored, seeds=3)
    assert chosen == "size-64" and worst["size-64"] == pytest.approx(1.0) and worst["lr-3e-3"] == pytest.approx(-1.0)
    # a held-out table never chooses: size-64 far below there changes nothing
    scored["elpv"] = {"size-64": recipe.differences(_study("size-64", 0.5, 0.5, 0.5), base, "size-64")}
    assert recipe.pick(scored, seeds=3)[0] == "size-64"
    # with only 2 seeds on one choosing table the variant does not count yet
    scored["mnist"]["size-64"] = recipe.differences(_study("size-64", 0.91, 0.91), base, "size-64")
    assert "size-64" not in recipe.pick(scored, seeds=3)[1]


def test_of_equal_worst_scores_the_cheaper_is_adopted_and_nothing_below_zero_is():
    base = _base(0.90, 0.90, 0.90)
    scored = {t: {"epochs-8": recipe.differences(_study("epochs-8", 0.92, 0.92, 0.92, secs=130), base, "epochs-8"),
                  "size-64": recipe.differences(_study("size-64", 0.92, 0.92, 0.92, secs=30), base, "size-64")}
              for t in recipe.CHOOSING}  # fmt: skip
    assert recipe.pick(scored, seeds=3)[0] == "size-64"
    for t in recipe.CHOOSING:
        scored[t]["size-64"] = scored[t]["epochs-8"] = recipe.differences(_study("x", 0.9, 0.9, 0.9), base, "x")
    assert recipe.pick(scored, seeds=3)[0] is None  # level is not above: the default stays


@pytest.mark.parametrize("variant", ["lr-3e-3", "harness", "augment-off", "harness-train"])
def test_a_variant_run_changes_only_the_forced_keys_and_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 variant: str):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    meta = {"backbone": "tf_efficientnet_lite0", "task": "digits", "weights": "embedded"}
    sets = product.overrides(meta, "lite0", tmp_path / "split", seed=1) | recipe.VARIANTS[variant]
    cmd = product.run_command(sets, no_export=True)
    got, want = cli.params_from_args(cli.build_parser().parse_args(cmd[cmd.index("run") :])), config.defaults()
    changed = {f"{s}.{k}": v for s in got for k, v in got[s].items() if want[s][k] != v}
    harness = {"plan.budget": "2%", "train.epochs": 8, "train.lr": 0.003, "model.input_size": 64}
    training = {"train.augment": False, "train.head_init": "random", "train.balance": "none",
                "sensitivity.batches": 16, "sensitivity.batch_size": 32}  # benchmarks/jobs.py's, where they differ
    own = {"lr-3e-3": {"train.lr": 0.003}, "harness": harness, "augment-off": {"train.augment": False},
           "harness-train": harness | training}[variant]  # fmt: skip
    own = {k: v for k, v in own.items() if want[k.split(".")[0]][k.split(".")[1]] != v}  # a default now: unchanged
    assert changed == {"data.source": str(tmp_path / "split"), "data.split": None, "train.seed": 1,
                       **({"data.ok_class": None} if want["data"]["ok_class"] is not None else {}), **own}


def _table(tmp_path: Path, product_rows: list[dict]) -> Path:
    data = tmp_path / "split"
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    meta = {"backbone": "tf_efficientnet_lite0", "task": "digits", "weights": "embedded", "data_dir": str(data),
            "threads": 1, "command": "python benchmarks/compare.py --task digits"}  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    (results / "compare_lite0_digits.json").write_text(json.dumps({"meta": meta, "rows": [], "product": product_rows}))
    return results


def test_runs_resume_and_rows_under_other_defaults_are_retired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(recipe, "measures_nothing", lambda v: False)  # the mechanics, whatever today's defaults are
    fp = product.defaults_fingerprint()
    results = _table(tmp_path, [{**_row(s, 0.9, 0.9), "defaults": fp, "method": "product"} for s in range(2)])
    monkeypatch.setattr(compare, "RESULTS", results)
    ran: list[tuple[str, int]] = []

    def fake_run(project: Path, sets: dict, threads: int, no_export: bool) -> dict:
        assert no_export and threads == 1
        ran.append((project.parent.name, sets["train.seed"]))
        return _row(sets["train.seed"], 0.95, 0.94)

    monkeypatch.setattr(product, "run_seed", fake_run)
    out = tmp_path / "study"
    old = {**_row(0, 0.5, 0.5), "variant": "size-64", "defaults": "other", "threads": 1}
    out.mkdir()
    (out / "recipe_lite0_digits.json").write_text(json.dumps({"meta": {"table": "lite0_digits"}, "rows": [old]}))
    argv = ["--task", "digits", "--variants", "size-64", "--seeds", "2", "--out-dir", str(out), "--work-dir",
            str(tmp_path / "w")]  # fmt: skip
    md = recipe.main(argv)
    assert ran == [("size-64", 0), ("size-64", 1)]  # the row made under other defaults ran again
    study = json.loads((out / "recipe_lite0_digits.json").read_text())
    assert [r["val_score"] for r in study["replaced"]] == [0.5] and len(study["rows"]) == 2
    assert "| digits | choosing | 1 | size-64 | model.input_size=64 | 2 | model 2 | +5.00 | +4.00 |" in md.read_text()
    recipe.main(argv)
    assert len(ran) == 2  # resumed: nothing left to run
    recipe.main([*argv[:2], "--round", "2", *argv[4:]])  # a round runs its own variants, in their declared order
    assert [v for v, _ in ran[2:]] == [v for v in recipe.ROUNDS[2] for _ in range(2)]
    assert "| digits | choosing | 2 | harness-train |" in md.read_text()
    recipe.main(argv)  # a command run again is recorded once; each other command that added rows is kept
    command = json.loads((out / "recipe_lite0_digits.json").read_text())["meta"]["command"]
    first, second = (" ".join(["python -m benchmarks.recipe", *a]) for a in (argv, [*argv[:2], "--round", "2",
                                                                                   *argv[4:]]))  # fmt: skip
    assert command == f"{first}  # + rows of `{second}`"


def test_a_table_without_a_product_column_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compare, "RESULTS", _table(tmp_path, [{**_row(0, 0.9, 0.9), "defaults": "older"}]))
    with pytest.raises(SensituneError, match="no product column under today's defaults: run `python -m benchmarks"):
        recipe.main(["--task", "digits", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SensituneError, match="--smoke: give --out-dir /tmp"):
        recipe.main(["--task", "digits", "--smoke", "--out-dir", str(recipe.OUT)])
    with pytest.raises(SensituneError, match="--variants: unknown"):
        recipe.main(["--task", "digits", "--variants", "lr-1"])


def test_each_round_is_decided_over_the_rounds_so_far_and_only_once_its_rows_are_all_there():
    base = _base(0.90, 0.90, 0.90)
    level = {v: (0.90, 0.90, 0.90) for v in recipe.ROUNDS[1]}  # round 1: every variant level with the recipe
    scored = {t: {v: recipe.differences(_study(v, *vals), base, v) for v, vals in level.items()}
              for t in recipe.CHOOSING}  # fmt: skip
    for t in recipe.CHOOSING:  # round 2: augment-off above on every table; the others not run yet on mnist
        for v in recipe.ROUNDS[2]:
            if t != "mnist" or v == "augment-off":
                scored[t][v] = recipe.differences(_study(v, 0.93, 0.93, 0.93), base, v)
    verdict = recipe._verdict(scored, seeds=3)
    assert "round 1: none (no variant is above" in verdict
    assert "round 2: not decided yet (harness-train, head-random, balance-none, sens-512 lack rows" in verdict
    for v in recipe.ROUNDS[2]:  # the rest of round 2 comes in below the recipe on mnist: augment-off is adopted
        if v != "augment-off":
            scored["mnist"][v] = recipe.differences(_study(v, 0.89, 0.89, 0.89), base, v)
    assert "round 2: augment-off; round 3: not decided yet" in recipe._verdict(scored, seeds=3)


def test_a_variant_level_but_for_float_noise_is_level_and_never_adopted():
    base = {s: _row(s, 0.3, 0.3) for s in range(3)}
    noisy = {"rows": [_row(s, 0.1 + 0.2, 0.3, variant="epochs-8") for s in range(3)]}  # 0.30000000000000004
    scored = {t: {"epochs-8": recipe.differences(noisy, base, "epochs-8")} for t in recipe.CHOOSING}
    assert scored["digits"]["epochs-8"]["val"] == 0.0  # unrounded: +5.6e-15 points, "above 0" on every table
    assert recipe.pick(scored, seeds=3) == (None, {"epochs-8": 0.0})


def test_a_decided_study_still_pairs_with_the_column_it_ran_beside_after_its_pick_became_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    old = [{**_row(s, 0.90, 0.90), "defaults": "old", "method": "product"} for s in range(3)]
    new = [{**_row(s, 0.97, 0.96), "defaults": "new", "method": "product"} for s in range(3)]
    study = {"meta": {"table": "lite0_digits"},
             "rows": [{**_row(s, 0.95, 0.94), "variant": "size-64", "defaults": "old"} for s in range(3)]}
    table = {"meta": {"task": "digits"}, "rows": [],  # the column re-measured: its old rows moved to replaced
             "product": new, "replaced": [{**r, "replaced_because": "product re-run"} for r in old]}  # fmt: skip
    monkeypatch.setattr(product, "defaults_fingerprint", lambda: "new")
    md = recipe.report({"digits": (table, study)})
    assert "| digits | choosing | 1 | size-64 | model.input_size=64 | 3 | model 3 | +5.00 | +4.00 |" in md
    assert recipe.base_rows(table) == dict(enumerate(new))  # a run pairs with today's column
    harness = {**_row(0, 0.91, 0.91), "method": "harness", "defaults": "old", "seed": 0}  # not a product row
    table["replaced"] = [harness, *table["replaced"][1:]]
    assert sorted(recipe.base_rows(table, "old")) == [1, 2]


def test_a_later_round_keeps_the_earlier_rounds_rows_and_chooses_on_its_own_tables(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch):
    fp = product.defaults_fingerprint()
    old = [{**_row(s, 0.90, 0.90), "defaults": "old", "method": "product"} for s in range(3)]
    new = [{**_row(s, 0.80, 0.80), "defaults": fp, "method": "product"} for s in range(3)]
    results = _table(tmp_path, new)
    path = results / "compare_lite0_digits.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "replaced": old}))
    monkeypatch.setattr(compare, "RESULTS", results)
    monkeypatch.setattr(product, "run_seed", lambda project, sets, threads, no_export: _row(sets["train.seed"], 0.85,
                                                                                            0.84))  # fmt: skip
    out = tmp_path / "study"
    out.mkdir()
    earlier = [{**_row(s, 0.95, 0.94), "variant": "lr-3e-3", "defaults": "old", "threads": 1} for s in range(3)]
    (out / "recipe_lite0_digits.json").write_text(json.dumps({"meta": {"table": "lite0_digits"}, "rows": earlier}))
    argv = ["--task", "digits", "--seeds", "3", "--out-dir", str(out), "--work-dir", str(tmp_path / "w")]
    md = recipe.main([*argv, "--variants", "size-128"]).read_text()
    study = json.loads((out / "recipe_lite0_digits.json").read_text())
    assert len(study["rows"]) == 6 and "replaced" not in study  # round 1's rows stay, under their own defaults
    # each pairs with the column of its own defaults: +5.00 against the old column, +5.00 against today's
    assert "| digits | choosing | 1 | lr-3e-3 | train.lr=0.003 | 3 | model 3 | +5.00 | +4.00 |" in md
    assert "| digits | reports | 3 | size-128 | model.input_size=128 | 3 | model 3 | +5.00 | +4.00 |" in md
    assert "round 3: not decided yet" in md  # digits does not choose round 3: the line tables do
    with pytest.raises(SensituneError, match="--variants: augment-off equal today's defaults"):
        recipe.main([*argv, "--variants", "augment-off"])  # train.augment: false is the default now
    base = _base(0.90, 0.90, 0.90)
    vals = {v: (0.92 if v == "size-128" else 0.90,) * 3 for v in recipe.ROUNDS[3]}  # size-128 above, the rest level
    scored = {t: {v: recipe.differences(_study(v, *x), base, v) for v, x in vals.items()} for t in recipe.LINE_CHOOSING}
    scored |= {t: {"size-128": recipe.differences(_study("size-128", 0.5, 0.5, 0.5), base, "size-128")}
               for t in recipe.CHOOSING}  # far below on round 2's tables, which only report in round 3
    assert "round 3: size-128; round 4: " in recipe._verdict(scored, seeds=3)


def test_a_round_with_choosing_tables_of_its_own_is_decided_alone():
    """Round 4 (size-auto) chooses on the demo line and demo set only, without round 3's variants: those lack the
    demo set's rows and are far above on the demo line, which would leave round 4 undecided if it were pooled with
    round 3 (same defaults), and size-auto's level Fashion line (auto = 64 px there) does not choose."""
    assert recipe._together(4) == [4] and recipe._together(2) == [1, 2]
    base = _base(0.90, 0.90, 0.90)
    line, fashion_line, demo = recipe.LINE_CHOOSING
    scored: dict = {line: {v: recipe.differences(_study(v, 0.99, 0.99, 0.99), base, v) for v in recipe.ROUNDS[3]}}
    scored[line]["size-auto"] = recipe.differences(_study("size-auto", 0.93, 0.93, 0.93), base, "size-auto")
    scored[demo] = {"size-auto": recipe.differences(_study("size-auto", 0.91, 0.91, 0.91), base, "size-auto")}
    scored[fashion_line] = {"size-auto": recipe.differences(_study("size-auto", 0.90, 0.90, 0.90), base, "size-auto")}
    verdict = recipe._verdict(scored, seeds=3)
    assert verdict.endswith("; round 4: size-auto; round 5: none (no choosing table: it reports only).")
    assert "round 3: not decided yet" in verdict
    scored[demo]["size-auto"] = recipe.differences(_study("size-auto", 0.90, 0.89, 0.90), base, "size-auto")
    assert recipe._verdict(scored, seeds=3).endswith("round 4: none (no variant is above the defaults of 2026-12-07 "
                                                     "on every choosing table); round 5: none (no choosing table: it "
                                                     "reports only).")  # fmt: skip


def test_a_line_table_reports_test_balanced_accuracy_not_accuracy():
    rows = [{**_row(s, 0.8, 0.95), "test_balanced_acc": 0.60, "probe_test_balanced_acc": 0.40, "variant": "x"}
            for s in range(3)]  # fmt: skip
    base = {s: {**_row(s, 0.8, 0.90), "test_balanced_acc": 0.70} for s in range(3)}
    table = {"meta": {"imbalance": 90}}  # a line table: the metric that hides no escape
    d = recipe.differences({"rows": rows}, base, "x", gap_metric(table))
    assert d["test"] == pytest.approx(-10.0) and d["test_vs_probe"] == pytest.approx(20.0)  # accuracy would say +5


def test_a_round_is_decided_early_when_every_unfinished_variant_is_already_at_or_below_zero():
    base = _base(0.90, 0.90, 0.90)
    line, fashion_line, demo = recipe.LINE_CHOOSING
    scored: dict = {t: {} for t in recipe.LINE_CHOOSING}
    for v in recipe.ROUNDS[3]:  # far above on one line table, level on the other, the demo set not run
        scored[line][v] = recipe.differences(_study(v, 0.99, 0.99, 0.99), base, v)
        scored[fashion_line][v] = recipe.differences(_study(v, 0.90, 0.90, 0.90), base, v)
    assert (
        "round 3: none (no variant is above the defaults of 2026-12-07 on every choosing table); decided before "
        "size-128, augment-on, head-probe, previous had all their rows: each is at or below 0 on a complete "
        "choosing table; round 4: " in recipe._verdict(scored, seeds=3))
    scored[fashion_line]["size-128"] = recipe.differences(_study("size-128", 0.91, 0.91), base, "size-128")
    assert "round 3: not decided yet (size-128 lack" in recipe._verdict(scored, seeds=3)  # 2 seeds: not out yet


def test_a_round_of_held_out_lines_reports_and_never_chooses(monkeypatch: pytest.MonkeyPatch):
    """Round 5 has no choosing table: far above on a held-out line, it is still not adopted, and the line of a
    held-out set (ELPV's, named elpv-imbalanced90) reads "held out" by its table's task."""
    monkeypatch.setattr(product, "defaults_fingerprint", lambda: "now")
    column = [{**_row(s, 0.80, 0.80), "test_balanced_acc": 0.70, "probe_test_balanced_acc": 0.60, "defaults": "now",
               "method": "product"} for s in range(3)]  # fmt: skip
    table = {"meta": {"task": "elpv", "imbalance": 0.9}, "rows": [], "product": column}
    study = {"meta": {"table": "lite0_elpv-imbalanced90"},
             "rows": [{**_row(s, 0.99, 0.95), "test_balanced_acc": 0.90, "probe_test_balanced_acc": 0.60,
                       "variant": "plain-batches", "defaults": "now"} for s in range(3)]}  # fmt: skip
    md = recipe.report({"elpv-imbalanced90": (table, study)})
    assert ("| elpv-imbalanced90 | held out | 5 | plain-batches | train.balance=none | 3 | model 3 | +19.00 | +20.00 "
            "| +30.00 |") in md  # fmt: skip
    assert "Round 5 (against the defaults since round 4): held-out tables only; it reports, never chooses." in md
    assert md.rstrip().endswith("round 5: none (no choosing table: it reports only).")
