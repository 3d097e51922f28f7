"""The MLflow run while it trains: per-epoch metrics as each epoch ends, then `log_run`/`publish` finish the run.

    live = LiveRun(params)                  # nothing is contacted yet
    stages.train_stage(params, on_epoch=live)
    # run/mlflow_live.json = {"run_id", "tracking_uri", "fingerprint": null}; log_run continues this run

Each epoch's metrics carry the time they were measured (MLflow draws live curves from them). The run is created
at the first epoch, with the name and tags the finished run will have. Like every tracking call here it never
breaks training: a failure is one `TrackingWarning` and the rest of the epochs are not sent (the finished run
then logs them from history.csv).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from spt_core.portable.io import write_json

from .common import (
    EXPERIMENT_KIND,
    TrackingWarning,
    check_reachable,
    data_version,
    dvc_experiment,
    experiment_id,
    mlflow_session,
    read_json,
    run_name,
)
from .common import tracking_uri as _uri

LIVE_FILE = "mlflow_live.json"
# fit's epoch record key -> MLflow metric (the names log_run uses for history.csv)
LIVE_METRICS = {"train_loss": "train_loss", "val_acc": "val_acc", "val_loss": "val_loss", "lr": "lr",
                "seconds": "epoch_seconds"}  # fmt: skip


class LiveRun:
    """An ``on_epoch`` callback for `stages.train_stage` that logs each epoch to MLflow as it ends.

    Args:
        params: The resolved params (run name, data version, run directory).
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        experiment: MLflow experiment name.
        tags: Extra run tags (e.g. the Prefect flow run id).
    """

    def __init__(
        self,
        params: dict,
        *,
        tracking_uri: str | None = None,
        experiment: str = "sensitune",
        tags: dict[str, str] | None = None,
    ) -> None:
        self.params, self.uri, self.experiment = params, _uri(tracking_uri), experiment
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.failed = False
        self.file = Path(params["paths"]["run"]) / LIVE_FILE

    def __call__(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            with mlflow_session(self.uri) as mlflow:
                from mlflow.entities import Metric

                client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                if self.run_id is None:
                    self._start(client)
                now, step = int(time.time() * 1000), int(record["epoch"])
                metrics = [Metric(m, float(record[k]), now, step) for k, m in LIVE_METRICS.items() if k in record]
                client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # never stop training for tracking
            self.failed = True
            warnings.warn(f"MLflow at {self.uri}: live epoch metrics stopped ({type(e).__name__}: {e})",
                          TrackingWarning, stacklevel=2)  # fmt: skip

    def _start(self, client: Any) -> None:
        check_reachable(self.uri)
        self.file.unlink(missing_ok=True)  # an older run's id must not be continued
        version = data_version(self.params)
        tags = {"data_version": version, "dvc.experiment": dvc_experiment(), "sensitune.live": "true", **self.tags}
        exp = experiment_id(client, self.experiment, self.uri)
        name = run_name(self.params, None, version)
        run = client.create_run(exp, run_name=name, tags={k: str(v) for k, v in tags.items() if v is not None})
        self.run_id = run.info.run_id
        write_json(self.file, {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment})


def live_run_id(run_dir: Path, uri: str) -> str | None:
    """The run a `LiveRun` opened for this run directory on this server (None when there is none)."""
    rec = read_json(Path(run_dir) / LIVE_FILE)
    if isinstance(rec, dict) and rec.get("tracking_uri") == uri and rec.get("run_id"):
        return str(rec["run_id"])
    return None


__all__ = ["EXPERIMENT_KIND", "LIVE_FILE", "LiveRun", "live_run_id"]
