"""MLflow model-registry aliases for the edge rollout: `champion` and `challenger`, each move returned for the audit.

MLflow stages are deprecated; the rollout moves aliases (`models:/<name>@champion`). mlflow is optional on the
edge box: it is imported only when a registry is configured, i.e. when an `MlflowRegistry` is first used.
"""

from __future__ import annotations

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
            raise RegistryError(f"{self.model_name}@{alias} at {self.tracking_uri}: {one_line(e)}") from e

    def set_alias(self, alias: str, version: str) -> AliasMove:
        """Point `alias` at `version` (which must be registered)."""
        from mlflow.exceptions import MlflowException

        before = self.get_alias(alias)
        try:
            self.client.set_registered_model_alias(self.model_name, alias, str(version))
        except MlflowException as e:
            raise RegistryError(
                f"cannot point {self.model_name}@{alias} at version {version!r} ({one_line(e)}); "
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
