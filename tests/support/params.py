"""The tiny pipeline params the tests share: 4 classes x 6 demo images of 32 px, a random-init timm test model.

`TINY` (test_vit, CPU) is what the DVC, MLflow and publish tests train, in two variants: `TINY_RUN` (two epochs,
the `tiny_run` fixture of tests/conftest.py) and `TINY_REPO` (one epoch and an FP32 export, the throw-away DVC repo
of support/projects.py). `TINY_FLOW` (test_efficientnet, its own paths, FP32 export) is one retrain of the Prefect
flow tests (tests/test_flows.py, tests/test_lines.py).
"""

TINY = {
    "demo": {"n_per_class": 6, "size": 32, "counts": None},
    "data": {"split": None, "n_train": 12, "n_val": 8},
    "model": {"name": "test_vit", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 2, "batch_size": 8, "probe_epochs": 2, "device": "cpu"},
    "plan": {"budget": "5%"},
    # warmup_epochs 0: with one warm-up epoch the lr would never reach train.lr and the tuned weights would not change.
    # probe_baseline off: these random-init runs fall below the probe on 8 val images, and train.below_probe would then
    # keep the probe; these tests are about the tuned model's path (tests/test_below_probe.py covers the rule). The
    # probe is still fitted as the starting head (head_init: probe, set here since the default became random), so the
    # run records the probe's numbers that the MLflow tests read back.
    "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "probe_epochs": 2, "device": "cpu", "amp": False,
              "probe_baseline": False, "head_init": "probe"},
}  # fmt: skip
TINY_RUN = {**TINY, "train": {**TINY["train"], "epochs": 2}}
TINY_REPO = {**TINY, "export": {"precisions": ["fp32"], "calibration_size": 8}}  # one epoch, FP32 export
RAW_MD5 = "0123456789abcdef0123456789abcdef.dir"  # the data version the raw.dvc of `tiny_run` declares

TINY_FLOW = {  # 4 classes x 6 images of 32 px per batch; random-init test model; one epoch; FP32 export only
    "paths": {"raw": "data/raw", "data": "data/prepared", "run": "runs/main"},
    "demo": {"n_per_class": 6, "size": 32, "counts": None},
    "data": {"split": None, "n_train": 12, "n_val": 8},
    "model": {"name": "test_efficientnet", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 2, "batch_size": 8, "probe_epochs": 2, "device": "auto"},
    "plan": {"budget": "5%"},
    # no linear probe: a 1-epoch random-init model is often below it, and the gate then (rightly) refuses the
    # hand-over (tests/test_line.py covers that rule); these tests are about the flow's mechanics
    "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "probe_epochs": 2, "amp": False, "lr": 0.01,
              "head_init": "random", "probe_baseline": False},
    "export": {"precisions": ["fp32"], "calibration_size": 8},
}  # fmt: skip
