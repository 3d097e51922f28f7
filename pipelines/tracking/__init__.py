"""MLflow: run logging (`run`), the model registry (`registry`), shared helpers (`common`)."""

from .common import DEFAULT_URI, TrackingWarning, dvc_md5, flatten, git_commit, tracking_uri
from .registry import CHALLENGER, register_model
from .run import EXPORT_REPORT_KEYS, FALLBACK_FILE, RECORD_FILE, collect_record, log_run, replay

__all__ = [
    "CHALLENGER",
    "DEFAULT_URI",
    "EXPORT_REPORT_KEYS",
    "FALLBACK_FILE",
    "RECORD_FILE",
    "TrackingWarning",
    "collect_record",
    "dvc_md5",
    "flatten",
    "git_commit",
    "log_run",
    "register_model",
    "replay",
    "tracking_uri",
]
