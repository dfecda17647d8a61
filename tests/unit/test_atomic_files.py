"""trainer/atomic_files: what a failed write says for causes other than a full disk, and which temp names the sweep
may remove (only this pack's, only when their writer is gone)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
from full_disk import full_disk

from sdxl_lora_trainer.trainer import atomic_files
from sdxl_lora_trainer.trainer.atomic_files import WriteFailed, is_stale_temp, sweep_stale_temp_files, write_atomic


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_permission_error_names_the_file_and_says_what_to_do(tmp_path, monkeypatch):
    def refuse(tmp, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(atomic_files, "write_temp", refuse)
    with pytest.raises(WriteFailed) as caught:
        write_atomic(tmp_path / "x.log.csv", b"a" * 2048)
    assert caught.value.errno == errno.EACCES
    assert str(caught.value) == (
        f"could not write x.log.csv in {tmp_path} (Permission denied; 2.0 KB to write). Fix: make that folder "
        "writable, or choose another folder."
    )


def test_a_full_disk_during_a_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.log.jsonl"
    target.write_bytes(b"old log\n")
    full_disk(monkeypatch, "run.log.jsonl")
    with pytest.raises(WriteFailed, match="the disk is full"):
        write_atomic(target, b"new log\n")
    assert target.read_bytes() == b"old log\n" and sorted(p.name for p in tmp_path.iterdir()) == ["run.log.jsonl"]


def test_only_this_packs_temp_names_of_gone_writers_are_stale(tmp_path):
    gone = dead_pid()
    names = {
        f".lora.safetensors.{gone}.0a1b.tmp": True,  # writer exited
        f".lora.safetensors.{os.getpid()}.0a1b.tmp": False,  # this process, written now
        ".lora.safetensors.tmp": False,  # not our pattern
        f"lora.safetensors.{gone}.0a1b.tmp": False,  # not hidden
        f".lora.safetensors.{gone}.xyz.tmp": False,  # not hex
        "lora.safetensors": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert {n: is_stale_temp(tmp_path / n) for n in names} == names
    old = time.time() - 3600
    reused = tmp_path / f".old.safetensors.{os.getpid()}.0a1b.tmp"  # our pid, but older than this process
    reused.write_bytes(b"x")
    os.utime(reused, (old, old))
    assert is_stale_temp(reused)


def test_the_sweep_removes_stale_files_and_staging_folders_at_the_depth_asked(tmp_path):
    gone = dead_pid()
    top = tmp_path / f".a.{gone}.ff.tmp"
    top.write_bytes(b"x")
    staging = tmp_path / "run" / f".step-000003.{gone}.ff.tmp"
    staging.mkdir(parents=True)
    (staging / "state.safetensors").write_bytes(b"x")
    deep = tmp_path / "run" / "step-000001" / f".state.json.{gone}.ff.tmp"
    deep.parent.mkdir()
    deep.write_bytes(b"x")
    assert sweep_stale_temp_files(tmp_path) == [top]
    assert staging.exists() and deep.exists()
    assert sorted(sweep_stale_temp_files(tmp_path, depth=2)) == sorted([staging, deep])
    assert sweep_stale_temp_files(tmp_path / "missing") == []
