"""Spend a trainable budget where sensitivity is highest: global top-k, then SPT's α/β rule per unit.

A *unit* is a vector, a matrix, or one row segment (q, k, v) of a fused projection. With k_u of its entries
in the global top-k:
  - a dense matrix (Linear, Conv with groups=1) whose structured module costs c_u (< the unit's size) gets the
    module (LoRA or adapter) when k_u ≥ c_u / α, else its k_u entries become sparse deltas;
  - a vector, a grouped/depthwise conv kernel, or a matrix too small for a module to pay off is trained whole
    when k_u ≥ numel / β, else sparsely (a LoRA on a 3×3 depthwise kernel is near full rank: pointless);
  - with structured="none" every matrix entry is a sparse delta (the "sparse-only" variant).
The resulting count, count(k), is non-decreasing in k, so a binary search finds the largest k whose plan fits
the budget. What is left (less than the largest single jump: one module or vector) is then spent on the
next-ranked entries that can stay sparse, so the plan matches the budget exactly unless no such entry is left.
Ties in the scores are broken by position in `named_parameters()` order (stable sort): deterministic.

`allocation="per_row"` is the other rule (GPS's idea, Zhang et al., CVPR 2024): every output row (a matrix row,
a conv kernel's output channel; a vector is one row) gets its k most sensitive entries, with one k for the whole
backbone, the largest whose count fits; the rest of the budget goes to the best-scored entries of rank k in their
rows. Every chosen entry is a sparse delta (no modules): it needs structured="none". ``row_k="share"`` gives every
row one share of its entries instead of one count (k_row = floor(f * row length), the largest f that fits): a 9-entry
depthwise row and a 1152-entry pointwise row then take the same fraction, not the same number.

``whole`` names groups of candidates trained whole before either rule runs, charged to the budget: ``depthwise``
(depthwise conv kernels), ``norm`` (normalization layers' affine weights and biases) and ``stem`` (the stem's
parameters; the sensitivity must have measured them, ``include_stem``). The rest of the budget is allocated over
the other candidates. A group that matches nothing, or that alone costs more than the budget, is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch

from .candidates import Candidate
from .plan import Plan, Target, parse_budget
from .portable.errors import PlanError
from .sensitivity import Sensitivity
from .tuners.registry import TUNERS, check_tuner_config, kind_config, structured_choices


def structured_cost(c: Candidate, rows: int, structured: str, tuner_config: Mapping[str, Any]) -> int:
    """Trainable values of the structured module `structured` on `rows` output rows of matrix candidate `c`.

    The formula is the kind's registered ``cost`` with its config read from `tuner_config` (e.g. ``{"rank": 8}``;
    LoRA: r·(fan_in + rows); adapter: 2·r·rows + r + rows).

    Raises:
        PlanError: when `structured` is not a registered kind with a cost formula, or its config is incomplete.
    """
    kind = TUNERS.get(structured)
    if kind is None or kind.cost is None:
        raise PlanError(f"structured={structured!r}: use one of {', '.join(structured_choices())}")
    return kind.cost(c, rows, kind_config(kind, tuner_config))


@dataclass(frozen=True)
class _Unit:
    cand: Candidate
    start: int  # flat offset of the unit in the concatenated score vector
    size: int
    rule: str  # "structured" | "whole_or_sparse" | "sparse"
    threshold: float  # k_u at which the unit switches to structured / whole
    cost: int  # trainable values once switched
    rows: tuple[int, int] | None


def _units(cands: list[Candidate], structured: str, tuner: Mapping[str, Any], alpha: float, beta: float) -> list[_Unit]:
    units, offset = [], 0
    for c in cands:
        dense_matrix = c.kind == "linear" or (c.kind == "conv" and c.groups == 1)
        if c.kind == "vector" or not dense_matrix:
            units.append(_Unit(c, offset, c.numel, "whole_or_sparse", c.numel / beta, c.numel, None))
        elif structured == "none":
            units.append(_Unit(c, offset, c.numel, "sparse", float("inf"), 0, None))
        else:
            segs = c.segments or ((0, c.shape[0]),)
            seg_ok = all(structured_cost(c, e - s, structured, tuner) < (e - s) * c.fan_in for s, e in segs)
            if not seg_ok:  # the module would cost as much as the matrix: treat like a vector
                units.append(_Unit(c, offset, c.numel, "whole_or_sparse", c.numel / beta, c.numel, None))
            else:
                for s, e in segs:
                    cost = structured_cost(c, e - s, structured, tuner)
                    rows = (s, e) if c.segments else None
                    units.append(
                        _Unit(c, offset + s * c.fan_in, (e - s) * c.fan_in, "structured", cost / alpha, cost, rows)
                    )
        offset += c.numel
    return units


def _fill(
    order: torch.Tensor,
    unit_of: torch.Tensor,
    k: int,
    gap: int,
    switched: torch.Tensor,
    k_u: torch.Tensor,
    has_threshold: torch.Tensor,
    thresholds: torch.Tensor,
    chunk: int = 1 << 20,
) -> torch.Tensor:
    """Spend the `gap` left after the top-k prefix on the next-ranked entries that stay sparse.

    An entry is taken, in rank order, when its unit is not switched and can take one more sparse entry without
    reaching its threshold (a structured/whole unit has room for ceil(threshold) - 1 - k_u more; a sparse-only
    matrix has no limit). Returns the flat positions taken (at most `gap`).
    """
    room = torch.where(
        has_threshold,
        torch.ceil(thresholds).to(torch.int64) - 1 - k_u,
        torch.full_like(k_u, torch.iinfo(torch.int64).max),
    )
    room = torch.where(switched, torch.zeros_like(room), room.clamp(min=0))
    taken: list[torch.Tensor] = []
    start = k
    while gap > 0 and start < len(order):
        units = unit_of[start : start + chunk].long()
        s_idx = torch.argsort(units, stable=True)
        su = units[s_idx]
        occ = torch.empty_like(units)
        occ[s_idx] = torch.arange(len(su)) - torch.searchsorted(su, su)  # occurrence of the unit in this chunk
        ok = occ < room[units]
        pick = ok.nonzero().flatten()[:gap]
        if len(pick):
            taken.append(order[start : start + chunk][pick])
            room -= torch.bincount(units[pick], minlength=len(room))
            gap -= len(pick)
        start += chunk
    return torch.cat(taken) if taken else order[:0]


ALLOCATIONS = ("global", "per_row")
Allocation = Literal["global", "per_row"]
# SPT's published rule (rank-8 LoRA, alpha 10, beta 5, one global top-k): a rule to reproduce, not the application's
# default (params.yaml's plan section: per-row sparse deltas). `allocate(sens, budget, **SPT_RULE)`.
SPT_RULE: dict[str, Any] = {"structured": "lora", "rank": 8, "alpha": 10.0, "beta": 5.0, "allocation": "global"}


def _row_view(score: torch.Tensor) -> torch.Tensor:
    """Scores as (output rows, entries per row): a vector is one row."""
    return score.reshape(1, -1) if score.dim() == 1 else score.reshape(score.shape[0], -1)


ROW_K = ("count", "share")  # per_row: one k for every row | one share of each row's entries
WHOLE_GROUPS: dict[str, Callable[[Candidate], bool]] = {
    "depthwise": lambda c: c.depthwise,
    "norm": lambda c: c.norm,
    "stem": lambda c: c.stem,
}


def _row_levels(lengths: list[int], row_k: str) -> list[Callable[[int], int]]:
    """The per-row rule's levels, cheapest first: level i maps a row length to that row's k (non-decreasing in i
    for every length). ``count``: k = min(i, n); ``share``: k = floor(f_i n) over every breakpoint f_i = j/n."""
    if row_k == "count":
        return [lambda n, k=k: min(k, n) for k in range(max(lengths) + 1)]
    shares = sorted({Fraction(j, n) for n in set(lengths) for j in range(n + 1)})
    return [lambda n, f=f: f.numerator * n // f.denominator for f in shares]


def per_row_indices(
    cands: list[Candidate], sensitivity: Sensitivity, budget: int, row_k: str = "count"
) -> dict[str, torch.Tensor]:
    """Sorted flat indices per candidate: each row's top entries (`_row_levels`' largest level that fits the budget),
    then the best of the entries each row would take next."""
    if not cands:  # every candidate trained whole (`allocate`'s whole groups)
        return {}
    ranked = []  # per candidate: (row-wise order of flat indices, scores in that order), both (rows, row_len)
    lengths = []
    for c in cands:
        rows = _row_view(sensitivity.scores[c.name].float())
        order = torch.sort(rows, dim=1, descending=True, stable=True)
        flat = order.indices + torch.arange(rows.shape[0]).unsqueeze(1) * rows.shape[1]
        ranked.append((flat, order.values))
        lengths.append(rows.shape[1])
    levels = _row_levels(lengths, row_k)

    def count(level: int) -> int:
        return sum(levels[level](n) * flat.shape[0] for (flat, _), n in zip(ranked, lengths))

    lo, hi = 0, len(levels) - 1  # the largest level with count(level) <= budget (level 0 takes nothing)
    while hi - lo > 0:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid - 1)
    ks, gap = [levels[lo](n) for n in lengths], budget - count(lo)
    # the fill: each row's next entry, best score first; ties by candidate, then row
    nxt = [(i, flat[:, k], vals[:, k]) for i, ((flat, vals), n, k) in enumerate(zip(ranked, lengths, ks)) if k < n]
    chosen = {c.name: [flat[:, :k].reshape(-1)] for c, (flat, _), k in zip(cands, ranked, ks)}
    if gap > 0 and nxt:
        vals = torch.cat([v for _, _, v in nxt])
        owner = torch.cat([torch.full((len(v),), i) for i, _, v in nxt])
        pos = torch.cat([f for _, f, _ in nxt])
        take = torch.sort(vals, descending=True, stable=True).indices[:gap]
        for i in owner[take].unique().tolist():
            chosen[cands[i].name].append(pos[take][owner[take] == i])
    out = {name: torch.sort(torch.cat(parts)).values for name, parts in chosen.items()}
    return {name: idx for name, idx in out.items() if len(idx)}


def whole_candidates(cands: list[Candidate], whole: Sequence[str]) -> list[Candidate]:
    """The candidates of the `whole` groups (`WHOLE_GROUPS`), in candidate order; PlanError: an unknown group, or
    one that matches no candidate."""
    for g in whole:
        if g not in WHOLE_GROUPS:
            raise PlanError(f"whole={list(whole)}: {g!r} is not a group; use any of {', '.join(WHOLE_GROUPS)}")
        if not any(WHOLE_GROUPS[g](c) for c in cands):
            hint = ("measure with include_stem (sensitivity.include_stem: true)" if g == "stem" else
                    "this model has none, or the sensitivity file predates the group: measure again")  # fmt: skip
            raise PlanError(f"whole: {g!r} matches no candidate of the sensitivity; {hint}, or drop it")
    return [c for c in cands if any(WHOLE_GROUPS[g](c) for g in whole)]


def allocate(
    sensitivity: Sensitivity,
    budget: int | float | str,
    *,
    structured: str,
    rank: int,
    alpha: float,
    beta: float,
    allocation: Allocation,
    whole: Sequence[str] = (),
    row_k: str = "count",
    **tuner: Any,
) -> Plan:
    """Turn sensitivity scores into a plan whose trainable count is at most `budget`.

    The options are required: params.yaml's ``plan`` section is the one place that gives them values (a library
    default once disagreed with it); ``**SPT_RULE`` spells out the paper's rule.

    Args:
        sensitivity: scores and candidates from `measure_sensitivity`.
        budget: trainable backbone values: 400000, "0.4M", "400k", or "0.5%" of the backbone.
        structured: module for matrices with many sensitive entries: a kind of `structured_choices()` ("lora",
            "adapter") or "none" (sparse only).
        rank: rank of LoRA / bottleneck width of the adapter.
        alpha: a matrix gets the module when ≥ (module params)/alpha of its entries are selected (SPT: 10).
        beta: a vector is trained whole when ≥ 1/beta of it is selected (SPT: 5).
        allocation: "global" (one top-k over the backbone, then the α/β rule) or "per_row" (every output row its
            top-k entries, all sparse; needs structured="none").
        whole: groups trained whole first, from the budget (`WHOLE_GROUPS`: depthwise, norm, stem); () = none, the
            rule as published (params.yaml's ``plan.whole`` is what the application passes).
        row_k: per_row's rule, "count" (one k for every row, GPS) or "share" (one share of each row's entries).
        **tuner: further hyper-parameters of tuner kinds, each a field of a registered kind's config (a new
            kind's own, LoRA's ``lora_scale``); the plan records them with `rank` (`Plan.tuner_config`).
    """
    if allocation not in ALLOCATIONS:
        raise PlanError(f"allocation={allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if structured not in structured_choices():
        raise PlanError(f"structured={structured!r}: use one of {', '.join(structured_choices())}")
    if allocation == "per_row" and structured != "none":
        raise PlanError(
            f"allocation=per_row chooses single entries only, structured={structured!r} builds modules: "
            "set plan.structured: none, or plan.allocation: global"
        )
    if row_k not in ROW_K or (row_k != "count" and allocation != "per_row"):
        raise PlanError(f"row_k={row_k!r}: use one of {', '.join(ROW_K)} (share only with allocation=per_row)")
    if rank < 1 or alpha < 1 or beta < 1:
        # alpha < 1 would make a module cheaper than the entries that trigger it: count(k) stops being monotone
        raise PlanError(f"rank={rank}, alpha={alpha}, beta={beta}: need rank >= 1, alpha >= 1, beta >= 1")
    tuner_config = {"rank": rank, **tuner}
    check_tuner_config(tuner_config)
    if structured != "none":
        kind_config(TUNERS[structured], tuner_config)  # the structured kind's own checks, before any work
    cands = list(sensitivity.candidates.values())
    if not cands:
        raise PlanError("the sensitivity file has no candidates; measure a model with tunable parameters")
    total = sum(c.numel for c in cands)
    backbone = int(sensitivity.meta.get("backbone_params", total))
    count_budget = parse_budget(budget, backbone)
    if count_budget > total:
        raise PlanError(f"budget {count_budget:,} exceeds the {total:,} candidate values: lower the budget")
    fixed = whole_candidates(cands, whole)
    spent, fixed_names = sum(c.numel for c in fixed), {c.name for c in fixed}
    if spent > count_budget:
        raise PlanError(f"whole={list(whole)} alone trains {spent:,} values, over the budget {count_budget:,}: "
                        "raise the budget or drop a group")  # fmt: skip
    rest = [c for c in cands if c.name not in fixed_names]
    options = (structured, tuner_config, alpha, beta)
    meta: dict[str, Any] = {"allocation": allocation}
    if allocation == "per_row":
        indices = per_row_indices(rest, sensitivity, count_budget - spent, row_k)
        targets = [Target(c.name, "sparse", len(indices[c.name]), c.kind, c.shape, c.block)
                   for c in rest if c.name in indices]  # fmt: skip
        saturated = spent + sum(t.count for t in targets) == total
    else:
        targets, indices, top = _global_targets(rest, sensitivity, count_budget - spent, structured, tuner_config,
                                                alpha, beta)  # fmt: skip
        if not targets and not fixed:
            raise PlanError(f"budget {count_budget:,} is too small for any trainable unit: raise the budget")
        meta.update(top)  # top_k, filled
        saturated = meta.pop("saturated")
    # plan.json's keys in their old order; whole / row_k only when set (the published rules' plans keep their bytes)
    meta.update({"candidates": len(cands), "candidate_values": total, "saturated": saturated})
    if whole or row_k != "count":
        meta.update({"whole": list(whole), "whole_values": spent, "row_k": row_k})
    targets += [Target(c.name, "whole", c.numel, c.kind, c.shape, c.block) for c in fixed]
    at = {c.name: i for i, c in enumerate(cands)}
    targets.sort(key=lambda t: at[t.param])  # stable: a candidate's sparse target before its modules
    return plan_of(sensitivity, targets, indices, count_budget, options, meta)


def _global_targets(
    cands: list[Candidate],
    sensitivity: Sensitivity,
    count_budget: int,
    structured: str,
    tuner_config: dict[str, Any],
    alpha: float,
    beta: float,
) -> tuple[list[Target], dict[str, torch.Tensor], dict[str, Any]]:
    """SPT's rule over `cands`: targets, sparse indices and what it chose (top_k, filled, saturated)."""
    if not cands or count_budget <= 0:
        return [], {}, {"top_k": 0, "filled": 0, "saturated": not cands}
    units = _units(cands, structured, tuner_config, alpha, beta)
    starts = torch.tensor([u.start for u in units], dtype=torch.int64)
    rule_struct = torch.tensor([u.rule == "structured" for u in units])
    rule_whole = torch.tensor([u.rule == "whole_or_sparse" for u in units])
    thresholds = torch.tensor([u.threshold for u in units], dtype=torch.float64)
    costs = torch.tensor([u.cost for u in units], dtype=torch.int64)

    flat = torch.cat([sensitivity.scores[c.name].reshape(-1).float() for c in cands])
    order = torch.sort(flat, descending=True, stable=True).indices  # (N,) ties: earlier parameter first
    del flat
    unit_of = (torch.searchsorted(starts, order, right=True) - 1).to(torch.int32)  # (N,) unit of each rank

    def switched(k_u: torch.Tensor) -> torch.Tensor:
        return (rule_struct | rule_whole) & (k_u > 0) & (k_u.double() >= thresholds)

    def plan_count(k: int) -> int:
        k_u = torch.bincount(unit_of[:k], minlength=len(units))
        return int(torch.where(switched(k_u), costs, k_u).sum())

    lo, hi = 0, len(order)  # invariant: plan_count(lo) <= budget; find the largest such k
    if plan_count(hi) <= count_budget:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan_count(mid) <= count_budget:
            lo = mid
        else:
            hi = mid
    k = lo
    k_u = torch.bincount(unit_of[:k], minlength=len(units))
    sw = switched(k_u)
    gap = count_budget - int(torch.where(sw, costs, k_u).sum())
    extra = _fill(order, unit_of, k, gap, sw, k_u, rule_struct | rule_whole, thresholds)
    targets: list[Target] = []
    sparse_units = (~sw) & (k_u > 0)
    chosen = torch.cat([order[:k][sparse_units[unit_of[:k].long()]], extra])
    chosen, _ = torch.sort(chosen)  # flat positions of sparse entries, ascending
    cand_starts = torch.tensor([0] + [c.numel for c in cands], dtype=torch.int64).cumsum(0)
    cand_of = torch.searchsorted(cand_starts, chosen, right=True) - 1
    per_cand = torch.bincount(cand_of, minlength=len(cands)).tolist()
    pieces = torch.split(chosen, per_cand)

    indices: dict[str, torch.Tensor] = {}
    by_cand: dict[str, list[Target]] = {c.name: [] for c in cands}
    for u, unit in enumerate(units):
        if not bool(sw[u]):
            continue
        c = unit.cand
        kind = structured if unit.rule == "structured" else "whole"
        by_cand[c.name].append(Target(c.name, kind, unit.cost, c.kind, c.shape, c.block, unit.rows))
    for i, c in enumerate(cands):
        if per_cand[i]:
            idx = pieces[i] - cand_starts[i]
            indices[c.name] = idx.contiguous()
            targets.append(Target(c.name, "sparse", per_cand[i], c.kind, c.shape, c.block))
        targets.extend(by_cand[c.name])
    # saturated: every candidate entry is selected and the plan still costs less than the budget
    return targets, indices, {"top_k": k, "filled": len(extra), "saturated": k == len(order)}


def plan_of(
    sensitivity: Sensitivity,
    targets: list[Target],
    indices: dict[str, torch.Tensor],
    budget: int,
    options: tuple[str, dict[str, Any], float, float],
    meta: dict,
) -> Plan:
    """A Plan of `targets` measured on `sensitivity`; `options` = (structured, tuner_config, alpha, beta)."""
    structured, tuner_config, alpha, beta = options
    backbone = int(sensitivity.meta.get("backbone_params", sum(c.numel for c in sensitivity.candidates.values())))
    return Plan(
        targets=targets,
        indices=indices,
        budget=budget,
        structured=structured,
        tuner_config=dict(tuner_config),
        alpha=alpha,
        beta=beta,
        backbone_params=backbone,
        block_names=list(sensitivity.meta.get("block_names", [])),
        meta=meta,
    )
