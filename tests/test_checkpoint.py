"""Checkpoints that survive corruption: checksums verified on load, resume from the newest
intact one (saying what it skipped and why), clear errors for bad files, stale temporary files
cleaned. The training loop's own checkpoint tests are in test_train_gan.py."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastinv.errors import CheckpointError, FastinvError, MissingFileError
from fastinv.train import checkpoint


def _save(run_dir, step, **extra):
    state = {"format": checkpoint.FORMAT, "step": step, "w": torch.arange(4096.0) + step, **extra}
    return checkpoint.atomic_save(state, checkpoint.checkpoint_path(run_dir, step))


def _flip_tensor_bytes(path, n=64):
    """Flip ``n`` bytes in the middle of the file: inside w's 16 KiB of tensor data, away from
    the zip's headers and index (which torch would notice)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_writes_a_manifest_with_the_sha256_and_load_verifies_it(tmp_path):
    path = _save(tmp_path, 1)
    manifest = checkpoint.manifest_path(path)
    assert manifest.name == "step_00000001.pt.manifest.json"
    import hashlib
    import json

    m = json.loads(manifest.read_text())
    assert m["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["bytes"] == path.stat().st_size and m["file"] == path.name
    assert checkpoint.load(path)["step"] == 1


def test_flipped_bytes_in_tensor_data_are_caught_on_load(tmp_path):
    path = _save(tmp_path, 1)
    _flip_tensor_bytes(path)
    # torch itself reads this file without complaint: only the checksum catches it
    assert torch.load(path, weights_only=True)["step"] == 1
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt does not match its checksum"):
        checkpoint.load(path)


def test_resume_takes_the_newest_checkpoint_that_verifies_and_says_what_it_skipped(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    p4 = checkpoint.checkpoint_path(tmp_path, 4)
    p4.write_bytes(p4.read_bytes()[:100])  # truncated
    _flip_tensor_bytes(checkpoint.checkpoint_path(tmp_path, 3))  # bit rot
    with pytest.warns(RuntimeWarning) as record:
        found = checkpoint.latest_checkpoint(tmp_path)
    assert found == ckdir / "step_00000002.pt"
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "step_00000004.pt" in messages[0] and "manifest says" in messages[0]
    assert "step_00000003.pt" in messages[1] and "checksum" in messages[1]
    assert checkpoint.load(found)["step"] == 2


def test_a_checkpoint_without_manifest_is_loaded_and_checked_by_loading_it(tmp_path):
    """Older runs, or a kill between the checkpoint's rename and its manifest's."""
    for step in (1, 2, 3):
        _save(tmp_path, step)
    for step in (2, 3):
        checkpoint.manifest_path(checkpoint.checkpoint_path(tmp_path, step)).unlink()
    p3 = checkpoint.checkpoint_path(tmp_path, 3)
    p3.write_bytes(p3.read_bytes()[:-200])  # truncated, and no manifest to say so
    with pytest.warns(RuntimeWarning, match=r"step_00000003\.pt.*damaged"):
        assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000002.pt"
    assert checkpoint.load(checkpoint.checkpoint_path(tmp_path, 2))["step"] == 2


def test_no_intact_checkpoint_means_none_and_resolve_says_why(tmp_path):
    p = _save(tmp_path, 1)
    p.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="empty"):
        assert checkpoint.latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no intact checkpoint.*empty"):
        checkpoint.resolve(tmp_path)


def test_overwriting_a_checkpoint_drops_its_old_manifest_first(tmp_path, monkeypatch):
    """Killed after the new file's rename but before its manifest: no stale checksum left
    that would make the new, complete file look corrupt."""
    path = _save(tmp_path, 5)
    import fastinv.train.checkpoint as ck

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"format": ck.FORMAT, "step": 55}, path)
    assert not checkpoint.manifest_path(path).exists()
    assert checkpoint.load(path)["step"] == 55


@pytest.mark.parametrize(("content", "match"), [
    (b"", r"empty \(0 bytes\)"),
    (b"step: 100\nthis is a text file\n", "is a text file, not a checkpoint"),
    (bytes(range(256)) * 16, "is not a torch file, not a checkpoint"),
])
def test_bad_files_get_an_error_naming_the_file_and_what_to_do(tmp_path, content, match):
    path = tmp_path / "step_00000007.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path)
    text = str(info.value)
    assert str(path) in text
    assert "weights_only" not in text  # torch's advice to unpickle code is wrong here
    assert "delete it" in text or "pass a step_*.pt" in text
    assert isinstance(info.value, FastinvError) and isinstance(info.value, ValueError)


def test_pickled_code_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects") as info:
        checkpoint.load(path)
    assert "weights_only=False" not in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_missing_checkpoint_is_a_missing_file_error(tmp_path):
    with pytest.raises(MissingFileError, match="no checkpoint at") as info:
        checkpoint.load(tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_clean_stale_tmp_removes_only_dead_writers_temp_checkpoints(tmp_path):
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    ckdir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = [ckdir / f".step_00000010.pt.{dead_pid}.tmp",
             ckdir / f".step_00000010.pt.manifest.json.{dead_pid}.tmp"]
    keep = [ckdir / f".step_00000011.pt.{os.getppid()}.tmp",  # a live writer
            ckdir / "step_00000009.pt",
            ckdir / f".notes.txt.{dead_pid}.tmp",  # not a checkpoint's temporary file
            ckdir / f"step_00000010.pt.{dead_pid}.tmp",  # not hidden: not fastinv's pattern
            tmp_path / f".step_00000010.pt.{dead_pid}.tmp"]  # outside the checkpoint dir
    (ckdir / "sub").mkdir()
    keep.append(ckdir / "sub" / f".step_00000010.pt.{dead_pid}.tmp")  # below it
    for p in stale + keep:
        p.write_bytes(b"x")
    removed = checkpoint.clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_save_cleans_stale_tmp_of_a_killed_writer(tmp_path):
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    ckdir.mkdir(parents=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    stale = ckdir / f".step_00000001.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    _save(tmp_path, 2)
    assert not stale.exists()


def test_prune_removes_manifests_with_their_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    checkpoint.prune(tmp_path, keep=1)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step_00000003.pt", "step_00000003.pt.manifest.json"]


def test_latest_checkpoint_of_intact_checkpoints_warns_nothing(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000002.pt"


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from tests.train_tiny import tiny_dataset

    return tiny_dataset(tmp_path_factory)


def test_train_resume_skips_a_truncated_newest_checkpoint(tmp_path, synthetic_data):
    from fastinv.train.config import load_config
    from fastinv.train.gan import train_inverter

    def cfg(*over):
        return load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                                    "--ckpt_every=1", "--keep_checkpoints=5", *over])

    run_dir = train_inverter(cfg("--steps=2"))
    newest = checkpoint.checkpoint_path(run_dir, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # killed disk, say
    with pytest.warns(RuntimeWarning, match=r"skipping checkpoint .*step_00000002\.pt"):
        train_inverter(cfg("--steps=3", "--resume=true"))
    assert checkpoint.load(checkpoint.checkpoint_path(run_dir, 3))["step"] == 3
