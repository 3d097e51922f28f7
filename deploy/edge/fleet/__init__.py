"""A plant of many boxes: rollout waves, pooled evidence and one decision for the fleet (torch-free).

Each box still follows the registry's ``champion``/``challenger`` aliases (`deploy.edge.sync`). A fleet rollout
adds, all of it in the registry:

    plan.py      the plan of a challenger (a version tag): waves of boxes, cameras and shares, floors, where it is
    member.py    the box's side: serve the challenger only in the current wave, report counts, keep a local
                 rollback local, drop a challenger it cannot confirm
    evidence.py  the boxes' counts pooled and judged by the box's own promotion rule plus the waves' floors
    decider.py   one round: walk the claimed decisions, judge, claim the next one atomically, apply it; start, stop

The schedule lives in `pipelines.fleet` (a Prefect flow) and the CLI (`sensitune fleet start|watch|stop|decide`).
"""

from deploy.edge.fleet.decider import Decider, claim_name, fleet_status, start
from deploy.edge.fleet.evidence import ABORT, ADVANCE, HOLD, box_report, judge, pool
from deploy.edge.fleet.member import FleetMember, report_key
from deploy.edge.fleet.plan import ABORTED, ACTIVE, PROMOTED, FleetError, Plan, Wave, box_bucket

__all__ = ["ABORT", "ABORTED", "ACTIVE", "ADVANCE", "HOLD", "PROMOTED", "Decider", "FleetError", "FleetMember",
           "Plan", "Wave", "box_bucket", "box_report", "claim_name", "fleet_status", "judge", "pool", "report_key",
           "start"]  # fmt: skip
