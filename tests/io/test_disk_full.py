"""A full disk stops a run with one line naming the folder and the space needed, and nothing half-written.

Two ways to fill a disk: ``ENOSPC`` injected in-process where LayerFlow writes (always runs), and a
real, small tmpfs (needs permission to mount; skipped with the reason otherwise). After space is
freed, rerunning the same command finishes the batch.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reliability import FAST, cli, entry, manifest, one_error, tiny

import layerflow.io.atomic
import layerflow.training.checkpointing
from layerflow.io.atomic import DiskFullError, bytes_under, write_text_atomic
from layerflow.io.log_file import LogFileHandler
from layerflow.training.checkpointing import LATEST_FILE, save_checkpoint

NEEDED = re.compile(r"about ([0-9.]+) (KiB|MiB|GiB) (?:must be )?free")
UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def needed_bytes(line: str) -> float:
    match = NEEDED.search(line)
    assert match, line
    return float(match[1]) * UNITS[match[2]]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere below ``folder`` (the atomic writers' hidden names)."""
    return [str(p) for p in folder.rglob("*") if re.search(r"\.(tmp|old|probe)-[0-9a-f]{8}", p.name)]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- ENOSPC injected in-process -------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_sample_stops_the_run_in_one_line_and_a_rerun_finishes(
    tmp_path, capsys, monkeypatch
):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    real_fsync = layerflow.io.atomic._fsync_file
    written = {}

    def fill_up(path: Path) -> None:  # every finished file of a sample is synced before it is renamed
        if path.name.startswith(".blend."):
            written["bytes"] = bytes_under(path.parent)  # what the sample had written when the disk filled
            no_space()
        real_fsync(path)

    monkeypatch.setattr(layerflow.io.atomic, "_fsync_file", fill_up)
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 2
    line = one_error(lines)
    assert line.startswith(f"error: {output}: no space left on device while writing sample a")
    assert "rerun the same command to resume" in line
    assert needed_bytes(line) >= written["bytes"] > 0
    assert not leftovers(output) and not (output / "a").exists()
    monkeypatch.setattr(layerflow.io.atomic, "_fsync_file", real_fsync)  # space was freed
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 0, lines
    assert (output / "a" / "meta.json").is_file() and not leftovers(output)


def test_a_full_disk_while_writing_a_text_file_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "logs" / "failures.rank0.jsonl"
    write_text_atomic(target, "the old content\n")
    monkeypatch.setattr(layerflow.io.atomic.os, "fsync", no_space)
    with pytest.raises(DiskFullError) as caught:
        write_text_atomic(target, "x" * 5000)
    assert str(caught.value).startswith(f"{target.parent}: no space left on device; about ")
    assert needed_bytes(str(caught.value)) >= 5000
    assert target.read_text() == "the old content\n"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_a_full_disk_while_appending_to_a_log_drops_records_with_one_warning(tmp_path, capsys):
    class FullDisk:
        write = flush = close = staticmethod(no_space)

    handler = LogFileHandler(tmp_path, "logs/rank0.log", "--output")
    logger = logging.getLogger("layerflow.test_disk_full")
    logger.propagate = False  # only this handler: the package's handlers belong to earlier in-process runs
    logger.addHandler(handler)
    opened, handler.stream = handler.stream, FullDisk()
    try:
        for _ in range(3):
            logger.error("the disk is full")
        handler.close()  # the buffered records cannot be flushed either: still no traceback
    finally:
        logger.removeHandler(handler)
        opened.close()
    err = capsys.readouterr().err
    assert err.count("no space left on device; log records are dropped") == 1, err
    assert "Traceback" not in err and "Logging error" not in err


def tiny_training(width: int = 2):
    network = torch.nn.Linear(width, width)
    optimizer = torch.optim.AdamW(network.parameters())
    network(torch.ones(1, width)).sum().backward()
    optimizer.step()  # AdamW's state now holds two moments per weight
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return network, optimizer, scheduler


def test_a_full_disk_while_saving_a_checkpoint_removes_it_and_keeps_the_last_one(tmp_path, monkeypatch):
    save = tmp_path / "save"
    parts = tiny_training(64)
    save_checkpoint(save, 1, *parts, {})
    real_save = layerflow.training.checkpointing.save_torch

    def half_then_full(obj, path):
        Path(path).write_bytes(b"\0" * 1000)  # a partial file, then the disk fills
        no_space()

    monkeypatch.setattr(layerflow.training.checkpointing, "save_torch", half_then_full)
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(save, 2, *parts, {})
    message = str(caught.value)
    assert message.startswith(f"{save}: no space left on device; about ")
    weights_and_moments = 3 * sum(p.numel() * p.element_size() for p in parts[0].parameters())
    assert needed_bytes(message) >= weights_and_moments
    assert sorted(p.name for p in save.iterdir()) == ["1", LATEST_FILE] and not leftovers(save)
    assert (save / LATEST_FILE).read_text() == "1"
    monkeypatch.setattr(layerflow.training.checkpointing, "save_torch", real_save)
    save_checkpoint(save, 2, *parts, {})
    assert (save / LATEST_FILE).read_text() == "2"


# -- a real full disk: a small tmpfs ------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of a given size mounted at ``path``, resizable (to free space) while mounted."""

    def __init__(self, path: Path, kib: int):
        self.path = path
        path.mkdir()
        self._mount(f"size={kib}k")

    def _mount(self, options: str) -> None:
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip().splitlines()
            pytest.skip(f"cannot mount a small tmpfs here ({reason[-1] if reason else result.returncode})")

    def resize(self, kib: int) -> None:
        self._mount(f"remount,size={kib}k")

    def fill(self) -> None:
        """Take every free byte with a filler file (:meth:`resize` frees space again)."""
        try:
            with open(self.path / "filler", "wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
        assert shutil.disk_usage(self.path).free == 0

    def unmount(self) -> None:
        for handler in list(logging.getLogger("layerflow").handlers):  # rank logs of in-process runs
            if isinstance(handler, LogFileHandler) and self.path in handler.path.parents:
                logging.getLogger("layerflow").removeHandler(handler)
                handler.close()
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux and mount(8) to make a small tmpfs")
    disks = []

    def make(kib: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", kib))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def test_a_really_full_disk_stops_the_run_in_one_line_and_a_rerun_after_freeing_space_finishes(
    small_disk, tmp_path, capsys
):
    disk = small_disk(200)  # room for one tiny RGB sample (~120 KB) and the run's files, not for two
    output = disk.path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 2
    line = one_error(lines)
    assert line.startswith(f"error: {output}: no space left on device while writing sample b")
    assert needed_bytes(line) >= bytes_under(output / "a") > 0, "the estimate is at least a finished sample"
    assert (output / "a" / "meta.json").is_file() and not (output / "b").exists() and not leftovers(output)

    disk.fill()  # completely full now: still one line, still nothing half-written
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 2
    assert f"{output}: no space left on device" in one_error(lines)
    assert not leftovers(output)

    disk.resize(1024)
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 0, lines
    assert (output / "b" / "meta.json").is_file() and not leftovers(output)


def test_a_really_full_disk_while_saving_a_checkpoint(small_disk):
    disk = small_disk(512)
    save = disk.path / "save"
    parts = tiny_training(256)  # 256 KiB of weights, 768 KiB with AdamW's two moments: more than the disk
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(save, 1, *parts, {})
    message = str(caught.value)
    assert message.startswith(f"{save}: no space left on device; about ")
    assert needed_bytes(message) >= 3 * 256 * 256 * 4
    assert not leftovers(save) and not (save / "1").exists() and not (save / LATEST_FILE).exists()
    disk.resize(4096)
    save_checkpoint(save, 1, *parts, {})
    assert (save / LATEST_FILE).read_text() == "1"
