"""The fleet's rule on pooled evidence (`deploy.edge.fleet.evidence.judge`), without a registry: before the last wave
a plan stops only on what is beyond doubt (99.9 % intervals of the arms' differences: the decider looks every round);
`decide`'s point-estimate rule waits for the last wave's floors.

The pooled numbers are the ones that stopped a version 1 pt better than its champion in an early wave of the fleet
simulator: observed accuracy 0.945 vs 0.950 on ~200 frames an arm, and 2 of 11 defects passed against the
champion's 3 of 125 (`escape_worse` holds the challenger's interval against the champion's point estimate).
"""

from __future__ import annotations

from typing import Any

import pytest

from deploy.edge.fleet import ABORT, ADVANCE, HOLD, Plan, Wave, judge, pool
from deploy.edge.fleet.plan import epoch_of
from deploy.edge.rollout.manifest import DecisionRule
from deploy.edge.rollout.stats import difference_interval

STARTED = "2027-01-15T08:00:00+00:00"
Arm = tuple[int, int, int, int]  # correct, labelled, escaped, defects


def verdict(plan: Plan, champion: Arm, challenger: Arm) -> Any:
    """`judge` on two boxes' reports that split each arm's counts between them (no inference errors)."""

    def arm(counts: Arm, box: int) -> dict[str, Any]:
        k, n, e, d = (c // 2 if box else c - c // 2 for c in counts)
        return {"requests": n, "errors": 0, "labelled": n, "correct": k, "defects": d, "escaped": e, "goods": n - d,
                "overkilled": 0, "p50_ms": 5.0}  # fmt: skip

    reports = [{"box": f"box-{b}", "plan": plan.id, "arms": {"champion": arm(champion, b),
                "challenger": arm(challenger, b)}, "operating_point": {"ok_class": "ok"}, "local": None}
               for b in (0, 1)]  # fmt: skip
    return judge(plan, pool(plan, reports), epoch_of(STARTED) + 60)


def test_early_waves_stop_only_beyond_doubt_and_the_last_wave_decides_on_the_point_estimate() -> None:
    # Newcombe (1998), Table II, method 10: 56/70 - 48/80 -> 0.0524 to 0.3339; 9/10 - 3/10 -> 0.1705 to 0.8090
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert difference_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    rule = DecisionRule(min_samples=200, min_gain=0.0, max_latency_increase=0.5, max_error_rate=0.05)
    waves = (Wave(share=0.5, min_labelled=100), Wave(share=1.0, min_labelled=1000))
    early = Plan("p", "3", "1", waves, rule=rule, started=STARTED, wave_started=STARTED)
    last = Plan(**{**vars(early), "wave": 1})

    close = verdict(early, (190, 200, 0, 0), (189, 200, 0, 0))  # gain -0.005, 95 % CI about -0.05 to +0.04
    assert close.action == ADVANCE, close.reasons  # `decide` rolls back here: gain < min_gain
    lo, hi = close.evidence["accuracy_gain_ci95"]
    assert lo < -0.005 < hi and close.evidence["rule_says"] == "rollback"
    escapes = verdict(early, (1200, 1250, 3, 125), (95, 100, 2, 11))  # 2/11 vs 3/125: the 99.9 % CI has 0
    assert escapes.action == ADVANCE and escapes.evidence["rule_says"] == "rollback"  # `escape_worse` fires here
    short = verdict(early, (190, 200, 0, 0), (160, 200, 0, 0))  # gain -0.15: its whole CI below min_gain 0
    assert short.action == ABORT and "lies below min_gain 0.0" in short.reasons[0]
    worse = verdict(early, (1200, 1250, 3, 125), (95, 100, 6, 11))  # 6/11 vs 3/125: beyond doubt
    assert worse.action == ABORT and "lies above 0" in worse.reasons[0]
    assert verdict(last, (190, 200, 0, 0), (189, 200, 0, 0)).action == HOLD  # last wave: its floor (1000) first
    final = verdict(last, (1900, 2000, 0, 0), (1890, 2000, 0, 0))  # floor met: `decide` on the pooled evidence
    assert final.action == ABORT and "gain -0.0050" in final.reasons[0]
    assert verdict(last, (1900, 2000, 0, 0), (1910, 2000, 0, 0)).action == "promote"
