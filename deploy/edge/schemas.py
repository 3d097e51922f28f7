"""Request and response bodies of the edge API (pydantic), so /openapi.json says exactly what each route takes and
gives; schemathesis checks every answer against them (tests/test_api_fuzz.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorOut(BaseModel):
    """Every 4xx/5xx: one line saying what, which value, how to fix (more keys on some, e.g. the state)."""

    model_config = ConfigDict(extra="allow")
    error: str


class StateOut(BaseModel):
    """The rollout state now serving."""

    line: str
    champion: str | None = Field(description="serving champion version; null: not ready")
    champion_error: str | None = Field(description="why the manifest's champion was refused (acceptance stage)")
    champion_source: str | None = Field(
        None, description="manifest, or last-good: the manifest's champion failed acceptance at start"
    )
    challenger: str | None
    challenger_state: Literal["none", "pending", "serving", "failed"] = Field(
        description="pending: missing at start, being retried; failed: rolled back"
    )
    challenger_error: str | None
    challenger_share: float
    shadow: bool
    openvino: dict[str, Any] | None
    loaded_at: str
    signatures: dict[str, str] = Field({}, description="role -> 'signed by <key id>' or 'unsigned (...)'")
    input_variant: dict[str, dict[str, str]] = Field(
        {}, description="role -> {variant: host|graph, why}: the input variant served (rollout manifest's preprocess)"
    )


class HealthOut(StateOut):
    status: Literal["alive"]
    sync: dict[str, Any] | None = Field(None, description="registry sync (deploy.edge.sync): last_ok, stale_s, error")


class ReloadOut(StateOut):
    ok: bool
    error: str | None = None


class PredictOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    frame_id: str = Field(description="server-issued id: name it in /feedback")
    client_frame_id: str | None = Field(description="the camera's own frame id, if it sent one")
    camera_id: str
    class_: str = Field(alias="class")
    class_index: int
    score: float = Field(ge=0.0, le=1.0)
    p_good: float | None = Field(None, ge=0.0, le=1.0, description="P(good class); null without a declared one")
    decision: str | None = Field(None, description="ok | reject at the manifest's threshold on P(good)")
    model_version: str
    role: Literal["champion", "challenger"]
    latency_ms: float = Field(description="server time for the request")


class FeedbackIn(BaseModel):
    """The operator's true class for a served frame: its server ``frame_id``, or ``camera_id`` + ``client_frame_id``."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=256)
    frame_id: str | None = Field(None, max_length=1024)
    camera_id: str | None = Field(None, max_length=1024)
    client_frame_id: str | None = Field(None, max_length=1024)
    image: str | None = Field(
        None,
        description="the frame's bytes as sent to /predict, base64: the frame is kept for training even when the "
        "box no longer holds it (checked against the served frame's sha256 and the decode limits; the body stays "
        "under limits.max_body_bytes)",
    )


class FeedbackOut(BaseModel):
    ok: bool
    frame_id: str
    camera_id: str
    label: str
    frame_kept: bool | None = Field(None, description="the frame is in the box's frame store (deploy.edge.frame_store)")


class AdminIn(BaseModel):
    """Body of every admin action (a JSON body is required, so that a cross-origin form cannot act)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500, description="why, for the audit log")


class Quantiles(BaseModel):
    p50: float | None
    p90: float | None
    p99: float | None


class ArmStats(BaseModel):
    versions: list[str]
    requests: int
    served: int
    shadow: int
    errors: int
    error_rate: float | None
    labelled: int
    correct: int
    accuracy: float | None
    accuracy_ci95: tuple[float, float] | None
    defects: int
    defect_recall: float | None
    defect_recall_ci95: tuple[float, float] | None
    recall_per_class: dict[str, float]
    latency_ms: Quantiles


class Paired(BaseModel):
    """McNemar on frames both models answered: only shadow mode produces them."""

    model_config = ConfigDict(extra="allow")
    frames: int
    labelled: int
    agreement: float
    b: int
    c: int
    p_value: float
    method: Literal["exact", "chi2-cc"]


class Versions(BaseModel):
    champion: str | None
    challenger: str | None


class DecisionPreview(BaseModel):
    action: Literal["promote", "rollback", "wait"]
    reasons: list[str]
    evidence: dict[str, Any]


class ReportOut(BaseModel):
    versions: Versions
    ok_class: str | None  # the champion artifact's declared good class; None: no defect metrics
    overall: dict[Literal["champion", "challenger"], ArmStats]
    per_camera: dict[str, dict[str, ArmStats]]
    paired: Paired | None
    log: dict[str, int]
    state: StateOut
    decision_preview: DecisionPreview


class DecisionOut(BaseModel):
    """What an admin action did; ``applied`` false means nothing changed (and nothing was logged)."""

    model_config = ConfigDict(extra="allow")
    ts: str
    source: str
    actor: str
    line: str
    action: Literal["promote", "rollback", "wait"]
    reasons: list[str]
    evidence: dict[str, Any]
    before: Versions
    after: Versions
    applied: bool
    alias_moves: list[dict[str, Any]]
    state: StateOut


class MetricsOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    requests: int
    errors: int
    latency_ms: Quantiles
    models: dict[str, dict[str, Any]]
