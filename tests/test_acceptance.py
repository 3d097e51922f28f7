"""deploy.edge.acceptance and signing on the box, without a registry: a wrong model is refused with its reason,
a signed model is served only when a trusted key signed those very manifest bytes, and a box whose manifest names
a champion that no longer passes starts on its last-good champion instead of answering 503.

The registry half (sync's staged download, hostile replies, the async registry) is tests/test_sync_hostile.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.artifacts import ALWAYS_OK, CLASSES, N_FEATURES, build_artifact, variant, write_manifest
from support.servers import serve

from deploy.edge.acceptance import LAST_GOOD, accept
from deploy.edge.artifact import ArtifactError
from deploy.edge.service import EdgeService, create_app, load_model
from deploy.edge.signing import SIGNATURE, SignatureError, Trust, keygen, sign_artifact
from deploy.edge.signing import main as signing_main

SIZE = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny OpenVINO artifact (version 1, the four demo classes); tests derive variants from it."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(len(CLASSES), N_FEATURES)), rng.normal(size=len(CLASSES))
    return build_artifact(tmp_path_factory.mktemp("acc") / "v1", "1", w, b, SIZE)




def broken_ir(src: Path, dst: Path, version: str) -> Path:
    """Consistent checksums, an IR OpenVINO cannot read: what hashing alone lets through."""
    return variant(src, dst, version, files={"model.xml": b"<?xml version='1.0'?><net name='broken'><layers>"})


def rollout(tmp: Path, champion: Path, version: str, challenger: tuple[str, Path] | None = None) -> Path:
    ch = {"version": challenger[0], "path": str(challenger[1])} if challenger else None
    return write_manifest(tmp / "rollout.yaml", line="line-1", champion={"version": version, "path": str(champion)},
                          challenger=ch, challenger_share=1.0 if ch else 0.0, log_dir="logs")  # fmt: skip


def test_four_logits_but_three_class_names_is_refused(base: Path, tmp_path: Path) -> None:
    # the grey frame's top class is 'ok' (index 0), so predicting alone would pass; the logits count does not
    art = build_artifact(tmp_path / "src", "1", *ALWAYS_OK, SIZE)
    short = variant(art, tmp_path / "v2", "2", class_names=CLASSES[:3], num_classes=3)
    with pytest.raises(ArtifactError, match="gives 4 logits but manifest.json names 3 classes"):
        load_model(short, "2")


def test_challenger_with_swapped_or_other_classes_is_refused_and_its_labels_too(base: Path, tmp_path: Path) -> None:
    swapped = [CLASSES[3], *CLASSES[1:3], CLASSES[0]]  # crack <-> ok: hashes consistent, meaning reversed
    v2 = variant(base, tmp_path / "v2", "2", class_names=swapped)
    service = EdgeService(rollout(tmp_path, base, "1", ("2", v2)))
    state = service.runtime.state()
    assert (state["champion"], state["challenger"], state["challenger_state"]) == ("1", None, "failed")
    assert "class names" in state["challenger_error"] and "names and order must match" in state["challenger_error"]
    assert service.runtime.arm("cam-1") == "champion"  # every camera on the champion

    other = variant(base, tmp_path / "v3", "3", class_names=[*CLASSES[:3], "dent"])
    (tmp_path / "b").mkdir()
    service = EdgeService(rollout(tmp_path / "b", base, "1", ("3", other)))
    assert service.runtime.challenger is None and "class names" in service.runtime.challenger_error
    with pytest.raises(ArtifactError, match="a challenger must keep the champion's classes"):
        accept(other, "3", champion=service.runtime.champion.artifact, role="challenger", class_change=True)
    # a declared class change is accepted as a champion (never as a challenger)
    assert accept(other, "3", champion=service.runtime.champion.artifact, class_change=True).model.version == "3"


def test_uncompilable_champion_at_start_serves_the_last_good_one(base: Path, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, base, "1")
    first = create_app(cfg)  # v1 passes acceptance: its verified bytes are kept as last-good
    assert (tmp_path / "logs" / LAST_GOOD / "manifest.json").is_file()
    first.state.service.close()
    broken = broken_ir(base, tmp_path / "v2", "2")
    rollout(tmp_path, broken, "2")  # a manifest naming a champion that no longer loads, then a restart
    with serve(create_app(cfg)) as url:
        ready, health = httpx.get(f"{url}/readyz"), httpx.get(f"{url}/healthz").json()
        frame = httpx.post(f"{url}/predict", files={"file": _png()}, data={"camera_id": "cam-1"})
    assert ready.status_code == 200 and ready.json()["champion"] == "1"
    assert health["champion_source"] == "last-good" and "cannot be loaded by OpenVINO" in health["champion_error"]
    assert frame.status_code == 200 and frame.json()["model_version"] == "1"


def test_nothing_verified_on_disk_is_not_ready(base: Path, tmp_path: Path) -> None:
    service = EdgeService(rollout(tmp_path, broken_ir(base, tmp_path / "v2", "2"), "2"))
    assert service.runtime.champion is None and service.runtime.state()["champion_source"] is None


def test_signatures_trusted_keys_rotation_and_refusals(base: Path, tmp_path: Path) -> None:
    old_key, old_pub = keygen(tmp_path / "keys" / "old")
    new_key, new_pub = keygen(tmp_path / "keys" / "new")
    _, stranger_pub = keygen(tmp_path / "keys" / "stranger")
    trust = Trust.load([old_pub, new_pub])  # rotation: both trusted while boxes move over
    assert trust.required  # keys configured -> a signature is required by default

    unsigned = variant(base, tmp_path / "unsigned", "1")
    with pytest.raises(SignatureError, match="unsigned"):
        accept(unsigned, "1", trust=trust)
    assert accept(unsigned, "1").signature.startswith("unsigned")  # a development box: no keys, no requirement

    for key in (old_key, new_key):
        signed = variant(base, tmp_path / f"signed-{key.stem}", "1")
        sign_artifact(signed, key)
        assert accept(signed, "1", trust=trust).signature.startswith("signed by ")
    with pytest.raises(SignatureError, match="does not trust"):
        accept(signed, "1", trust=Trust.load([stranger_pub]))

    m = json.loads((signed / "manifest.json").read_text())
    (signed / "manifest.json").write_text(json.dumps({**m, "threshold": 0.01}))  # the operating point, changed
    with pytest.raises(SignatureError, match="bad signature"):
        accept(signed, "1", trust=trust)
    (signed / SIGNATURE).write_text("{not json")
    with pytest.raises(SignatureError, match="malformed"):
        accept(signed, "1", trust=trust)

    # the box says why it refused its champion; the CLI agrees
    service = EdgeService(rollout(tmp_path, unsigned, "1"), trust=trust)
    assert service.runtime.champion is None and "requires a signature" in service.runtime.state()["champion_error"]
    good = variant(base, tmp_path / "good", "1")
    sign_artifact(good, new_key)
    assert signing_main(["verify", str(good), "--trust", str(old_pub), "--trust", str(new_pub)]) == 0
    assert signing_main(["verify", str(unsigned), "--trust", str(new_pub)]) == 2
    service = EdgeService(rollout(tmp_path, good, "1"), trust=trust)
    assert service.runtime.state()["signatures"]["champion"].startswith("signed by ")


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (90, 120, 30)).save(buf, "PNG")
    return buf.getvalue()
