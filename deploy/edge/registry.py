"""MLflow model-registry aliases for the edge rollout: `champion` and `challenger`, each move returned for the audit.

MLflow stages are deprecated; the rollout moves aliases (`models:/<name>@champion`). mlflow is optional on the
edge box: it is imported only when a registry is configured, i.e. when an `MlflowRegistry` is first used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from spt_core.portable.errors import SensituneError, one_line

CHAMPION_ALIAS, CHALLENGER_ALIAS = "champion", "challenger"


class RegistryError(SensituneError):
    """The model registry cannot be reached or refuses an alias move."""


@dataclass(frozen=True)
class AliasMove:
    """One alias change, as written to decisions.jsonl (`to_version` None: the alias was deleted)."""

    model_name: str
    alias: str
    from_version: str | None
    to_version: str | None
    ts: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MlflowRegistry:
    """Alias moves on one registered model.

    Args:
        tracking_uri: MLflow tracking/registry URI, e.g. ``sqlite:///mlflow.db`` or ``http://mlflow:5000``.
        model_name: the registered model's name.
    """

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        self.tracking_uri, self.model_name = tracking_uri, model_name
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from mlflow import MlflowClient
            except ImportError:
                raise RegistryError(
                    f"registry.tracking_uri={self.tracking_uri!r} is set but mlflow is not installed: "
                    "pip install mlflow, or set registry: null in the rollout manifest"
                ) from None
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def get_alias(self, alias: str) -> str | None:
        """The version an alias points at, or None when the alias is not set."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as e:
            if "not found" in str(e).lower():
                return None
            raise RegistryError(f"{self.model_name}@{alias} at {self.tracking_uri}: {one_line(e, None)}") from e

    def set_alias(self, alias: str, version: str) -> AliasMove:
        """Point `alias` at `version` (which must be registered)."""
        from mlflow.exceptions import MlflowException

        before = self.get_alias(alias)
        try:
            self.client.set_registered_model_alias(self.model_name, alias, str(version))
        except MlflowException as e:
            raise RegistryError(
                f"cannot point {self.model_name}@{alias} at version {version!r} ({one_line(e, None)}); "
                "register that version first or fix the rollout manifest's version"
            ) from e
        return AliasMove(self.model_name, alias, before, str(version), _now())

    def delete_alias(self, alias: str) -> AliasMove:
        """Remove `alias`; a no-op move (from None to None) when it was not set."""
        before = self.get_alias(alias)
        if before is not None:
            self.client.delete_registered_model_alias(self.model_name, alias)
        return AliasMove(self.model_name, alias, before, None, _now())

    def set_champion(self, version: str) -> AliasMove:
        return self.set_alias(CHAMPION_ALIAS, version)

    def set_challenger(self, version: str) -> AliasMove:
        return self.set_alias(CHALLENGER_ALIAS, version)

    def clear_challenger(self) -> AliasMove:
        return self.delete_alias(CHALLENGER_ALIAS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def move_aliases(tracking_uri: str, model_name: str, action: str, version: str) -> list[dict[str, Any]]:
    """The registry side of a box decision: promote -> `champion` to `version`, `challenger` cleared; rollback ->
    `challenger` cleared. Returns the moves (for the audit trail)."""
    registry = MlflowRegistry(tracking_uri, model_name)
    moves = [registry.set_champion(version).to_dict()] if action == "promote" else []
    return moves + [registry.clear_challenger().to_dict()]


class AliasOutbox:
    """Alias moves carried out by one worker thread, in order, with retries (``backoff_s`` doubling per attempt).

    A decision completes locally at once (manifest, decision log, the served models); the registry follows here,
    so no control action ever waits on the network, however long the registry client takes to give up.
    `on_result` gets one record per move: ``outcome`` ok | failed, ``alias_moves`` or ``error``, ``attempts``.
    """

    def __init__(self, on_result: Callable[[dict[str, Any]], None], attempts: int = 5, backoff_s: float = 2.0) -> None:
        self.on_result, self.attempts, self.backoff_s = on_result, attempts, backoff_s
        self._jobs: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, tracking_uri: str, model_name: str, action: str, version: str, **context: Any) -> None:
        """Queue one decision's alias moves; returns at once."""
        job = {"tracking_uri": tracking_uri, "model_name": model_name, "action": action, "version": version, **context}
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="registry-outbox", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every queued move has been tried to the end (tests, orderly shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                job, self._busy = self._jobs.popleft(), True
            try:
                self.on_result(self._carry_out(job))
            except Exception:  # the audit sink failing must not stop later moves
                logging.getLogger("sensitune.edge").exception("registry outbox: cannot record a result")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _carry_out(self, job: dict[str, Any]) -> dict[str, Any]:
        error = None
        for attempt in range(1, self.attempts + 1):
            try:
                moves = move_aliases(job["tracking_uri"], job["model_name"], job["action"], job["version"])
                return {**job, "outcome": "ok", "alias_moves": moves, "attempts": attempt}
            except Exception as e:
                error = f"{type(e).__name__}: {one_line(e, None)}"
                if attempt < self.attempts:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return {**job, "outcome": "failed", "error": error, "attempts": self.attempts}
