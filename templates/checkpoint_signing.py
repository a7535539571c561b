"""Signed completion markers: a checkpoint proves that your job wrote it.

The sha256 in a marker catches accidents (a cut-short file, flipped bits), not people:
whoever can write into the checkpoint folder can change a file and write a matching
marker. With a key that you keep outside that folder, each marker also carries an HMAC of
its contents (the file's sha256 and size, the step, ...), and the resume refuses, as
unsafe, a checkpoint whose marker it cannot verify: a file planted or swapped by anyone
without the key is skipped, and the run resumes from the newest checkpoint you wrote.

Make a key once, readable by you only, and name it in the batch script::

    head -c 32 /dev/urandom > ~/.checkpoint-key && chmod 600 ~/.checkpoint-key
    export CHECKPOINT_KEY_FILE=~/.checkpoint-key

Without ``CHECKPOINT_KEY_FILE`` nothing is signed and nothing is checked (the templates
say so once). Checkpoints saved before the key was set are refused once it is: set it
before the first save of a run. Optional: copy this file beside the templates to use it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from checkpoint_utils import CheckpointError, CheckpointInfo, UnsafeCheckpointError, marker_path

KEY_FILE_VARIABLE = "CHECKPOINT_KEY_FILE"


class SigningKeyError(CheckpointError):
    """The key file named by CHECKPOINT_KEY_FILE cannot be used; the message says why."""


def load_signing_key(environ: dict | None = None) -> bytes | None:
    """The key from the file ``$CHECKPOINT_KEY_FILE`` names, or None when it is not set.
    Raises ``SigningKeyError`` when the file is missing, readable by others, or short."""
    path = (os.environ if environ is None else environ).get(KEY_FILE_VARIABLE)
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
        key = Path(path).read_bytes()
    except OSError as error:
        raise SigningKeyError(f"{KEY_FILE_VARIABLE}={path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(f"{KEY_FILE_VARIABLE}={path} can be read by others: a key "
                              f"they can read signs their checkpoints too (chmod 600 {path})")
    if len(key) < 16:
        raise SigningKeyError(f"{KEY_FILE_VARIABLE}={path} holds {len(key)} bytes; make a "
                              "key of 32 random bytes: head -c 32 /dev/urandom > FILE")
    return key


def marker_signature(marker: dict, key: bytes) -> str:
    """The HMAC-SHA256 of a marker's contents (every field but the signature)."""
    fields = {name: value for name, value in marker.items() if name != "signature"}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def check_marker_signature(marker_file: Path, key: bytes, name: str) -> None:
    """``UnsafeCheckpointError`` unless the marker in ``marker_file`` is signed with
    ``key``."""
    marker = json.loads(Path(marker_file).read_text())
    given = marker.get("signature")
    if not isinstance(given, str):
        raise UnsafeCheckpointError(f"{name}: unsafe, refused: its marker is not signed, and "
                                    "this job signs its checkpoints (not written by it)")
    if not hmac.compare_digest(given, marker_signature(marker, key)):
        raise UnsafeCheckpointError(f"{name}: unsafe, refused: its marker's signature does not "
                                    "match (written or changed by someone without the key)")


class SigningMixin:
    """Put before a manager class: its markers are signed with ``signing_key`` and, at the
    resume, a checkpoint whose marker does not verify is skipped as unsafe."""

    signing_key: bytes
    # A signature vouches for the checksums in the marker, so they must be ones nobody can
    # match with other bytes: sha256, never checkpoint_fast's default CRC32 per chunk.
    chunk_checksum = "sha256"

    def _marker(self, meta: dict) -> dict:
        marker = super()._marker(meta)
        return {**marker, "signature": marker_signature(marker, self.signing_key)}

    def _load_verified(self, info: CheckpointInfo) -> dict:
        check_marker_signature(marker_path(info.path), self.signing_key, info.name)
        if info.chunks and info.chunks[0] != "sha256":
            raise UnsafeCheckpointError(f"{info.name}: unsafe, refused: its marker is signed "
                                        f"but its {info.chunks[0]} checksums can be forged")
        return super()._load_verified(info)


def signing(manager_class: type, key: bytes) -> type:
    """``manager_class`` (CheckpointManager, FastCheckpointManager) signing with ``key``:
    ``signing(CheckpointManager, key)("checkpoints", keep=3)``."""
    return type(f"Signing{manager_class.__name__}", (SigningMixin, manager_class),
                {"signing_key": key})
