"""The CLI end to end on tiny data, and its one-line errors (exit code 2) on bad input."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines import stages
from pipelines.cli import build_parser, main, params_from_args
from pipelines.config import load_params
from pipelines.models import load_merged
from spt_core.portable.errors import PlanError

TINY = {
    "paths": {"raw": "raw", "data": "prepared", "run": "run"},
    "demo": {"n_per_class": 8, "size": 32, "seed": 0, "batch": 0, "counts": None},
    "data": {"split": None, "n_train": 16, "n_val": 8, "n_test": None},
    "model": {"name": "test_efficientnet", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 2, "batch_size": 8, "probe_epochs": 2},
    "plan": {"budget": "2%"},
    "train": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "probe_epochs": 2, "lr": 0.01},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project directory that has gone through demo → prepare → measure → plan → train."""
    root = tmp_path_factory.mktemp("cli")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    cfg = ["--config", str(root / "params.yaml")]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for verb in ("demo", "prepare", "measure", "plan", "train"):
            assert main([verb, *cfg, "-q"]) == 0, verb
    return root


def test_pipeline_outputs(project):
    run = project / "run"
    for name in ("sensitivity.safetensors", "plan.json", "plan.safetensors", "plan.png", "metrics.json", "history.csv"):
        assert (run / name).is_file(), name
    assert (run / "tuned" / "tuned.safetensors").is_file()
    m = json.loads((run / "metrics.json").read_text())
    # counted from the saved tensors, not copied from the plan: every tuner value except the head's
    saved = load_file(str(run / "tuned" / "tuned.safetensors"))
    head = {k for k in saved if k.startswith("classifier.")}
    tuner_values = sum(t.numel() for k, t in saved.items() if not k.startswith(("plan/", "buffers/")) and k not in head)
    assert m["trainable"] == tuner_values > 0
    assert sum(m["by_kind"].values()) == m["trainable"]
    assert m["probe_test_acc"] is not None
    with open(run / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


def test_merge_predict_equal_unmerged(project, monkeypatch):
    monkeypatch.chdir(project)
    cfg = ["--config", "params.yaml", "-q"]
    assert main(["merge", *cfg]) == 0
    assert main(["evaluate", *cfg]) == 0
    ev = json.loads((project / "run" / "eval.json").read_text())
    # a fresh load of the saved tuned weights scores exactly what training reported for the selected epoch
    assert (
        ev["n"] == 4 * 8 - 16 - 8
        and ev["accuracy"] == json.loads((project / "run/metrics.json").read_text())["test_acc"]
    )
    images = project / "prepared" / "test"
    assert main(["predict", str(images), "--out", "merged.csv", *cfg]) == 0
    assert main(["predict", str(images), "--model-path", "run/tuned", "--out", "tuned.csv", *cfg]) == 0
    merged = list(csv.DictReader(open(project / "merged.csv")))
    tuned = list(csv.DictReader(open(project / "tuned.csv")))
    assert len(merged) == len(tuned) == sum(1 for p in images.rglob("*.png"))
    assert [(r["class"], r["decision"]) for r in merged] == [(r["class"], r["decision"]) for r in tuned]
    for a, b in zip(merged, tuned):
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 1e-5
    # the merged file is a plain timm state dict of the original class
    model, info = load_merged(project / "run" / "merged" / "model.safetensors")
    assert type(model).__name__ == "EfficientNet" and info["class_names"] == ["crack", "ok", "scratch", "spot"]
    assert not any(".spt." in k for k in model.state_dict())


def test_predict_on_the_openvino_export_equals_the_merged_model(project, monkeypatch, capsys, tmp_path):
    """`predict` on any artifact: merged (PyTorch) and export dir / OpenVINO dir / model.onnx (torch-free) agree."""
    import shutil

    import numpy as np
    from PIL import Image

    import spt_core.portable.preprocess as pp

    monkeypatch.chdir(project)
    cfg = ["--config", "params.yaml", "-q"]
    assert main(["merge", *cfg]) == 0
    assert main(["export", *cfg, "--set", "export.precisions=[fp32]", "--set", "export.calibration_size=8"]) == 0
    fp32 = json.loads((project / "run" / "export" / "openvino" / "fp32" / "manifest.json").read_text())
    merged_info = json.loads((project / "run" / "merged" / "merged.json").read_text())
    assert fp32["ok_class"] == "ok" and fp32["threshold"] == merged_info["threshold"] is not None
    images = project / "prepared" / "test"
    assert main(["predict", str(images), "--out", "ref.csv", "--force", *cfg]) == 0
    ref = list(csv.DictReader(open("ref.csv")))
    assert {r["decision"] for r in ref} <= {"ok", "reject"} and all(0 <= float(r["p_ok"]) <= 1 for r in ref)
    for i, path in enumerate(("run/export", "run/export/openvino/fp32", "run/export/model.onnx")):
        assert main(["predict", str(images), "--model-path", path, "--out", f"e{i}.csv", "--force", *cfg]) == 0
        rows = list(csv.DictReader(open(f"e{i}.csv")))
        assert [(r["class"], r["decision"]) for r in rows] == [(r["class"], r["decision"]) for r in ref], path
        assert max(abs(float(a["p_ok"]) - float(b["p_ok"])) for a, b in zip(rows, ref)) < 1e-4, path
    # a bad file and an oversized one are reported and skipped; the exit code says some failed
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(next(images.rglob("*.png")), mixed / "a_good.png")
    (mixed / "b_broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(mixed / "c_huge.png")
    monkeypatch.setattr(pp, "MAX_PIXELS", 50 * 50)
    capsys.readouterr()
    assert main(["predict", str(mixed), "--model-path", "run/export", "--out", "mixed.csv", *cfg]) == 1
    err = capsys.readouterr().err
    assert "b_broken.png: not a readable image" in err and "c_huge.png: image is 60x60 = 3600 pixels" in err
    assert "2 of 3 file(s) failed" in err
    assert [Path(r["path"]).name for r in csv.DictReader(open("mixed.csv"))] == ["a_good.png"]
    # an existing output is not overwritten without --force
    assert main(["predict", str(mixed), "--model-path", "run/export", "--out", "mixed.csv", *cfg]) == 2
    assert "mixed.csv exists; pass --force" in capsys.readouterr().err


def test_changed_budget_replans_without_remeasuring(project, monkeypatch):
    monkeypatch.chdir(project)
    sens = project / "run" / "sensitivity.safetensors"
    before = sens.stat().st_mtime_ns
    assert main(["plan", "--config", "params.yaml", "--budget", "1000", "-q"]) == 0
    assert json.loads((project / "run" / "plan.json").read_text())["budget"] == 1000
    assert sens.stat().st_mtime_ns == before
    assert main(["plan", "--config", "params.yaml", "-q"]) == 0  # restore for other tests


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = [
    # (what, argv builder, expected fragment of the one-line message)
    ("missing config", lambda p: ["plan", "--config", str(p / "nope.yaml")], "nope.yaml"),
    ("unknown key", lambda p: ["plan", "--config", str(_write(p / "c1.yaml", "plan:\n  budgt: 5\n"))], "plan.budgt"),
    ("unknown section", lambda p: ["plan", "--config", str(_write(p / "c2.yaml", "optim: {}\n"))], "optim"),
    ("invalid yaml", lambda p: ["plan", "--config", str(_write(p / "c3.yaml", "plan: [\n"))], "invalid YAML"),
    ("bad budget text", lambda p: ["plan", "--config", "params.yaml", "--budget", "lots"], "budget='lots'"),
    ("zero budget", lambda p: ["plan", "--config", "params.yaml", "--budget", "0"], "positive budget"),
    ("budget above model", lambda p: ["plan", "--config", "params.yaml", "--budget", "900M"], "exceeds"),
    ("bad structured", lambda p: ["plan", "--config", "params.yaml", "--structured", "dora"], "structured='dora'"),
    (
        "modules with per-row",
        lambda p: ["plan", "--config", "params.yaml", "--structured", "lora"],
        "plan.structured=lora needs plan.allocation: global",
    ),
    ("no sensitivity yet", lambda p: ["plan", "--config", "params.yaml", "--run", str(p / "empty")], "measure"),
    ("unknown model", lambda p: ["measure", "--config", "params.yaml", "--model", "vit_hugee"], "unknown model"),
    ("weights file missing", lambda p: ["measure", "--config", "params.yaml", "--weights", "w.pth"], "w.pth"),
    ("bad head", lambda p: ["measure", "--config", "params.yaml", "--head", "zero"], "sensitivity.head"),
    ("data dir missing", lambda p: ["measure", "--config", "params.yaml", "--data", str(p / "nodata")], "nodata"),
    ("raw dir missing", lambda p: ["prepare", "--config", "params.yaml", "--raw", str(p / "noraw")], "noraw"),
    ("predict missing input", lambda p: ["predict", str(p / "ghost.png"), "--config", "params.yaml"], "ghost.png"),
    (
        "corrupt adapter",
        lambda p: ["evaluate", "--config", "params.yaml", "--model-path", str(p / "badadapter")],
        "badadapter",
    ),  # fmt: skip
    ("bad train key value", lambda p: ["train", "--config", "params.yaml", "--epochs", "0"], "epochs=0"),
]


@pytest.mark.parametrize("what, argv, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(what, argv, fragment, project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    (tmp_path / "badadapter").mkdir()
    (tmp_path / "badadapter" / "tuned.json").write_text("{}")
    (tmp_path / "badadapter" / "tuned.safetensors").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    plan_before = (project / "run" / "plan.json").read_bytes()
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert fragment in err, err
    assert (project / "run" / "plan.json").read_bytes() == plan_before  # nothing half-written


def test_train_config_is_built_from_every_train_key():
    params = load_params(None, {"train.epochs": 3, "train.lr": 0.5, "train.grad_clip": 2.0})
    cfg = stages.train_config(params).to_dict()
    assert (cfg["epochs"], cfg["lr"], cfg["grad_clip"]) == (3, 0.5, 2.0)
    read_here = set(stages._TRAIN_EXTRA)  # the stage's own keys (probe, loaders), not TrainConfig's
    assert set(params["train"]) - read_here <= set(cfg)


def test_set_overrides_any_key_and_flags_win(project, monkeypatch):
    monkeypatch.chdir(project)
    args = build_parser().parse_args(["train", "--set", "train.lr=0.25", "--set", "export.precisions=[fp32]"])
    params = params_from_args(args)
    assert params["train"]["lr"] == 0.25 and params["export"]["precisions"] == ["fp32"]
    args = build_parser().parse_args(["train", "--set", "train.lr=0.25", "--lr", "0.5"])
    assert params_from_args(args)["train"]["lr"] == 0.5  # the verb's own flag is applied after --set


def test_debug_shows_traceback(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(PlanError, match="budget='lots'"):  # raised, not turned into "error: ..." and exit 2
        main(["plan", "--config", "params.yaml", "--budget", "lots", "--debug"])


def test_sensitivity_uses_fixed_shuffle(project, monkeypatch, tmp_path):
    """Prepared splits are stored class by class; measuring must not see one-class batches."""
    import spt_core.sensitivity as sensitivity

    seen: list[list[int]] = []
    real = sensitivity.measure_sensitivity

    def spy(model, loader, *args, **kw):
        def batches():
            for batch in loader:
                seen.append(batch[1].tolist())
                yield batch

        return real(model, batches(), *args, **kw)

    monkeypatch.setattr(sensitivity, "measure_sensitivity", spy)
    monkeypatch.chdir(project)
    assert main(["measure", "--config", "params.yaml", "--run", str(tmp_path), "-q"]) == 0
    assert len(seen) >= 2 and all(len(set(labels)) > 1 for labels in seen[:2]), seen  # every measured batch mixes
    s = sensitivity.Sensitivity.load(tmp_path / "sensitivity.safetensors")
    assert s.meta["batches"] == 2 and s.meta["images"] == 16
    assert torch.isfinite(torch.cat([v.flatten() for v in s.scores.values()])).all()


def test_flags_can_set_null():
    """`--n-test all` / `--img-size none` set the key to null instead of being ignored."""
    args = build_parser().parse_args(["prepare", "--n-test", "all", "--n-train", "12", "--set", "data.split=null"])
    params = params_from_args(args)
    assert params["data"]["n_test"] is None and params["data"]["n_train"] == 12
    args = build_parser().parse_args(["measure", "--input-size", "none"])
    assert params_from_args(args)["model"]["input_size"] is None


def test_the_stage_list_makes_the_verbs_and_the_order_of_run(monkeypatch, tmp_path, capsys):
    """A stage added to `stages.STAGES` is a verb and runs in its place in `run`; the tracking stage (the list's
    last) is a verb too, but `run` stops before it, and --no-export before every stage that needs the merge."""
    ran: list[str] = []

    def fake(name: str, **flags) -> stages.Stage:
        return stages.Stage(name, lambda params: ran.append(name) or {"stage": name}, (), f"the {name} stage",
                            lambda result, params: f"ran {result['stage']}", **flags)  # fmt: skip

    real = stages.STAGES
    assert real[-1].name == "track" and real[-1].tracks and real[-1].cmd == "python -m pipelines.track"
    order = [fake(s.name, needs_merge=s.needs_merge, tracks=s.tracks) for s in real]
    order.insert([s.name for s in real].index("export"), fake("inspect"))
    monkeypatch.setattr(stages, "STAGES", tuple(order))
    monkeypatch.chdir(tmp_path)
    flags = ["--raw", str(tmp_path), "-q"]  # an existing paths.raw: `run` makes no demo images first
    assert main(["inspect", *flags]) == 0 and ran == ["inspect"]
    assert capsys.readouterr().out.strip() == "ran inspect"
    ran.clear()
    assert main(["run", *flags]) == 0
    assert ran == ["prepare", "measure", "plan", "train", "evaluate", "merge", "inspect", "export"]
    ran.clear()
    assert main(["run", "--no-export", *flags]) == 0 and ran[-2:] == ["merge", "inspect"]
    assert build_parser().parse_args(["inspect"]).verb == "inspect"
    monkeypatch.undo()  # the parser is built from the list in force: without the stage, no verb
    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect"])


def test_predict_csv_has_one_p_good_column_even_for_a_class_named_good(tmp_path):
    """The header names each column once: P(good) (the good class's probability, the decision's input) once, and
    the per-class columns p_<class>, so a good class named "good" is not a second P(good) column."""
    import numpy as np
    from PIL import Image

    from benchmarks.stat_model import build_artifact
    from pipelines.predict import predict_files

    names = ["good", "scratch", "spot", "crack"]
    w, b = np.zeros((4, 12)), np.array([2.0, 0.0, 0.0, 0.0])  # every part: P(good) = e^2 / (e^2 + 3)
    art = build_artifact(tmp_path / "art", "1", w, b, 16, extra={"class_names": names, "ok_class": "good",
                                                                    "threshold": 0.5})  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 90, 120)).save(images / f"{i}.png")
    out = predict_files(art, [images], tmp_path / "p.csv")
    with open(out["out"]) as f:
        header = next(csv.reader(f))
    assert header == ["path", "class", "confidence", "P(good)", "decision", "p_good", "p_scratch", "p_spot", "p_crack"]
    assert len(set(header)) == len(header) and sum(h.startswith("P(") for h in header) == 1
    rows = list(csv.DictReader(open(out["out"])))
    p = float(np.exp(2) / (np.exp(2) + 3))
    assert all(abs(float(r["P(good)"]) - p) < 1e-5 and r["decision"] == "ok" for r in rows)


def test_every_verb_prints_its_help(capsys):
    """argparse formats a help text only when asked: a stray % in a config key's help crashes `VERB --help`."""
    sub = next(a for a in build_parser()._actions if a.choices and hasattr(a, "_name_parser_map"))
    for verb, parser in sub.choices.items():
        text = parser.format_help()
        assert text.startswith("usage:") and verb in text
