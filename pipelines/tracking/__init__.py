"""MLflow: run logging (`run`), the model registry (`registry`), benchmark tables (`benchmarks`), shared helpers."""

from .benchmarks import BENCHMARK_EXPERIMENT, log_benchmark
from .common import DEFAULT_URI, TrackingWarning, dvc_md5, flatten, git_commit, tracking_uri
from .registry import CHALLENGER, register_model
from .run import EXPORT_REPORT_KEYS, FALLBACK_FILE, RECORD_FILE, collect_record, log_run, replay

__all__ = [
    "BENCHMARK_EXPERIMENT",
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
    "log_benchmark",
    "log_run",
    "register_model",
    "replay",
    "tracking_uri",
]
