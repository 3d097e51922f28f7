"""Acceptance: the one gate every model passes before a box serves it or writes it into its rollout state.

In order, each failure a one-line `ArtifactError` naming the stage:
    1. hash       every file's sha256 and the version (`deploy.edge.artifact.load_artifact`)
    2. signature  manifest.json signed by a trusted key (`deploy.edge.signing.Trust`)
    3. promotable export's verification gate did not fail for it
    4. compile    OpenVINO compiles the verified bytes, with the in-graph preprocessing where the manifest ships it
                  (``input_variant: graph``: the box then feeds decoded frames, `inferencer.graph_input`) and the
                  rollout manifest's ``preprocess`` chooses it for this box's device (`Serving.variant_choice`)
    5. smoke      one grey frame: as many logits as class names, a finite answer
    6. compatible against the serving champion: same class names in the same order, the same ok_class, the same
                  input contract (colour, layout, tensor names; size and normalisation are each model's own, applied
                  from its manifest); a version that changes the classes must be declared (registry version tag
                  ``sensitune.class_change: true``), and then only as a champion, never as a challenger, so the
                  champion's A/B statistics never mix two class sets
Sync runs it on a staged download before the rollout manifest names the version; the runtime runs it at every load
(a file can change on disk after sync), and keeps the last champion that passed (`remember`, ``<log_dir>/last-good``)
so that a box with any verified model on disk never answers 503 after a restart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deploy.edge.artifact import MANIFEST, Artifact, ArtifactError, load_artifact
from deploy.edge.inferencer import Inferencer
from deploy.edge.inferencer.graph_input import open_variant
from deploy.edge.mlflow_rest import NotFound, RestRegistry
from deploy.edge.precision import artifact_dir, choose_served, fallback_chain, manifest_verdict
from deploy.edge.serving import Serving
from deploy.edge.signing import SIGNATURE, Trust
from spt_core.portable.errors import one_line
from spt_core.portable.io import write_json

CLASS_CHANGE_TAG = "sensitune.class_change"  # registry version tag declaring a deliberate change of classes
LAST_GOOD = "last-good"  # in log_dir: a copy of the last champion that passed acceptance
SERVED_NOTE = "served.json"  # in <store>/<version>/: the precision chosen for it and why (`Intake.choose`)
STAGING = ".staging"  # in the sync store: downloads before acceptance; wiped at start (a killed download's rest)
_TENSORS = ("input_name", "output_name")


@dataclass(frozen=True)
class Accepted:
    """A model that passed acceptance: compiled, and the verified bytes it was compiled from (for `remember`)."""

    model: Inferencer
    artifact: Artifact  # with `data`: the verified model file bytes
    manifest_bytes: bytes
    signature_bytes: bytes | None
    signature: str  # what /healthz says: "signed by <key id>" or "unsigned (...)"


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read it ({one_line(e)}); check its permissions") from None


def incompatibility(candidate: Artifact, champion: Artifact) -> str | None:
    """Why `candidate` cannot serve beside (or after) `champion` without a declared class change, or None."""
    if candidate.class_names != champion.class_names:
        return (f"class names {candidate.class_names} differ from champion {champion.version}'s "
                f"{champion.class_names} (names and order must match)")  # fmt: skip
    if (ok := candidate.operating_point.ok_class) != (champion_ok := champion.operating_point.ok_class):
        return f"ok_class {ok!r} differs from champion {champion.version}'s {champion_ok!r}"
    for key in _TENSORS:
        if candidate.manifest.get(key) != champion.manifest.get(key):
            return f"input contract {key}={candidate.manifest.get(key)!r} differs from champion {champion.version}'s"
    ours, theirs = candidate.preprocess, champion.preprocess
    if (ours.color, ours.layout) != (theirs.color, theirs.layout):
        return f"input contract {ours.color}/{ours.layout} differs from champion {champion.version}'s"
    return None


def smoke_test(model: Inferencer, artifact: Artifact) -> None:
    """One mid-grey frame: the logits must number the class names (a 4-logit model with 3 names would answer 500
    on the frames whose top class has no name), and the served answer must be finite."""
    h, w = artifact.preprocess.size
    grey = Image.new("RGB", (w, h), (128, 128, 128))
    try:
        logits = np.asarray(model.infer(model.model_input(grey)))  # the input of its variant (host or graph)
    except Exception as e:
        raise ArtifactError(f"{artifact.dir}: smoke test failed ({one_line(e)}); re-export it") from None
    if logits.ndim != 2 or logits.shape[-1] != len(artifact.class_names):
        raise ArtifactError(f"{artifact.dir}: the model gives {logits.shape[-1]} logits but {MANIFEST} names "
                            f"{len(artifact.class_names)} classes; re-export it with matching class_names")  # fmt: skip
    model.smoke_test()


def accept(
    artifact_dir: str | Path,
    version: str | None = None,
    *,
    trust: Trust | None = None,
    openvino: dict[str, Any] | None = None,
    champion: Artifact | None = None,
    role: str = "champion",
    class_change: bool = False,
    serving: Serving | None = None,
) -> Accepted:
    """Run the acceptance stages (module docstring) on one artifact directory.

    Args:
        artifact_dir: The staged or stored artifact.
        version: The version the registry or rollout manifest names; ``model_version`` must equal it.
        trust: Trusted keys; None: no keys, signatures not required.
        openvino: Compile properties over the artifact's ``runtime_config``.
        champion: The serving champion's artifact to check compatibility against; None: no check (the first model).
        role: ``champion`` or ``challenger``; a challenger must always be compatible.
        class_change: The registry declares that this version changes the classes (champion only).
        serving: The rollout manifest's device, camera count (its performance hint, under ``openvino``), batching
            and input variant choice (`deploy.edge.serving`); None: CPU, ``openvino`` alone and the variant the
            artifact ships (a staged download's check: what the export allowed compiles).

    Raises:
        ArtifactError: The first stage that failed, in one line.
    """
    d = Path(artifact_dir)
    trust = trust or Trust()
    manifest_bytes = _read_optional(d / MANIFEST)
    artifact = load_artifact(d, expected_version=version)  # 1. hash
    if manifest_bytes is None or json.loads(manifest_bytes) != artifact.manifest:
        raise ArtifactError(f"{d / MANIFEST} changed while it was read; retry")
    signature_bytes = _read_optional(d / SIGNATURE)
    signature = trust.check(d, manifest_bytes, signature_bytes)  # 2. signature
    if artifact.promotable is False:  # 3.
        raise ArtifactError(f"{d / MANIFEST}: promotable=false (see its 'verification'); fix the export or pick "
                            "another")  # fmt: skip
    if champion is not None and champion.version != artifact.version:  # 6 before 4: refuse without compiling
        why = incompatibility(artifact, champion)
        if why and (role != "champion" or not class_change):
            how = f"declare it with the registry version tag {CLASS_CHANGE_TAG}=true"
            if role != "champion":
                how = "a challenger must keep the champion's classes; promote a class change explicitly"
            raise ArtifactError(f"v{artifact.version} refused: {why}; {how}")
    props, device, batching = openvino, "CPU", None
    variant, why = artifact.input_variant, "the variant the artifact ships (no rollout manifest)"
    if serving is not None:
        props, device, batching = serving.compile_properties(openvino), serving.device, serving.batching
        variant, why = serving.variant_choice(artifact.input_variant)
    # 4. compile (from the verified bytes), in the input variant this box serves, for the manifest's device
    model = open_variant(artifact, props, variant, device=device, batching=batching)
    model.variant_why = why
    smoke_test(model, model.artifact)  # 5.
    return Accepted(model, artifact, manifest_bytes, signature_bytes, signature)


def remember(accepted: Accepted, log_dir: Path) -> Path:
    """Keep `accepted`'s verified bytes as ``<log_dir>/last-good`` (replaced whole, atomically enough: a new folder
    is renamed over the old one); a no-op when that very manifest is kept already."""
    target = Path(log_dir) / LAST_GOOD
    if _read_optional(target / MANIFEST) == accepted.manifest_bytes:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{LAST_GOOD}.tmp-", dir=target.parent))
    try:
        for name, data in accepted.artifact.data.items():
            (tmp / name).write_bytes(data)
        if accepted.signature_bytes is not None:
            (tmp / SIGNATURE).write_bytes(accepted.signature_bytes)
        (tmp / MANIFEST).write_bytes(accepted.manifest_bytes)  # last: a folder with a manifest is complete
        old = target.with_name(f".{LAST_GOOD}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def last_good(log_dir: Path) -> tuple[str, Path] | None:
    """(version, folder) of the kept last-good champion, or None when there is none (its bytes are checked later)."""
    for folder in (Path(log_dir) / LAST_GOOD, Path(log_dir) / f".{LAST_GOOD}.old"):  # .old: killed mid-`remember`
        try:
            return str(json.loads((folder / MANIFEST).read_text())["model_version"]), folder
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def without_bytes(accepted: Accepted) -> Artifact:
    """The artifact without its bytes (OpenVINO holds its own copy once compiled)."""
    return replace(accepted.artifact, data={})


class Intake:
    """A box's way in for registry versions: download into ``<store>/.staging/``, `accept` there, and only then rename
    into ``<store>/<version>/<precision>/`` (a new folder per version: a good one is never rewritten, a damaged one
    is moved aside). Verdicts are kept per (manifest, champion, role), so a refused version is not downloaded again.

    Args:
        reg: The registry (`deploy.edge.mlflow_rest.RestRegistry`): deadlines, size caps, validated replies.
        store: The box's store folder.
        precision: The precision the box is set to (``export/openvino/<precision>/``); a version whose export refused
            it serves the next one down `deploy.edge.precision.FALLBACK` (`choose`).
        trust: The keys this box trusts.
        on_refuse: Called once per new refusal with (role, version, reason): the caller counts and audits it.
    """

    def __init__(self, reg: RestRegistry, store: Path, precision: str, trust: Trust,
                 on_refuse: Callable[[str, str, str], None] | None = None) -> None:  # fmt: skip
        self.reg, self.store, self.precision, self.trust, self.on_refuse = reg, store, precision, trust, on_refuse
        store.mkdir(parents=True, exist_ok=True)
        self.staging = store / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)
        for stale in store.glob("*/.*.tmp-*"):  # the same, from before the staging area
            shutil.rmtree(stale, ignore_errors=True)
        self._verdicts: dict[tuple, Artifact | str] = {}  # an accepted artifact (no bytes) or a refusal
        self.serving: dict[str, dict[str, str]] = {}  # version -> {"precision", "why"}: for /healthz and the UI

    def fetch(self, mv: dict[str, Any], against: Artifact | None, role: str) -> tuple[Path, Artifact]:
        """The accepted folder for registry version `mv` (``version``, ``run_id``, ``tags``) and its artifact.

        Raises:
            ArtifactError: Refused (the reason names the stage).
            RegistryError: The registry failed (the sync round's error).
        """
        version = mv["version"]
        try:
            prec, why, manifest_bytes = self.choose(mv)
        except ArtifactError as e:  # no precision of the chain may serve: refused like a failed stage (once)
            if ("choose", version) not in self._verdicts and self.on_refuse is not None:
                self.on_refuse(role, version, str(e))
            self._verdicts[("choose", version)] = str(e)
            raise
        self.serving[version] = {"precision": prec, "why": why}
        target = self.store / version / prec
        if target.is_dir():
            try:
                load_artifact(target, expected_version=version)
            except ArtifactError:  # damaged on disk: keep it aside for inspection, fetch again
                target.rename(target.with_name(f".damaged-{prec}-{int(time.time())}"))
        if target.is_dir():
            return target, self._accept(target, (target / MANIFEST).read_bytes(), mv, against, role)
        where = artifact_dir("export", prec).as_posix()  # the run logs the sealed export under export/
        if manifest_bytes is None:
            manifest_bytes = self.reg.read_run_file(mv["run_id"], f"{where}/{MANIFEST}")
        if isinstance(verdict := self._verdicts.get(_key(manifest_bytes, mv, against, role)), str):
            raise ArtifactError(verdict)  # refused before: not downloaded again
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f"{version}-{prec}-", dir=self.staging))
        try:
            for name in _listed_files(manifest_bytes, version):
                self.reg.download(mv["run_id"], f"{where}/{name}", staged / name)
            try:
                (staged / SIGNATURE).write_bytes(self.reg.read_run_file(mv["run_id"], f"{where}/{SIGNATURE}"))
            except NotFound:  # unsigned: the trust policy decides whether that is allowed
                pass
            (staged / MANIFEST).write_bytes(manifest_bytes)  # the very bytes that were signed
            art = self._accept(staged, manifest_bytes, mv, against, role)
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(target)
            write_json(target.parent / SERVED_NOTE, {"wanted": self.precision, **self.serving[version]})
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return target, replace(art, dir=target, files={n: target / n for n in art.files})

    def choose(self, mv: dict[str, Any]) -> tuple[str, str, bytes | None]:
        """Which precision of registry version `mv` this box serves, why, and its manifest bytes when read here:
        `deploy.edge.precision.choose_served` down the box's chain (int8 -> fp16 -> fp32), judged by each
        precision's ``promotable`` in its manifest before anything large is downloaded. A choice already stored
        (``<store>/<version>/served.json``, its folder present) is reused without asking the registry.

        Raises:
            ArtifactError: No precision of the chain may serve.
        """
        version = mv["version"]
        if (self.store / version / self.precision).is_dir():  # stored: it passed acceptance, so it was promotable
            return self.precision, f"serving {self.precision}", None
        note = _read_json(self.store / version / SERVED_NOTE)
        if note.get("wanted") == self.precision and (self.store / version / str(note.get("precision"))).is_dir():
            return str(note["precision"]), str(note.get("why") or f"serving {note['precision']}"), None
        verdicts: dict[str, dict] = {}
        manifests: dict[str, bytes] = {}
        for prec in fallback_chain(self.precision):
            try:
                where = artifact_dir("export", prec).as_posix()  # the run logs the sealed export under export/
                manifests[prec] = self.reg.read_run_file(mv["run_id"], f"{where}/{MANIFEST}")
            except NotFound:
                continue
            try:
                m = json.loads(manifests[prec])
            except ValueError:
                m = None
            verdicts[prec] = manifest_verdict(m) if isinstance(m, dict) else {"promotable": None}  # stage 1 says why
            if verdicts[prec]["promotable"] is not False:
                break  # the best one that may serve: the rest of the chain is not read
        prec, why = choose_served(self.precision, verdicts)
        if prec is None:
            raise ArtifactError(f"v{version}: {why}; re-export it, or publish a version whose export passed")
        return prec, why, manifests[prec]

    def _accept(self, folder: Path, manifest_bytes: bytes, mv: dict[str, Any], against: Artifact | None,
                role: str) -> Artifact:  # fmt: skip
        key = _key(manifest_bytes, mv, against, role)
        if key not in self._verdicts:
            class_change = str((mv.get("tags") or {}).get(CLASS_CHANGE_TAG, "")).lower() == "true"
            try:
                accepted = accept(folder, mv["version"], trust=self.trust, champion=against, role=role,
                                  class_change=class_change)  # fmt: skip
                self._verdicts[key] = without_bytes(accepted)
            except ArtifactError as e:
                self._verdicts[key] = str(e)
                if self.on_refuse is not None:
                    self.on_refuse(role, mv["version"], str(e))
        verdict = self._verdicts[key]
        if isinstance(verdict, str):
            raise ArtifactError(verdict)
        return verdict


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _key(manifest_bytes: bytes, mv: dict[str, Any], against: Artifact | None, role: str) -> tuple:
    change = (mv.get("tags") or {}).get(CLASS_CHANGE_TAG)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    return mv["version"], digest, None if against is None else against.version, role, change


def _listed_files(manifest_bytes: bytes, version: str) -> list[str]:
    """The model files the registry's manifest lists, each a plain name inside the artifact dir."""
    try:
        files = json.loads(manifest_bytes)["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ArtifactError(f"v{version}: the registry's {MANIFEST} is not a sealed manifest; re-publish it") from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or name == SIGNATURE:
            raise ArtifactError(f"v{version}: file name {name!r} leaves the artifact dir; re-publish it")
    return list(files)
