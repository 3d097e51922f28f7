"""allocate: global top-k, the α/β rule at its boundaries, budget parsing, determinism, any timm backbone."""

import functools

import pytest
import timm
import torch

from spt_core.allocate import SPT_RULE, allocate, structured_cost
from spt_core.candidates import Candidate
from spt_core.plan import Plan, parse_budget
from spt_core.portable.errors import PlanError
from spt_core.sensitivity import Sensitivity, measure_sensitivity


def _toy() -> Sensitivity:
    """A 20-vector scored highest, then a 100×50 matrix with 40 hot entries, the rest zero.

    LoRA rank 2 on the matrix costs 2·(50+100) = 300 → switches at 300/α = 30 selected entries (α=10);
    the vector switches to whole at 20/β = 4 selected entries (β=5).
    """
    vec = Candidate("v", "m", "bias", "vector", (20,), 0)
    mat = Candidate("w", "m", "weight", "linear", (100, 50), 1)
    w = torch.zeros(100, 50)
    w.view(-1)[torch.arange(0, 4000, 100)] = 10.0  # 40 hot entries spread over rows
    scores = {"v": torch.full((20,), 100.0), "w": w}
    return Sensitivity(scores, {"v": vec, "w": mat}, {"backbone_params": 5020, "block_names": ["a", "b"]})


def _allocate(sensitivity: Sensitivity, budget: int | str, **options) -> Plan:
    """`allocate` with SPT's rule (`SPT_RULE`) for every option a test leaves out: allocate has no defaults."""
    return allocate(sensitivity, budget, **{**SPT_RULE, **options})


def _kinds(plan: Plan) -> dict:
    return {t.param: (t.kind, t.count) for t in plan.targets}


@pytest.mark.parametrize(
    "budget, expected",
    [
        (3, {"v": ("sparse", 3)}),  # below 1/β of the vector: sparse entries
        (4, {"v": ("sparse", 3), "w": ("sparse", 1)}),  # a 4th vector entry would make it whole (20) > budget:
        (19, {"v": ("sparse", 3), "w": ("sparse", 16)}),  # the rest is filled with the next entries that stay sparse
        (20, {"v": ("whole", 20)}),  # exactly len/β selected → whole
        (49, {"v": ("whole", 20), "w": ("sparse", 29)}),  # 29 < 300/α matrix entries: sparse
        (50, {"v": ("whole", 20), "w": ("sparse", 29)}),  # the 30th entry would switch to LoRA (300)
        (319, {"v": ("whole", 20), "w": ("sparse", 29)}),
        (320, {"v": ("whole", 20), "w": ("lora", 300)}),  # exactly σ_opt = 30 selected → LoRA
    ],
)
def test_alpha_beta_boundaries(budget, expected):
    plan = _allocate(_toy(), budget, structured="lora", rank=2, alpha=10, beta=5)
    assert _kinds(plan) == expected
    assert plan.trainable <= budget


def test_sparse_entries_are_the_top_scored_ones():
    plan = _allocate(_toy(), 49, structured="lora", rank=2)
    assert torch.equal(plan.indices["w"], torch.arange(0, 2900, 100))  # the 29 first hot entries, in order
    plan = _allocate(_toy(), 3, structured="lora", rank=2)
    assert torch.equal(plan.indices["v"], torch.tensor([0, 1, 2]))  # ties → earlier position first
    plan = _allocate(_toy(), 10, structured="lora", rank=2)
    assert torch.equal(plan.indices["w"], torch.arange(0, 700, 100))  # the fill takes the next-ranked entries


def test_sparse_only_never_builds_modules():
    plan = _allocate(_toy(), 320, structured="none", beta=5)
    assert _kinds(plan) == {"v": ("whole", 20), "w": ("sparse", 300)}


def test_adapter_cost():
    plan = _allocate(_toy(), 20 + 2 * 2 * 100 + 2 + 100, structured="adapter", rank=2)
    assert _kinds(plan)["w"] == ("adapter", 502)  # 2·r·d + r + d with d = 100 output channels


def test_budget_parsing():
    assert parse_budget(400000, 10**6) == 400000
    assert parse_budget("0.4M", 10**6) == 400000
    assert parse_budget("400k", 10**6) == 400000
    assert parse_budget("0.5%", 2 * 10**6) == 10000
    for bad in (0, "0", "0%", "-5", "lots", "2M", True):
        with pytest.raises(PlanError):
            parse_budget(bad, 10**6)
    with pytest.raises(PlanError, match="exceeds"):
        _allocate(_toy(), 10**6)


def test_deterministic_with_ties():
    s = _toy()
    s.scores["w"] = torch.ones(100, 50)  # everything tied
    s.scores["v"] = torch.ones(20)
    a, b = _allocate(s, 77, structured="none"), _allocate(s, 77, structured="none")
    assert a.hash() == b.hash()
    # ties are broken by position: the vector (first) goes whole, then the matrix's first 57 entries
    assert _kinds(a) == {"v": ("whole", 20), "w": ("sparse", 57)}
    assert torch.equal(a.indices["w"], torch.arange(57))


@functools.cache
def _sensitivity(name: str, img_size: int | None = None) -> Sensitivity:
    torch.manual_seed(0)
    kw = {"img_size": img_size} if img_size else {}
    model = timm.create_model(name, num_classes=3, **kw)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    return measure_sensitivity(model, [(x, y)] * 2, batches=2)


@pytest.mark.parametrize(
    "name, kw",
    [("test_vit", {"img_size": 32}), ("convnext_atto", {}), ("resnet10t", {}), ("test_efficientnet", {})],
)
@pytest.mark.parametrize("structured", ["lora", "adapter", "none"])
def test_any_backbone_within_one_module_of_budget(name, kw, structured, tmp_path):
    s = _sensitivity(name, **kw)
    s = Sensitivity({k: v.clone() for k, v in s.scores.items()}, s.candidates, s.meta)
    plan = _allocate(s, "1%", structured=structured, rank=4)
    # the plan stops before the first entry whose unit would switch past the budget: it undershoots by less
    # than the largest unit that can switch (one structured module or one whole vector/kernel)
    largest = max(
        structured_cost(c, c.shape[0], structured, plan.tuner_config)
        if structured != "none" and c.kind != "vector"
        else c.numel
        for c in s.candidates.values()
    )
    assert plan.trainable <= plan.budget
    assert plan.meta["saturated"] or plan.budget - largest <= plan.trainable
    if structured == "none":  # every matrix entry can stay sparse: the fill reaches the budget exactly
        assert plan.trainable == plan.budget
    assert sum(v["params"] for v in plan.by_kind().values()) == plan.trainable
    assert sum(sum(v.values()) for v in plan.by_block().values()) == plan.trainable
    assert all(t.param in s.candidates for t in plan.targets)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.hash() == plan.hash() and again.trainable == plan.trainable
    assert _allocate(s, "1%", structured=structured, rank=4).hash() == plan.hash()


def test_vit_qkv_segments_get_their_own_lora():
    base = _sensitivity("test_vit", img_size=32)
    s = Sensitivity({k: v.clone() for k, v in base.scores.items()}, base.candidates, base.meta)
    s.scores["blocks.0.attn.qkv.weight"][128:] = 1e6  # only v of block 0 is hot
    plan = _allocate(s, 1200, structured="lora", rank=4)
    lora = [t for t in plan.targets if t.kind == "lora"]
    assert [(t.param, t.rows) for t in lora] == [("blocks.0.attn.qkv.weight", (128, 192))]
    assert lora[0].count == 4 * (64 + 64)


def test_damaged_plan_file_is_one_line_error(tmp_path):
    plan = _allocate(_toy(), 49)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match="plan.json") as e:
        Plan.load(tmp_path / "plan.json")
    assert "\n" not in str(e.value)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")


def test_alpha_below_one_is_refused():
    with pytest.raises(PlanError, match="alpha >= 1"):
        _allocate(_toy(), 100, alpha=0.5)


def test_tiny_budget_falls_back_to_sparse_entries():
    """The top unit (a 4-vector) switches whole on its first entry: a budget of 3 still buys sparse entries."""
    s = _toy()
    s.candidates["t"] = Candidate("t", "m", "scale", "vector", (4,), 0)
    s.scores["t"] = torch.full((4,), 1e6)
    plan = _allocate(s, 3, structured="lora", rank=2)
    assert plan.trainable == 3 and {t.param for t in plan.targets} == {"v"}


def test_per_row_gives_every_output_row_its_top_entries():
    """GPS's rule: one k for all rows; on the toy the global rule spends 20 values on the hot vector instead."""
    plan = _allocate(_toy(), 20, structured="none", allocation="per_row")
    # k = 0 fits (k = 1 costs 1 + 100 rows = 101): the fill takes the best first entries of the rows, the vector's
    # first, then the 19 rows whose first entry is hot (rows 0, 2, 4, ...: flat 0, 100, 200, ...)
    assert _kinds(plan) == {"v": ("sparse", 1), "w": ("sparse", 19)}
    assert torch.equal(plan.indices["w"], torch.arange(0, 1900, 100))
    assert _kinds(_allocate(_toy(), 20, structured="none")) == {"v": ("whole", 20)}

    plan = _allocate(_toy(), 119, structured="none", allocation="per_row")  # k = 1 (101), 18 entries of rank 1 left
    rows = plan.indices["w"] // 50
    assert torch.equal(torch.bincount(rows, minlength=100)[:17], torch.full((17,), 2))  # ties: earlier rows first
    assert torch.equal(torch.bincount(rows, minlength=100)[17:], torch.ones(83, dtype=torch.int64))
    assert plan.trainable == 119 and _kinds(plan)["v"] == ("sparse", 2)
    assert plan.meta["allocation"] == "per_row" and plan.structured == "none"
    head = plan.summary().splitlines()[0]  # the rule that made the plan, not the unused LoRA settings
    assert head.endswith("allocation=per_row (every output row its top-k entries)") and "rank=" not in head
    spt = _allocate(_toy(), 119, structured="lora", rank=2)
    assert "structured=lora rank=2" in spt.summary() and spt.meta["allocation"] == "global"  # plan.json says which


def test_per_row_takes_no_modules():
    with pytest.raises(PlanError, match="plan.structured: none"):
        _allocate(_toy(), 20, structured="lora", allocation="per_row")
    with pytest.raises(PlanError, match="allocation='row'"):
        _allocate(_toy(), 20, structured="none", allocation="row")


def _groups() -> Sensitivity:
    """A norm vector nobody's ranking would pick (scores 0), a 4x1x3x3 depthwise kernel with one hot entry per row
    (5), an 8x10 matrix with one hot entry per row (10, on the diagonal), and a 2x3x1x1 stem conv (scores 1)."""
    cands = {
        "n": Candidate("n", "bn", "weight", "vector", (8,), 0, norm=True),
        "d": Candidate("d", "dw", "weight", "conv", (4, 1, 3, 3), 0, groups=4),
        "w": Candidate("w", "pw", "weight", "linear", (8, 10), 1),
        "s": Candidate("s", "stem", "weight", "conv", (2, 3, 1, 1), 0, stem=True),
    }
    d, w = torch.zeros(4, 1, 3, 3), torch.zeros(8, 10)
    d.view(4, 9)[:, 4] = 5.0
    w[torch.arange(8), torch.arange(8)] = 10.0
    scores = {"n": torch.zeros(8), "d": d, "w": w, "s": torch.ones(2, 3, 1, 1)}
    return Sensitivity(scores, cands, {"backbone_params": 130})


def test_whole_groups_are_trained_whole_from_the_budget_and_the_rest_is_ranked():
    per_row = {"structured": "none", "allocation": "per_row"}
    # k = 1 (15 values), the fill's 5: the stem's two 1s, then 0s by candidate order: the vector's second entry first
    assert _kinds(_allocate(_groups(), 20, **per_row))["n"] == ("sparse", 2)
    plan = _allocate(_groups(), 20, **per_row, whole=["norm"])
    # 8 values to the norm vector, 12 left: k = 1 would cost 4 + 8 + 2 = 14, so k = 0 and the fill takes the 12 hot
    # entries (the matrix's 8 at 10, the kernel's 4 at 5); the stem's 1s lose
    assert _kinds(plan) == {"n": ("whole", 8), "d": ("sparse", 4), "w": ("sparse", 8)}
    assert torch.equal(plan.indices["w"], torch.arange(8) * 11)  # each row's diagonal entry
    assert torch.equal(plan.indices["d"], torch.arange(4) * 9 + 4)  # each kernel's centre
    assert plan.meta["whole"] == ["norm"] and plan.meta["whole_values"] == 8 and plan.trainable == 20
    assert [t.param for t in plan.targets] == ["n", "d", "w"]  # candidate order, whatever the rule
    glob = _allocate(_groups(), 20, **SPT_RULE | {"structured": "none"}, whole=["norm"])  # the global rule too
    assert _kinds(glob) == {"n": ("whole", 8), "d": ("sparse", 4), "w": ("sparse", 8)}

    stem = _allocate(_groups(), 20, **per_row, whole=["stem"])  # 6 to the stem, 14 left: k = 1 (1 + 4 + 8 = 13)
    assert _kinds(stem)["s"] == ("whole", 6) and stem.trainable == 20
    assert _kinds(_allocate(_groups(), 40, **per_row, whole=["depthwise"])) == {"d": ("whole", 36), "w": ("sparse", 4)}
    with pytest.raises(PlanError, match="alone trains 36 values, over the budget 20"):
        _allocate(_groups(), 20, **per_row, whole=["depthwise"])
    with pytest.raises(PlanError, match="'bn' is not a group"):
        _allocate(_groups(), 20, **per_row, whole=["bn"])
    with pytest.raises(PlanError, match="include_stem"):  # a pass that measured no stem
        _allocate(_toy(), 20, **per_row, whole=["stem"])
    # the published rules' plan.json is as it was: the same meta keys, in the same order
    keys = ["allocation", "candidates", "candidate_values", "saturated"]
    assert list(_allocate(_groups(), 20, **per_row).meta) == keys
    assert list(_allocate(_groups(), 20, **SPT_RULE).meta) == ["allocation", "top_k", "filled", "candidates",
                                                                 "candidate_values", "saturated"]  # fmt: skip
    exact = _allocate(_groups(), 36 + 8, **per_row, whole=["depthwise", "norm"])  # the budget is the whole cost
    assert _kinds(exact) == {"n": ("whole", 8), "d": ("whole", 36)} and exact.trainable == 44
    only = Sensitivity({"n": torch.zeros(8)}, {"n": _groups().candidates["n"]}, {"backbone_params": 8})
    for rule in (per_row, SPT_RULE):  # a group that is every candidate: nothing left to rank
        assert _kinds(_allocate(only, 8, **{**rule, "structured": "none"}, whole=["norm"])) == {"n": ("whole", 8)}


def test_row_k_share_gives_every_row_the_same_share_not_the_same_count():
    """4 depthwise rows of 9 entries and 4 pointwise rows of 90; a budget of 44 is 1/9 of every row."""
    cands = {"d": Candidate("d", "dw", "weight", "conv", (4, 1, 3, 3), 0, groups=4),
             "p": Candidate("p", "pw", "weight", "conv", (4, 90, 1, 1), 0)}  # fmt: skip
    scores = {"d": torch.arange(36.0).reshape(4, 1, 3, 3), "p": torch.arange(360.0).reshape(4, 90, 1, 1)}
    sens = Sensitivity(scores, cands, {"backbone_params": 396})
    share = _allocate(sens, 44, structured="none", allocation="per_row", row_k="share")
    rows = {n: torch.bincount(i // (9 if n == "d" else 90), minlength=4).tolist() for n, i in share.indices.items()}
    assert rows == {"d": [1] * 4, "p": [10] * 4}  # floor(n/9) of each row
    assert torch.equal(share.indices["d"], torch.arange(4) * 9 + 8)  # each row's best (last) entry
    count = _allocate(sens, 44, structured="none", allocation="per_row")  # k = 5 (40), then the 4 best of rank 5
    assert torch.bincount(count.indices["d"] // 9, minlength=4).tolist() == [5, 5, 5, 5]  # 5 of 9, not 1
    assert torch.bincount(count.indices["p"] // 90, minlength=4).tolist() == [6, 6, 6, 6]
    assert share.meta["row_k"] == "share" and share.trainable == count.trainable == 44
    with pytest.raises(PlanError, match="share only with allocation=per_row"):
        _allocate(sens, 44, structured="none", row_k="share")


def test_candidates_know_their_group_on_a_cnn():
    from spt_core.candidates import find_candidates

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    found = find_candidates(model, include_stem=True)
    norm = {n for n, c in found.items() if c.norm}
    assert "bn1.weight" in norm and "blocks.1.0.bn2.bias" in norm and "blocks.1.0.conv_pw.weight" not in norm
    assert {n for n, c in found.items() if c.depthwise} == {n for n in found if n.endswith("conv_dw.weight")}
    assert {n for n, c in found.items() if c.stem} == {"conv_stem.weight", "bn1.weight", "bn1.bias"}
    assert not any(c.stem for c in find_candidates(model).values())  # frozen unless asked for
    cand = found["bn1.weight"]
    assert Candidate.from_dict(cand.to_dict()) == cand  # a sensitivity file keeps the groups
    old = {k: v for k, v in cand.to_dict().items() if k not in ("norm", "stem")}  # a file from before them
    assert Candidate.from_dict(old).norm is False
