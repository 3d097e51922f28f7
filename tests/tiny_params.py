"""The tiny pipeline params shared by the DVC and MLflow tests: 4 classes x 6 images of 32 px, a ViT test model."""

TINY = {
    "demo": {"n_per_class": 6, "size": 32, "counts": None},
    "data": {"split": None, "n_train": 12, "n_val": 8},
    "model": {"name": "test_vit", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 2, "batch_size": 8, "probe_epochs": 2, "device": "cpu"},
    "plan": {"budget": "5%"},
    # warmup_epochs 0: with one warm-up epoch the lr would never reach train.lr and the tuned weights would not change
    "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "probe_epochs": 2, "device": "cpu", "amp": False},
}
