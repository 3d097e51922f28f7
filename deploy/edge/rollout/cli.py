"""``python -m deploy.edge.rollout {decide,report} --config rollout.yaml [--dry-run] [--reload-url URL]``.

``report`` prints `report_for` as JSON; ``decide`` applies the promotion rule (`decide` + `apply_decision`; with
``--dry-run`` only prints it) and, with ``--reload-url``, POSTs ``<url>/reload`` so a running service picks up the
rewritten manifest, with the admin token from ``$SENSITUNE_EDGE_TOKEN`` (if set). The decision record names the OS
user as its actor. Bad input: ``error: <one line>``, exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from deploy.edge.rollout.decision import apply_decision, decide
from deploy.edge.rollout.manifest import load_config
from deploy.edge.rollout.stats import report_for
from spt_core.portable.errors import SensituneError

DESCRIPTION = (
    "The rollout manifest, the sticky camera split, the champion/challenger comparison and the promote/roll-back rule."
)


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.edge.rollout {decide,report} --config rollout.yaml`."""
    ap = argparse.ArgumentParser(prog="python -m deploy.edge.rollout", description=DESCRIPTION)
    ap.add_argument("verb", choices=["decide", "report"])
    ap.add_argument("--config", type=Path, required=True, help="rollout manifest (YAML)")
    ap.add_argument("--dry-run", action="store_true", help="decide: print the decision, change nothing")
    ap.add_argument(
        "--reload-url", help="decide: POST <url>/reload afterwards (admin token from $SENSITUNE_EDGE_TOKEN)"
    )
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        report = report_for(cfg)
        if args.verb == "report":
            print(json.dumps(report, indent=2))
            return 0
        decision = decide(report, cfg.decision)
        actor = f"cli:{getpass.getuser()}"
        out = decision.to_dict() if args.dry_run else apply_decision(args.config, decision, source="cli", actor=actor)
        print(json.dumps(out, indent=2))
        if args.reload_url and not args.dry_run:
            import urllib.request

            headers = {"Content-Type": "application/json"}
            if token := os.environ.get("SENSITUNE_EDGE_TOKEN"):
                headers["Authorization"] = f"Bearer {token}"
            body = json.dumps({"reason": f"decide from the CLI by {actor}"}).encode()
            request = urllib.request.Request(args.reload_url.rstrip("/") + "/reload", body, headers)
            with urllib.request.urlopen(request) as r:
                print(r.read().decode())
        return 0
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
