"""The fleet decider as a Prefect flow on a schedule: `fleet_decide` runs one `deploy.edge.fleet.Decider` round.

    sensitune fleet serve [--every 60]     `build_deployment` served in this process (one run at a time)
    sensitune fleet decide                 one round from a shell, no Prefect (`pipelines.fleet_cli`)

Everything lives in the registry the boxes follow (`deploy.edge.fleet`): the plan is a tag of the version, each
box reports its counts, and the decider pools them, judges them by the boxes' own promotion rule and the waves'
floors, and claims each decision atomically, so two deciders (two schedules, a person's `decide`) apply one.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402

from deploy.edge.fleet import Decider  # noqa: E402
from deploy.edge.mlflow_rest import RestRegistry  # noqa: E402

EVERY_S = 60.0  # the decider's default schedule: as often as a box syncs (box.yaml sync.interval_s)


@flow(name="fleet-decide", description="Pool the boxes' reports; advance, hold, promote or abort the fleet plan.",
      timeout_seconds=300)  # fmt: skip
def fleet_decide(tracking_uri: str, model_name: str, who: str = "") -> dict[str, Any]:
    """One round of the fleet decider (`deploy.edge.fleet.decider.Decider.round`)."""
    out = Decider(RestRegistry(tracking_uri, model_name), who or f"prefect:{socket.gethostname()}").round()
    try:
        logger = get_run_logger()
    except MissingContextError:  # called as a plain function (`fleet_decide.fn`)
        logger = logging.getLogger("sensitune.fleet")
    logger.info("fleet: %s %s", out["outcome"], "; ".join(out.get("reasons") or []))
    return out


def build_deployment(tracking_uri: str, model_name: str, every_s: float = EVERY_S, name: str = "fleet") -> Any:
    """The decider every `every_s` seconds; a round that would overlap a running one is cancelled (the next one
    comes soon, and a late decision is worth nothing)."""
    return fleet_decide.to_deployment(
        name=name,
        interval=every_s,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"tracking_uri": tracking_uri, "model_name": model_name},
        tags=["sensitune", "fleet"],
        description=f"Fleet decider for {model_name} at {tracking_uri}, every {every_s:g} s.",
    )
