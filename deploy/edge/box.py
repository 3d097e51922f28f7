"""box.yaml: one edge box's identity, registry, sync, frame store and trusted keys (`BoxConfig`).

    box: box-a
    line: line-1
    store: store                  # models: store/<registry version>/<precision>/, never overwritten
    registry: {url: http://mlflow:5000, model_name: sensitune-tf_efficientnet_lite0, precision: fp32}
    sync: {interval_s: 60, stale_after_s: 300, challenger_share: 0.25, fleet: false}
    frames: {dir: frames, quota_mb: 500, low_margin: 0.15, random_rate: 0.05}
    trust: {public_keys: [keys/release.pub], require_signature: true}

``sync.fleet: true``: the box belongs to a fleet (`deploy.edge.fleet`): it serves a challenger only while a fleet
plan puts it in the current wave, and its own promote/rollback decisions stay on the box (reported to the fleet,
never moving the registry's aliases). A box without it follows a plan too when the challenger carries one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.edge.frame_store import FrameRule, FrameStore
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.rollout import manifest as rollout_manifest
from deploy.edge.signing import Trust
from spt_core.portable.errors import SensituneError, one_line


@dataclass
class BoxConfig:
    """box.yaml: one edge box. Relative paths are relative to the file."""

    box: str
    line: str
    rollout: Path
    store: Path
    url: str
    model_name: str
    precision: str = "fp32"
    timeout_s: float = 10.0
    interval_s: float = 60.0
    stale_after_s: float = 300.0
    challenger_share: float = rollout_manifest.CHALLENGER_SHARE  # for a challenger arriving where the manifest has 0
    upload_unlabelled: bool = False
    frames_dir: Path | None = None
    frames_quota_mb: float = 500.0
    frame_rule: FrameRule = field(default_factory=FrameRule)
    download_deadline_s: float = 600.0  # one file, the whole request
    max_download_mb: float = 2048.0
    trusted_keys: list[Path] = field(default_factory=list)  # Ed25519 .pub files (several: key rotation)
    require_signature: bool | None = None  # None: true when trusted_keys is non-empty
    fleet: bool = False  # sync.fleet: a challenger only under a fleet plan; own decisions stay local

    @classmethod
    def load(cls, path: str | Path) -> BoxConfig:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
            base = path.resolve().parent
            reg, sync, frames, trust = d["registry"], d.get("sync") or {}, d.get("frames"), d.get("trust") or {}
            return cls(
                box=str(d["box"]), line=str(d["line"]), rollout=base / d.get("rollout", "rollout.yaml"),
                store=base / d.get("store", "store"), url=str(reg["url"]), model_name=str(reg["model_name"]),
                precision=str(reg.get("precision", "fp32")), timeout_s=float(reg.get("timeout_s", 10.0)),
                interval_s=float(sync.get("interval_s", 60.0)), stale_after_s=float(sync.get("stale_after_s", 300)),
                challenger_share=float(sync.get("challenger_share", rollout_manifest.CHALLENGER_SHARE)),
                upload_unlabelled=bool(sync.get("upload_unlabelled", False)),
                frames_dir=None if frames is None else base / frames.pop("dir", "frames"),
                frames_quota_mb=float((frames or {}).pop("quota_mb", 500.0)),
                frame_rule=FrameRule.from_dict(frames),
                download_deadline_s=float(reg.get("download_deadline_s", 600.0)),
                max_download_mb=float(reg.get("max_download_mb", 2048.0)),
                trusted_keys=[base / k for k in trust.get("public_keys") or []],
                require_signature=None if trust.get("require_signature") is None else bool(trust["require_signature"]),
                fleet=bool(sync.get("fleet", False)),
            )  # fmt: skip
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
            raise SensituneError(
                f"{path}: not a usable box config ({one_line(e, None)}); see docs/from-images-to-line.md"
            ) from None

    def frame_store(self, count: Any = lambda _: None) -> FrameStore | None:  # count: the service's metrics.count
        d = self.frames_dir
        return None if d is None else FrameStore(d, self.frame_rule, self.frames_quota_mb, count=count)

    def trust(self) -> Trust:
        """The keys this box trusts (box.yaml ``trust: {public_keys: [...], require_signature: ...}``)."""
        return Trust.load(self.trusted_keys, self.require_signature)

    def registry(self) -> RestRegistry:
        return RestRegistry(self.url, self.model_name, self.timeout_s, self.download_deadline_s,
                            int(self.max_download_mb * 2**20))  # fmt: skip
