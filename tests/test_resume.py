"""A training run killed after an epoch and resumed from its checkpoint ends identical to one that never stopped
(history, weights, BN statistics); a checkpoint of another model, config or selection rule is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support.training import comparable, random_loaders, tiny_effnet

from spt_core.portable.errors import SensituneError
from spt_core.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import timm, torch
    from torch.utils.data import DataLoader, TensorDataset
    from spt_core.train import TrainConfig, fit

    def run(out_dir):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # same reduction order in the pytest process and the subprocess
        try:
            torch.manual_seed(0)
            model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.2, drop_path_rate=0.1)
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(("classifier.", "blocks.4.0.conv_pwl.", "blocks.4.0.bn3.")))
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 3, (48,), generator=g)
            gen = torch.Generator().manual_seed(1)  # decides the order: fit must restore it, not only the global RNG
            loaders = {
                "train": DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=True, generator=gen),
                "val": DataLoader(TensorDataset(x[32:40], y[32:40]), batch_size=8),
                "test": DataLoader(TensorDataset(x[40:], y[40:]), batch_size=8),
            }
            cfg = TrainConfig.scaled(4, warmup_epochs=1, lr=1e-2, freeze_bn_stats=False, progress=False)
            kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))

            def on_epoch(rec):
                if rec["epoch"] == kill_after:
                    os._exit(1)  # no cleanup, like a SIGKILL

            hist = fit(model, loaders, cfg, out_dir, on_epoch=on_epoch)
            return hist, model
        finally:
            torch.set_num_threads(threads)

    if __name__ == "__main__":
        out = Path(sys.argv[1])
        hist, model = run(out)
        (out / "history.json").write_text(json.dumps(hist.to_dict()))
        torch.save(model.state_dict(), out / "final.pt")
    """
)


def test_killed_run_resumes_to_identical_result(tmp_path):
    script = tmp_path / "run_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SENSITUNE_NO_PROGRESS": "1"}
    killed = subprocess.run([sys.executable, script, out], env={**env, "KILL_AFTER_EPOCH": "2"}, capture_output=True)
    assert killed.returncode == 1, killed.stderr.decode()[-2000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]["epochs"]) == 2 and not (out / "history.json").exists()
    # the optimizer really has no weight decay on the 1-D params (bn3 weight/bias, classifier bias)
    wd = sorted((g["weight_decay"], len(g["params"])) for g in ckpt["optimizer"]["param_groups"])
    assert wd == [(0.0, 3), (1e-4, 2)]

    resumed = subprocess.run([sys.executable, script, out], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    h_resumed = json.loads((out / "history.json").read_text())
    assert h_resumed["resumed_at_epoch"] == 2

    ns: dict = {}
    exec(compile(SCRIPT, "run_fit", "exec"), ns)  # the same code, uninterrupted, in this process
    h_full, model = ns["run"](tmp_path / "uninterrupted")
    assert h_full.resumed_at_epoch == 0 and len(h_full.epochs) == 4
    assert comparable(h_resumed) == comparable(h_full.to_dict())
    final = torch.load(out / "final.pt", weights_only=True)  # incl. BN running stats (not frozen here)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())

    # a checkpoint that does not belong to this model or config is refused, not silently mixed in
    other = tiny_effnet()
    other.conv_head.weight.requires_grad_(True)
    cfg = TrainConfig.scaled(4, warmup_epochs=1, lr=1e-2, freeze_bn_stats=False, progress=False)
    with pytest.raises(SensituneError, match=r"conv_head\.weight.*delete it or use a new out dir"):
        fit(other, random_loaders(), cfg, out)
    with pytest.raises(SensituneError, match=r"epochs=4->5"):
        fit(tiny_effnet(), random_loaders(), TrainConfig(**{**cfg.to_dict(), "epochs": 5}), out)
    # one that does not record the rule that ranked its best epoch (an older version) is refused too
    old = torch.load(out / "checkpoint.pt", weights_only=True)
    del old["selection_rule"]
    torch.save(old, out / "checkpoint.pt")
    with pytest.raises(
        SensituneError, match=r"selection rule 'unrecorded \(an older version\)'.*'score>loss'.*delete it"
    ):
        fit(tiny_effnet(), random_loaders(), cfg, out)
