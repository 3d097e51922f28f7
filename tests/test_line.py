"""A real line's data: imbalanced classes, 16-bit frames, a declared good class, defect-first metrics, a threshold.

Exact where the maths is exact: split counts, confusion/rates/Wilson on a known case, the threshold's escape rate,
the epoch two selection metrics pick on a scripted model, the edge's decision at the manifest's threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spt_core.data import BalancedSampler, class_weights, prepare
from spt_core.portable.errors import DataError
from spt_core.portable.metrics import confusion_matrix, wilson_interval
from spt_core.portable.operating_point import OperatingPoint
from spt_core.portable.preprocess import Preprocess, load_rgb, preprocess_image


def _folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------------ split
def test_proportional_split_uses_every_image_of_a_60_5_10_folder(tmp_path):
    src = _folder(tmp_path / "line", {"ok": 60, "crack": 5, "scratch": 10})
    info = prepare(str(src), tmp_path / "out", split=(0.7, 0.15, 0.15), min_per_class=1, ok_class="ok")
    # per class: val = test = max(min, round(0.15 n)), train = the rest
    assert info.counts == {
        "train": {"crack": 3, "ok": 42, "scratch": 6},
        "val": {"crack": 1, "ok": 9, "scratch": 2},
        "test": {"crack": 1, "ok": 9, "scratch": 2},
    }
    assert sum(sum(c.values()) for c in info.counts.values()) == 75  # every image
    assert info.ok_class == "ok" and info.params["split"] == [0.7, 0.15, 0.15]
    again = prepare(str(src), tmp_path / "out2", split=(0.7, 0.15, 0.15), min_per_class=1, ok_class="ok")
    assert again.data_hash == info.data_hash  # seeded: the same files in the same splits


def test_class_below_the_minimum_is_a_one_line_error_naming_it(tmp_path):
    src = _folder(tmp_path / "line", {"ok": 60, "crack": 4, "scratch": 10})
    with pytest.raises(DataError, match=r"class 'crack' has 4 image\(s\); the split needs at least 5") as e:
        prepare(str(src), tmp_path / "out", split=(0.7, 0.15, 0.15), min_per_class=2, ok_class=None)
    assert "\n" not in str(e.value)


def test_ok_class_absent_from_the_classes_fails_at_prepare_with_the_names(tmp_path):
    src = _folder(tmp_path / "line", {"coat": 6, "pullover": 6, "shirt": 6})
    with pytest.raises(DataError, match=r"data.ok_class='ok' is not a class .*\['coat', 'pullover', 'shirt'\]"):
        prepare(str(src), tmp_path / "out", split=(0.6, 0.2, 0.2), min_per_class=1, ok_class="ok")


def test_split_modes_are_exclusive_in_params():
    from pipelines.config import load_params

    with pytest.raises(Exception, match="two split modes"):
        load_params(None, {"data.n_train": 100})
    p = load_params(None, {"data.split": None, "data.n_train": 100})
    assert p["data"]["split"] is None


# ------------------------------------------------------------------------------------------------ 16-bit
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_mid_grey_equals_its_8bit_twin(tmp_path, fmt):
    grey16 = np.full((16, 16), 32768, np.uint16)
    Image.fromarray(grey16).save(tmp_path / f"g16.{fmt}")
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / f"g16.{fmt}").mode.startswith("I;16")  # a real 16-bit file
    assert Image.open(tmp_path / f"g16.{fmt}").convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # the old bug
    pre = Preprocess(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1))
    x16, x8 = preprocess_image(tmp_path / f"g16.{fmt}", pre), preprocess_image(tmp_path / "g8.png", pre)
    assert np.abs(x16 - x8).max() <= 1 / 255
    assert abs(float(x16.mean()) - 32768 / 65535) <= 1 / 255


def test_mono12_in_16bit_container_scaled_by_the_declared_depth(tmp_path):
    Image.fromarray(np.full((8, 8), 2048, np.uint16)).save(tmp_path / "m12.png")  # Mono12 mid grey, 0..4095
    assert np.asarray(load_rgb(tmp_path / "m12.png", 12))[0, 0, 0] == round(2048 * 255 / 4095)  # 128
    assert np.asarray(load_rgb(tmp_path / "m12.png"))[0, 0, 0] == round(2048 * 255 / 65535)  # auto 16: dark (8)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tiff")
    assert np.asarray(load_rgb(tmp_path / "f.tiff"))[0, 0, 0] == 128  # F: 0..1


def test_prepare_reads_16bit_tiff_through_the_same_conversion(tmp_path):
    for cls, v in (("ok", 32768), ("crack", 1000)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), v, np.uint16)).save(tmp_path / "src" / cls / f"{i}.tif")
    prepare(str(tmp_path / "src"), tmp_path / "out", split=(0.6, 0.2, 0.2), min_per_class=1, ok_class="ok")
    written = next((tmp_path / "out" / "train" / "ok").glob("*.png"))
    assert np.asarray(Image.open(written))[0, 0].tolist() == [128, 128, 128]


def test_demo_writes_an_imbalanced_mono16_line(tmp_path):
    from spt_core.demo import generate_demo_defects

    out = generate_demo_defects(tmp_path, counts={"ok": 9, "crack": 2}, classes=("ok", "crack"), size=16, bit_depth=12)
    assert [len(list((out / c).glob("*.png"))) for c in ("ok", "crack")] == [9, 2]
    im = Image.open(next((out / "ok").glob("*.png")))
    assert im.mode.startswith("I;16") and np.asarray(im).max() <= 4095


def test_oversized_image_is_the_documented_one_line_error(tmp_path, monkeypatch):
    import spt_core.portable.preprocess as pp

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(pp, "MAX_PIXELS", 1000)
    with pytest.raises(DataError, match=r"big.png: image is 50x40 = 2000 pixels, over the limit of 1000; resize it"):
        pp.load_rgb(tmp_path / "big.png")


# ------------------------------------------------------------------------------------------------ metrics
def test_confusion_matrix_and_rates_exact_on_a_known_case():
    names = ["crack", "ok", "scratch"]
    # true:  crack x4, ok x10, scratch x2
    y = [0, 0, 0, 0] + [1] * 10 + [2, 2]
    p = [0, 0, 1, 2] + [1] * 8 + [0, 2] + [1, 2]  # 1 crack escapes, 2 ok rejected, 1 scratch escapes
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[2, 1, 1], [1, 8, 1], [0, 1, 1]]
    m = OperatingPoint("ok").metrics(y, np.eye(3)[p], names)  # no threshold: the top class decides
    assert m["escape_rate"]["k"] == 2 and m["escape_rate"]["n"] == 6 and m["escape_rate"]["value"] == 2 / 6
    assert m["overkill"]["k"] == 2 and m["overkill"]["n"] == 10 and m["overkill"]["value"] == 0.2
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 8 / 10 + 1 / 2) / 3, abs=1e-15)
    assert m["per_class"]["crack"]["recall"]["value"] == 0.5
    assert m["per_class"]["crack"]["precision"]["value"] == 2 / 3
    assert m["per_class"]["scratch"]["precision"]["value"] == 1 / 3
    # Wilson: 0 of 10 -> [0, z^2 / (n + z^2)]
    z2 = 1.959963984540054**2
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), abs=1e-12)
    assert m["overkill"]["ci95"] == wilson_interval(2, 10)
    assert OperatingPoint().metrics(y, np.eye(3)[p], names)["confusion"] == cm.tolist()  # no good class: no rates
    assert "escape_rate" not in OperatingPoint().metrics(y, np.eye(3)[p], names)


def test_threshold_meets_the_escape_target_on_validation_with_least_overkill():
    rng = np.random.default_rng(1)
    is_defect = np.r_[np.ones(40, bool), np.zeros(400, bool)]
    p_good = np.r_[rng.beta(2, 5, 40), rng.beta(5, 2, 400)]  # overlapping: no threshold is perfect
    labels, probs, names = np.where(is_defect, "dent", "ok"), np.c_[p_good, 1 - p_good], ["ok", "dent"]

    def escape_at(t: float) -> float:
        op = OperatingPoint("ok", t)
        return op.rates(labels, op.decide(op.p_good(probs, names)))["escape_rate"]["value"]

    for target in (0.0, 0.05, 0.1, 0.25, 1.0):
        t = OperatingPoint.choose(labels, probs, names, "ok", target).threshold
        assert escape_at(t) <= target + 1e-12, (target, t, escape_at(t))
        lower = np.sort(p_good[p_good < t])  # the next lower threshold (the nearest sample below) breaks the target
        if lower.size and target < 1.0:
            assert escape_at(lower[-1]) > target
    zero = OperatingPoint.choose(labels, probs, names, "ok", 0.0).threshold
    assert zero > p_good[is_defect].max()  # zero escapes: above every defect


class Scripted(nn.Module):
    """Epoch e's validation predictions are scripted: e = the number of training forwards so far (1 batch/epoch)."""

    def __init__(self, scripts: list[list[int]], k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.scripts, self.k, self.epoch = scripts, k, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.epoch += 1
            return torch.zeros(len(x), self.k) + self.w
        idx = x[:, 0].long()
        return torch.eye(self.k)[torch.tensor(self.scripts[self.epoch - 1])[idx]] * 5 + self.w


def test_balanced_and_plain_accuracy_select_different_epochs():
    from spt_core.train import TrainConfig, fit

    y = torch.tensor([1] * 18 + [0, 0])  # val: 18 ok (1), 2 defects (0)
    epoch1 = [1] * 20  # all "ok": accuracy 0.90, balanced 0.50
    epoch2 = [1] * 16 + [0, 0, 0, 0]  # both defects caught, 2 ok rejected: accuracy 0.90, balanced 0.944
    epoch3 = [1] * 17 + [0, 1, 1]  # 1 ok rejected, both defects escape: accuracy 0.85, balanced 0.472
    scripts = [epoch1, epoch2, epoch3]
    x = torch.arange(20).float()[:, None]
    loaders = {"train": DataLoader(TensorDataset(x, y), batch_size=20), "val": DataLoader(TensorDataset(x, y), 20)}
    best = {}
    for select in ("accuracy", "balanced_accuracy", "overkill_at_escape"):
        model = Scripted(scripts, 2)
        cfg = TrainConfig.scaled(3, select=select, device="cpu", progress=False, warmup_epochs=0)
        h = fit(model, loaders, cfg, ok_index=1, max_escape_rate=0.0)
        best[select] = h.best_epoch
    assert best == {"accuracy": 1, "balanced_accuracy": 2, "overkill_at_escape": 2}


def test_balancing_weights_and_batches_exact():
    w = class_weights([0] * 8 + [1] * 2, 3)
    assert w.tolist() == pytest.approx([10 / (3 * 8), 10 / (3 * 2), 0.0])
    labels = [0] * 90 + [1] * 6 + [2] * 4
    order = list(BalancedSampler(labels, seed=0))
    assert len(order) == 100
    for i in range(0, 99, 3):  # the classes take turns: every 3 draws hold each class once
        assert sorted(labels[j] for j in order[i : i + 3]) == [0, 1, 2]
    assert sorted(BalancedSampler([0, 0, 1, 1], seed=3)) == [0, 1, 2, 3]  # balanced data: a permutation


@pytest.mark.parametrize(("counts", "train", "auto_is"), [({"ok": 10, "crack": 7}, [3, 6], "sampler"),
                                                           ({"ok": 9, "crack": 7}, [3, 5], "none"),
                                                           ({"ok": 8, "crack": 8}, [4, 4], "none")])  # fmt: skip
def test_balance_auto_is_the_sampler_on_an_imbalanced_split_and_plain_batches_otherwise(tmp_path, counts, train,
                                                                                         auto_is):  # fmt: skip
    from spt_core.data import make_loaders
    from spt_core.portable.metrics import resolve_balance

    src = _folder(tmp_path / "line", counts)
    prepare(str(src), tmp_path / "out", split=(0.5, 0.25, 0.25), min_per_class=1, ok_class="ok")
    pre = Preprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)

    def order(balance: str) -> list[int]:
        loader = make_loaders(tmp_path / "out", pre, batch_size=4, seed=1, balance=balance)["train"]
        assert np.bincount(loader.dataset.labels).tolist() == train  # classes sorted: crack, ok
        loader.sampler.set_epoch(2)
        return list(loader.sampler)

    # 6 good against 3 cracks is 2x: the sampler; 5 against 3 is under it, 4 against 4 balanced: plain batches
    assert order("auto") == order(auto_is) != order("sampler" if auto_is == "none" else "none")
    assert resolve_balance("auto", [2] * 8 + [0] * 4) == "sampler"  # labels need not start at 0
    assert resolve_balance("auto", [2] * 7 + [0] * 4) == "none"
    assert resolve_balance("loss", [0] * 10 + [1]) == "loss"  # a value other than auto is as given


# ------------------------------------------------------------------------------------------------ warnings, gates
def test_below_probe_warns_and_the_flow_does_not_hand_over():
    from pipelines.assess import probe_warnings
    from pipelines.tasks import HANDOVER, NOT_PROMOTED, handover_gate

    w = probe_warnings({"select": "balanced_accuracy", "val_score": 0.70, "probe_val_score": 0.75})
    assert len(w) == 1 and "below the linear probe on validation" in w[0]
    assert probe_warnings({"select": "accuracy", "val_score": 0.8, "probe_val_score": 0.75}) == []
    assert handover_gate(0.99, 0.5, 0.0, True, w)[0] == NOT_PROMOTED
    assert handover_gate(0.99, 0.5, 0.0, True, [])[0] == HANDOVER


def _arm(escaped: int, defects: int, acc: float) -> dict:
    return {"labelled": 1000, "accuracy": acc, "accuracy_ci95": None, "defect_recall": None, "errors": 0,
            "requests": 1000, "escaped": escaped, "defects": defects, "escape_rate": escaped / defects,
            "escape_rate_ci95": wilson_interval(escaped, defects), "overkill": 0.0,
            "latency_ms": {"p50": 1.0}}  # fmt: skip


def test_promotion_never_lets_a_worse_escape_rate_through_whatever_its_accuracy():
    from deploy.edge.rollout.decision import PROMOTE, ROLLBACK, decide
    from deploy.edge.rollout.manifest import DecisionRule

    def report(ch: dict) -> dict:
        return {"versions": {"champion": "1", "challenger": "2"}, "ok_class": "ok",
                "overall": {"champion": _arm(2, 100, 0.90), "challenger": ch}}  # fmt: skip

    worse = decide(report(_arm(15, 100, 0.99)), DecisionRule())  # +9 pt accuracy, 15 % vs 2 % escapes
    assert worse.action == ROLLBACK and "escape rate" in worse.reasons[0]
    within = decide(report(_arm(3, 100, 0.95)), DecisionRule())  # 3 % vs 2 %: inside its interval
    assert within.action == PROMOTE


def test_rollout_reads_ok_class_from_the_champion_artifact(tmp_path):
    from deploy.edge.rollout.manifest import RolloutError, parse_config
    from deploy.edge.rollout.stats import resolve_operating_point

    art = tmp_path / "art"
    art.mkdir()
    manifest = {"format": "onnx", "precision": "fp32", "model_version": "1", "class_names": ["dent", "good"],
                "preprocess": Preprocess(size=(8, 8)).to_dict(), "files": {"model.onnx": "0" * 64}}  # fmt: skip
    (art / "manifest.json").write_text(json.dumps({**manifest, "ok_class": "good", "threshold": 0.7}))
    base = {"line": "l", "champion": {"version": "1", "path": "art"}}
    assert parse_config(base, tmp_path).ok_class is None  # rollout.yaml has no default of its own
    assert resolve_operating_point(parse_config(base, tmp_path)) == OperatingPoint("good", 0.7)
    with pytest.raises(RolloutError, match="champion's manifest declares 'good'"):
        resolve_operating_point(parse_config({**base, "ok_class": "dent"}, tmp_path))
    with pytest.raises(RolloutError, match="not a class of the champion"):
        resolve_operating_point(parse_config({**base, "ok_class": "ok"}, tmp_path))
    (art / "manifest.json").write_text(json.dumps(manifest))  # the artifact declares none: rollout.yaml's fills in
    assert resolve_operating_point(parse_config({**base, "ok_class": "dent"}, tmp_path)) == OperatingPoint("dent")


# ------------------------------------------------------------------------------------------------ the edge
def test_the_edge_applies_the_manifests_threshold(tmp_path):
    import io

    import yaml
    from support.artifacts import ALWAYS_OK, build_artifact

    from deploy.edge.service import EdgeService

    w, b = ALWAYS_OK
    p_ok = math.e / (math.e + 3)  # 0.475: the argmax is ok whatever the threshold
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(buf, format="PNG")  # a 16-bit camera frame
    answers = {}
    for v, threshold in (("1", 0.45), ("2", 0.50)):
        build_artifact(tmp_path / f"v{v}", v, w, b, 16, extra={"threshold": threshold})
        cfg = tmp_path / f"rollout{v}.yaml"
        cfg.write_text(yaml.safe_dump({"line": "l", "champion": {"version": v, "path": f"v{v}"}, "log_dir": "logs"}))
        service = EdgeService(cfg)
        status, body = service.predict(buf.getvalue(), "cam-1", None)
        service.close()
        assert status == 200, body
        assert body["class"] == "ok" and body["p_good"] == pytest.approx(p_ok, abs=1e-5)
        answers[threshold] = body["decision"]
    assert answers == {0.45: "ok", 0.50: "reject"}


def test_loss_selection_prefers_the_confident_epoch():
    """select=loss: minus the mean cross-entropy of the true class; accuracy prefers the other model here."""
    from spt_core.portable.operating_point import selection_score

    labels = np.array([0, 1])
    hesitant = np.array([[0.51, 0.49], [0.49, 0.51]])  # both right, barely: accuracy 1.0, mean log p = log 0.51
    confident = np.array([[0.99, 0.01], [0.6, 0.4]])  # one wrong: accuracy 0.5, mean log p = (log .99 + log .4) / 2
    assert selection_score(labels, hesitant, "loss") == pytest.approx(np.log(0.51))
    assert selection_score(labels, confident, "loss") == pytest.approx((np.log(0.99) + np.log(0.4)) / 2)
    assert selection_score(labels, confident, "loss") > selection_score(labels, hesitant, "loss")
    assert selection_score(labels, confident, "accuracy") < selection_score(labels, hesitant, "accuracy")
