"""Signed completion markers (templates/checkpoint_signing.py): with a key kept outside the
checkpoint folder, a checkpoint that someone without the key planted, swapped or changed,
its sha256 and size rewritten to match, is skipped as unsafe, and the run resumes from the
newest checkpoint the job itself wrote. Every manager tier signs: the core one, the fast
one, the staged one, and the sharded checkpoints of FSDP (tests/test_fsdp_dcp.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint_signing as signing
import checkpoint_utils as cu
from checkpoint_fast import FastCheckpointManager
from checkpoint_staging import StagedCheckpointManager
from conftest import outside_slurm
from slurm_cluster import user_project

KEY = b"k" * 32


def state(step: int) -> dict:
    return {"step": step, "weights": torch.full((4,), float(step))}


def key_file(folder: Path, mode: int = 0o600, key: bytes = KEY) -> Path:
    path = folder / "key"
    path.write_bytes(key)
    path.chmod(mode)
    return path


def rewrite_like_an_intruder(checkpoint: Path, new_state: dict) -> None:
    """Replace a checkpoint's bytes and rewrite its marker's checksums (the sha256, or
    the chunks of checkpoint_fast) and size to match, keeping every other field, the
    signature included: all one can do without the key."""
    torch.save(new_state, checkpoint)
    data = checkpoint.read_bytes()
    marker = json.loads(cu.marker_path(checkpoint).read_text())
    marker.update(size=len(data))
    if "chunks" in marker:
        chunks = marker["chunks"]
        chunks["digests"] = [cu.CHUNK_CHECKSUMS[chunks["checksum"]](data[i:i + chunks["bytes"]])
                             for i in range(0, len(data), chunks["bytes"])]
    else:
        marker.update(sha256=hashlib.sha256(data).hexdigest())
    cu.marker_path(checkpoint).write_text(json.dumps(marker))


def skipped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped unsafe" in r.getMessage()]


@pytest.mark.parametrize("manager_class", [cu.CheckpointManager, FastCheckpointManager],
                         ids=lambda c: c.__name__)
def test_signed_markers_refuse_a_rewritten_checkpoint(manager_class, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    manager = signing.signing(manager_class, KEY)(folder, keep=5)
    for step in (100, 200):
        manager.save(state(step), step=step, epoch=0)
    marker = json.loads(cu.marker_path(folder / "step_00000200.pt").read_text())
    assert marker["signature"] == signing.marker_signature(marker, KEY)

    rewrite_like_an_intruder(folder / "step_00000200.pt", state(999))
    # Without the key, the rewritten file passes every other check:
    shutil.copytree(folder, tmp_path / "copy", symlinks=True)
    assert manager_class(tmp_path / "copy", keep=5).load_latest()["step"] == 999
    caplog.set_level(logging.INFO, logger="checkpoint")
    resumed = signing.signing(manager_class, KEY)(folder, keep=5).load_latest()

    assert resumed["step"] == 100
    assert any("step_00000200.pt" in line and "signature does not match" in line
               for line in skipped_lines(caplog)), caplog.text


def test_a_planted_checkpoint_with_an_unsigned_marker_is_refused(tmp_path, caplog):
    folder = tmp_path / "ckpt"
    signing.signing(cu.CheckpointManager, KEY)(folder).save(state(100), step=100, epoch=0)
    cu.CheckpointManager(folder).save(state(200), step=200, epoch=0)  # no key: unsigned
    caplog.set_level(logging.INFO, logger="checkpoint")
    resumed = signing.signing(cu.CheckpointManager, KEY)(folder).load_latest()
    assert resumed["step"] == 100
    assert any("step_00000200.pt" in line and "not signed" in line
               for line in skipped_lines(caplog)), caplog.text


def test_a_marker_signed_with_another_key_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    signing.signing(cu.CheckpointManager, KEY)(folder).save(state(100), step=100, epoch=0)
    signing.signing(cu.CheckpointManager, b"x" * 32)(folder).save(state(200), step=200, epoch=0)
    resumed = signing.signing(cu.CheckpointManager, KEY)(folder).load_latest()
    assert resumed["step"] == 100


def test_the_staged_manager_signs_both_folders_and_the_copy_keeps_the_signature(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "local"
    manager = StagedCheckpointManager(shared, local, keep=3,
                                      manager_class=signing.signing(cu.CheckpointManager, KEY))
    manager.save(state(100), step=100, epoch=0)
    manager.wait_until_durable()
    manager.close()
    marker = json.loads(cu.marker_path(shared / "step_00000100.pt").read_text())
    assert marker["signature"] == signing.marker_signature(marker, KEY)
    rewrite_like_an_intruder(shared / "step_00000100.pt", state(999))
    again = StagedCheckpointManager(shared, tmp_path / "local2", keep=3,
                                    manager_class=signing.signing(cu.CheckpointManager, KEY))
    assert again.load_latest() is None
    again.close()


@pytest.mark.parametrize("mode, key, says", [
    (0o644, KEY, "can be read by others"),
    (0o600, b"short", "holds 5 bytes"),
])
def test_a_key_file_that_cannot_be_used_is_refused_saying_why(tmp_path, mode, key, says):
    path = key_file(tmp_path, mode, key)
    with pytest.raises(signing.SigningKeyError, match=says):
        signing.load_signing_key({signing.KEY_FILE_VARIABLE: str(path)})
    assert signing.load_signing_key({}) is None


SIGNING_PROJECT = ("train_with_checkpoint.py", "checkpoint_utils.py", "checkpoint_signing.py")


def run_template(folder: Path, *args: str, key: Path | None) -> subprocess.CompletedProcess:
    env = outside_slurm()
    env.pop(signing.KEY_FILE_VARIABLE, None)
    if key is not None:
        env[signing.KEY_FILE_VARIABLE] = str(key)
    return subprocess.run([sys.executable, "train_with_checkpoint.py", "--ckpt-dir", "ckpt",
                           "--log-every", "10", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_template_signs_with_the_key_and_skips_a_forgery(tmp_path):
    key = key_file(tmp_path)
    project = user_project(tmp_path, *SIGNING_PROJECT)
    args = ("--steps", "60", "--save-every-steps", "20")
    first = run_template(project, *args, key=key)
    assert first.returncode == 0, first.stderr
    newest = project / "ckpt" / "step_00000060.pt"
    assert "signature" in json.loads(cu.marker_path(newest).read_text())
    rewrite_like_an_intruder(newest, torch.load(newest, weights_only=True))
    second = run_template(project, *args, key=key)
    assert second.returncode == 0, second.stderr
    output = second.stdout + second.stderr
    assert "skipped unsafe checkpoint: step_00000060.pt" in output, output
    assert "resumed from step_00000040.pt" in output, output


def test_the_template_says_markers_are_unsigned_and_refuses_a_key_without_the_module(tmp_path):
    project = user_project(tmp_path, *SIGNING_PROJECT)
    plain = run_template(project, "--steps", "10", key=None)
    assert plain.returncode == 0, plain.stderr
    assert "checkpoint markers are not signed" in plain.stdout + plain.stderr
    bad = run_template(project, "--steps", "10", key=key_file(tmp_path, 0o644))
    assert bad.returncode != 0 and "can be read by others" in bad.stderr
    os.remove(project / "checkpoint_signing.py")
    keyed = run_template(project, "--steps", "10", key=key_file(tmp_path))
    assert keyed.returncode != 0
    assert "copy checkpoint_signing.py" in keyed.stderr
    assert "Traceback" not in keyed.stderr + bad.stderr


def test_a_signed_fast_marker_pins_its_bytes_with_sha256_and_a_crc32_one_is_refused(
        tmp_path, caplog):
    """CRC32 catches torn bytes, not forged ones: a signature vouches for the checksums,
    so signed markers get sha256 per chunk, and a signed marker with CRC32s is refused."""
    manager = signing.signing(FastCheckpointManager, KEY)(tmp_path, keep=5)
    for step in (100, 200):
        manager.save(state(step), step=step, epoch=0)
    marker_file = cu.marker_path(tmp_path / "step_00000200.pt")
    marker = json.loads(marker_file.read_text())
    assert marker["chunks"]["checksum"] == "sha256" and "sha256" not in marker

    data = (tmp_path / "step_00000200.pt").read_bytes()
    marker["chunks"].update(checksum="crc32", digests=[
        cu.CHUNK_CHECKSUMS["crc32"](data[i:i + marker["chunks"]["bytes"]])
        for i in range(0, len(data), marker["chunks"]["bytes"])])
    del marker["signature"]
    marker["signature"] = signing.marker_signature(marker, KEY)  # signed with the key
    marker_file.write_text(json.dumps(marker))

    assert manager.load_latest()["step"] == 100
    assert any("can be forged" in line for line in skipped_lines(caplog))
