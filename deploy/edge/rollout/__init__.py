"""The rollout manifest, the sticky camera split, the champion/challenger comparison and the promote/roll-back rule.

Edge side: numpy + PyYAML only (no torch; from spt_core only its torch-free leaves). MLflow is reached through
`deploy.edge.registry`, imported lazily, and only when the manifest names a registry.

    manifest.py   RolloutConfig: parse, load, write the YAML manifest (ModelRef, DecisionRule, RegistryRef)
    split.py      camera_bucket, assign_arm: the sticky per-camera split
    logs.py       JsonlLog, read_jsonl: predictions / feedback / decisions logs
    fold.py       LogFold: the comparison folded over the logs and kept (each report reads only new lines)
    latency.py    Latencies (bounded per arm), quantiles
    stats.py      wilson_interval, mcnemar, quantiles, compare, report_for
    decision.py   the promotion rule: decide, ChallengerHealth (online), apply_decision, roll_back
    cli.py        ``python -m deploy.edge.rollout {decide,report} --config rollout.yaml``
"""

from deploy.edge.rollout.cli import main
from deploy.edge.rollout.decision import (
    PROMOTE,
    ROLLBACK,
    WAIT,
    ChallengerHealth,
    Decision,
    apply_decision,
    decide,
    error_rate_exceeded,
    manifest_lock,
    roll_back,
)
from deploy.edge.rollout.logs import JsonlLog, now_iso, read_jsonl
from deploy.edge.rollout.manifest import (
    CHALLENGER,
    CHAMPION,
    DECISION_LOG,
    FEEDBACK_LOG,
    PRED_LOG,
    DecisionRule,
    ModelRef,
    RegistryRef,
    RolloutConfig,
    RolloutError,
    load_config,
    parse_config,
    write_config,
)
from deploy.edge.rollout.split import assign_arm, camera_bucket
from deploy.edge.rollout.stats import compare, mcnemar, quantiles, report_for, wilson_interval

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DECISION_LOG",
    "FEEDBACK_LOG",
    "PRED_LOG",
    "PROMOTE",
    "ROLLBACK",
    "WAIT",
    "ChallengerHealth",
    "Decision",
    "DecisionRule",
    "JsonlLog",
    "ModelRef",
    "RegistryRef",
    "RolloutConfig",
    "RolloutError",
    "apply_decision",
    "assign_arm",
    "camera_bucket",
    "compare",
    "decide",
    "error_rate_exceeded",
    "load_config",
    "main",
    "manifest_lock",
    "mcnemar",
    "now_iso",
    "parse_config",
    "quantiles",
    "read_jsonl",
    "report_for",
    "roll_back",
    "wilson_interval",
    "write_config",
]
