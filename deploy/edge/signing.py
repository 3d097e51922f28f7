"""Signed models: the publishing side signs each sealed artifact's ``manifest.json`` with an Ed25519 private key kept
out of the registry; a box trusts a list of public keys (several, so a key can be rotated) and refuses an artifact
whose signature is missing (when required) or does not verify.

What is signed: the exact bytes of ``manifest.json``. It holds the sha256 of every model file, the class names and
the operating point (``ok_class``, ``threshold``), so one signature covers everything the box serves. The signature
lies beside it in ``signature.json`` (``{"alg": "ed25519", "key_id", "signature"}``); it is not listed in the
manifest, which cannot hold its own signature.

    python -m deploy.edge.signing keygen --out keys/publisher     publisher.key (private, 0600) + publisher.pub
    python -m deploy.edge.signing sign ARTIFACT_DIR --key keys/publisher.key
    python -m deploy.edge.signing verify ARTIFACT_DIR --trust keys/publisher.pub [--trust keys/next.pub]

Torch-free (``cryptography`` only): the edge box imports this module.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploy.edge.artifact import MANIFEST, ArtifactError
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import write_bytes

SIGNATURE = "signature.json"
ALG = "ed25519"
KEY_ENV, TRUST_ENV = "SENSITUNE_SIGNING_KEY", "SENSITUNE_TRUSTED_KEYS"


class SignatureError(ArtifactError):
    """An artifact whose signature is missing (when required), malformed, from an untrusted key, or wrong."""


def key_id(public: Ed25519PublicKey) -> str:
    """sha256[:16] of the raw public key: names the key in signature.json, /healthz and the audit log."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The publisher's Ed25519 private key (PEM, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SensituneError(f"signing key {path}: not readable as a PEM private key ({one_line(e)}); "
                             "make one with `python -m deploy.edge.signing keygen`") from None  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise SensituneError(f"signing key {path}: not an Ed25519 key; make one with `deploy.edge.signing keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """One trusted Ed25519 public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise SensituneError(f"trusted key {path}: not readable as a PEM public key ({one_line(e)}); "
                             "copy the publisher's .pub file") from None  # fmt: skip
    if not isinstance(key, Ed25519PublicKey):
        raise SensituneError(f"trusted key {path}: not an Ed25519 public key; copy the publisher's .pub file")
    return key


def sign_bytes(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """signature.json's bytes for these manifest bytes."""
    sig = base64.b64encode(key.sign(manifest_bytes)).decode()
    return (json.dumps({"alg": ALG, "key_id": key_id(key.public_key()), "signature": sig}, indent=2) + "\n").encode()


def sign_artifact(artifact_dir: str | Path, key_path: str | Path) -> Path:
    """Sign a sealed artifact's manifest.json; writes signature.json beside it (atomically) and returns its path."""
    d = Path(artifact_dir)
    try:
        manifest = (d / MANIFEST).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{d / MANIFEST}: cannot read it to sign ({one_line(e)}); seal it first") from None
    write_bytes(d / SIGNATURE, sign_bytes(manifest, load_private_key(key_path)), fsync=True)
    return d / SIGNATURE


@dataclass(frozen=True)
class Trust:
    """The keys a box trusts and whether a signature is required.

    Default for existing setups: ``required`` follows the keys: a box with trusted keys refuses unsigned models, a
    box without keys (a development box, the test fixtures) serves unsigned ones and says so in /healthz.
    """

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    required: bool = False

    @classmethod
    def load(cls, paths: list[str | Path], require: bool | None = None) -> Trust:
        keys = {key_id(k): k for k in (load_public_key(p) for p in paths)}
        required = bool(keys) if require is None else require
        if required and not keys:
            raise SensituneError("trust.require_signature is true but trust.public_keys is empty: list the "
                                 "publisher's .pub file(s), or set require_signature: false on a dev box")  # fmt: skip
        return cls(keys, required)

    @classmethod
    def from_env(cls) -> Trust:
        """``$SENSITUNE_TRUSTED_KEYS`` (paths, ``os.pathsep``-separated) for a service started without a box."""
        paths = [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
        return cls.load(paths)

    def describe(self) -> dict[str, object]:
        return {"trusted_keys": sorted(self.keys), "require_signature": self.required}

    def check(self, where: Path, manifest_bytes: bytes, signature_bytes: bytes | None) -> str:
        """Verify ``signature_bytes`` over ``manifest_bytes``; returns what /healthz says about it.

        Raises:
            SignatureError: Unsigned while required, malformed, signed by a key not trusted, or not matching.
        """
        if signature_bytes is None:
            if self.required:
                raise SignatureError(f"{where}: unsigned ({SIGNATURE} missing) and this box requires a signature; "
                                     "publish it with a signing key (deploy/README.md, Signed models)")  # fmt: skip
            return "unsigned (no signature required)"
        try:
            sig = json.loads(signature_bytes)
            kid, raw = str(sig["key_id"]), base64.b64decode(sig["signature"], validate=True)
            if sig.get("alg") != ALG:
                raise ValueError(f"alg={sig.get('alg')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise SignatureError(f"{where / SIGNATURE}: malformed ({one_line(e)}); re-sign the artifact") from None
        if kid not in self.keys:
            if not self.required and not self.keys:
                return f"signed by {kid} (not checked: no trusted keys)"
            raise SignatureError(f"{where}: signed by key {kid}, which this box does not trust; add its .pub to "
                                 "trust.public_keys or re-sign with a trusted key")  # fmt: skip
        try:
            self.keys[kid].verify(raw, manifest_bytes)
        except InvalidSignature:
            raise SignatureError(f"{where}: bad signature: {MANIFEST} is not what key {kid} signed; the artifact was "
                                 "changed after signing, re-publish it") from None  # fmt: skip
        return f"signed by {kid}"


def keygen(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``<out>.key`` (private, 0600; never into the registry) and ``<out>.pub``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    out.parent.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out.with_suffix(".key"), out.with_suffix(".pub")
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return priv_path, pub_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.edge.signing", description="Ed25519 model signatures.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keygen", help="a new key pair").add_argument("--out", type=Path, required=True)
    s = sub.add_parser("sign", help="sign a sealed artifact dir")
    s.add_argument("artifact", type=Path)
    s.add_argument("--key", type=Path, default=os.environ.get(KEY_ENV), help=f"private key (default ${KEY_ENV})")
    v = sub.add_parser("verify", help="check an artifact dir's signature")
    v.add_argument("artifact", type=Path)
    v.add_argument("--trust", type=Path, action="append", required=True, help="a trusted .pub (repeat to rotate)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "keygen":
            print(*keygen(a.out))
        elif a.cmd == "sign":
            if a.key is None:
                raise SensituneError(f"give --key PATH or set ${KEY_ENV}")
            print(sign_artifact(a.artifact, a.key))
        else:
            sig = a.artifact / SIGNATURE
            signed = sig.read_bytes() if sig.is_file() else None
            print(Trust.load(a.trust, require=True).check(a.artifact, (a.artifact / MANIFEST).read_bytes(), signed))
        return 0
    except (SensituneError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
