"""`sensitune fleet ...`: roll a registered version out to a fleet of boxes in waves (`deploy.edge.fleet`).

    sensitune fleet start 4 --wave box-7 --wave 10% --wave 50% --wave all --min-labelled 200 --final-labelled 8000
    sensitune fleet watch [VERSION] [--every 60] [--json]     the plan, the pooled numbers, each box's report
    sensitune fleet stop --why "camera 3 was swapped"          abort: the challenger leaves every box
    sensitune fleet decide                                     one decider round now
    sensitune fleet serve [--every 60]                         the decider on a schedule (`pipelines.fleet`)

The boxes need ``sync.fleet: true`` in box.yaml to serve a challenger only under a plan
(docs/from-images-to-line.md). Prefect is imported only by ``serve``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import time
from typing import Any

from deploy.edge.fleet import Decider, Wave, fleet_status, start
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.rollout.manifest import DecisionRule
from spt_core.portable.errors import SensituneError

ACTIONS = ("start", "watch", "stop", "decide", "serve")
MIN_HOURS = 1.0  # each wave's default time floor: an hour of a shift's parts before the next wave


def add_args(p: argparse.ArgumentParser) -> None:
    """The `fleet` verb's arguments (`pipelines.cli`)."""
    rule = DecisionRule()
    p.add_argument("action", choices=ACTIONS, help="start a plan, watch it, stop it, run one decider round, serve")
    p.add_argument("version", nargs="?", help="start: the registered version to roll out; watch: its plan")
    p.add_argument("--tracking-uri", help="the MLflow server the boxes follow (default: $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--wave",
        action="append",
        default=[],
        metavar="SPEC",
        help="start, repeatable, in order: box names, cam:ID, N%% of boxes or all, comma-separated",
    )
    p.add_argument(
        "--min-labelled",
        type=int,
        help="start: labelled challenger frames each wave gathers before the next (default: --min-samples)",
    )
    p.add_argument(
        "--final-labelled",
        type=int,
        help="start: labelled challenger frames the last wave pools before it decides (default: --min-labelled); "
        "an earlier wave stops only beyond doubt, the last one's floor sets what difference is seen: about 8000 "
        "for 1 point (benchmarks/fleet_sim.py)",
    )
    p.add_argument("--min-hours", type=float, default=MIN_HOURS, help="start: hours each wave lasts at least")
    p.add_argument(
        "--max-escape-rate",
        type=float,
        help="start: abort above this escape ceiling (default: the boxes' operating point's)",
    )
    for key, value in vars(rule).items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                       help=f"start: the promotion rule's {key} (deploy/edge/rollout/decision.py)")  # fmt: skip
    p.add_argument("--why", help="start, stop: what it rests on, recorded with the plan")
    p.add_argument("--every", type=float, default=None, metavar="S", help="watch: repeat; serve: the schedule")
    p.add_argument("--json", action="store_true", help="watch: JSON")


def run(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """`sensitune fleet ...`; returns the exit code (bad input raises `SensituneError`: exit 2)."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        raise SensituneError(f"--tracking-uri {uri or '(unset)'}: give the http(s):// MLflow server the boxes follow "
                             "(box.yaml registry.url; `sensitune registry serve` starts one)")  # fmt: skip
    name = params["publish"]["model_name"] or f"sensitune-{params['model']['name']}"
    reg, who = RestRegistry(uri, name), f"cli:{getpass.getuser()}"
    if args.action == "start":
        if args.version is None or not args.why:
            raise SensituneError('fleet start: give VERSION --wave ... --why "...", e.g. start 4 --wave box-7 '
                                 '--wave 10% --wave all --why "QA report 12"')  # fmt: skip
        floor = args.min_samples if args.min_labelled is None else args.min_labelled
        last = floor if args.final_labelled is None else args.final_labelled
        waves = [Wave.parse(w, last if k == len(args.wave) - 1 else floor, args.min_hours)
                 for k, w in enumerate(args.wave)]  # fmt: skip
        rule = DecisionRule(**{k: getattr(args, k) for k in vars(DecisionRule())})
        plan = start(reg, args.version, waves, who=who, why=args.why, rule=rule, max_escape_rate=args.max_escape_rate)
        print(json.dumps(plan.summary() | {"waves": [w.describe() for w in plan.waves]}, indent=2))
    elif args.action == "stop":
        if not args.why:
            raise SensituneError('fleet stop: say why, e.g. --why "camera 3 was swapped"')
        print(json.dumps(Decider(reg, who).stop(who, args.why), indent=2, default=str))
    elif args.action == "decide":
        print(json.dumps(Decider(reg, who).round(), indent=2, default=str))
    elif args.action == "serve":
        from pipelines.fleet import EVERY_S, build_deployment
        from pipelines.flow_hooks import serve_deployment

        serve_deployment(build_deployment(uri, name, args.every or EVERY_S))
    else:
        while True:
            status = fleet_status(reg, args.version)
            print(json.dumps(status, indent=2, default=str) if args.json else describe(status), flush=True)
            if args.every is None or status["plan"]["status"] != "active":
                break
            time.sleep(args.every)
    return 0


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.2%}"


def describe(status: dict[str, Any]) -> str:
    """`fleet_status` for a person: the plan, the pooled arms side by side, the verdict now, each box."""
    p, pooled = status["plan"], status["pooled"] or {}
    lines = [f"plan {p['plan']}: v{p['version']} vs champion v{p['champion']}, {p['status']}, wave {p['wave']} "
             f"({p['wave_is']}) since {p['wave_started']}, revision {p['revision']}",
             f"waves: {' -> '.join(status['plan']['waves'])}"]  # fmt: skip
    arms = pooled.get("arms")
    if arms:
        boxes, ceiling = pooled.get("boxes") or {}, pooled.get("ceiling")
        lines.append(f"pooled over {boxes.get('serving', 0)} box(es) serving it ({boxes.get('reporting', 0)} reporting)"
                     f"; escape ceiling {'none declared' if ceiling is None else ceiling}")  # fmt: skip
        rows = [("labelled", "labelled", str), ("accuracy", "accuracy", _pct), ("escape rate", "escape_rate", _pct),
                ("overkill", "overkill", _pct), ("errors", "errors", str), ("requests", "requests", str),
                ("p50 ms", "p50_ms", lambda v: "–" if v is None else f"{v:.2f}")]  # fmt: skip
        lines.append(f"  {'':<12} {'champion':>12} {'challenger':>12}")
        for label, key, fmt in rows:
            lines.append(f"  {label:<12} {fmt(arms['champion'][key]):>12} {fmt(arms['challenger'][key]):>12}")
        lines.append(f"now: {pooled.get('now')}: {'; '.join(pooled.get('why') or [])}")
    last = p.get("last") or {}
    lines.append(f"last decision: {last.get('action')} by {last.get('by')} at {last.get('at')}: "
                 f"{'; '.join(last.get('reasons') or [])}")  # fmt: skip
    for r in status["boxes"]:
        ch = (r.get("arms") or {}).get("challenger") or {}
        local = r.get("local") or {}
        lines.append(f"  {r.get('box')}: {r.get('member') or 'outside'}; challenger {ch.get('requests')} frames, "
                     f"{ch.get('labelled')} labelled, {ch.get('escaped')} escaped, {ch.get('errors')} errors"
                     + (f"; local {local.get('action')} ({local.get('source')})" if local else "")
                     + f"; reported {r.get('at')}")  # fmt: skip
    return "\n".join(lines)
