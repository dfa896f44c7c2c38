"""The output folder of a run: what in it belongs to LayerFlow, a lock per folder, and stale leftovers.

The tool only ever creates, replaces or deletes what it can prove it made:

* Every sample folder carries a marker file (:data:`SAMPLE_MARKER`), written first into the
  temporary folder, before anything else. ``OUTPUT/<id>`` is *complete* when it holds the marker
  and ``meta.json``; an existing path without the marker (a user's file, folder or link that
  happens to share a sample's name) is *foreign*: that sample fails with one line and the path is
  left exactly as it was.
* The run's own files (``logs/``, ``failures.jsonl``) are reserved names, refused as sample ids.
  In a folder that LayerFlow did not create (no lock file yet), existing paths of those names are
  refused before anything is written.
* One run at a time per output folder: the first takes an exclusive lock on :data:`LOCK_FILE`
  (an OS lock, released by the kernel when the process ends, even after ``kill -9``); a second
  run stops at once with a one-line error naming the holder. It does not wait: a queue of
  silent waiters on a cluster is harder to understand than a clear refusal.
* Leftovers of killed runs (hidden ``.<name>.tmp-<8 hex digits>`` folders holding the marker, and
  temporary copies of the run's own files) are removed by the next run once it holds the lock. A
  ``.<id>.old-<8 hex digits>`` folder (a run killed while swapping a finished sample in) is put back when
  the sample itself is missing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from layerflow.io.sample_files import META_FILE

SAMPLE_MARKER = ".layerflow-sample"
LOCK_FILE = ".layerflow.lock"
LOGS_DIR = "logs"
FAILURES_FILE = "failures.jsonl"
RUN_FILES = (LOGS_DIR, FAILURES_FILE)

# Hidden temporary siblings written by layerflow.io.atomic: ".<stem>.<tag>-<8 hex><suffix>".
_TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.(?P<tag>tmp|old|probe)-[0-9a-f]{8}(?P<suffix>.*)$")


class OutputFolderError(OSError):
    """The output folder cannot be used (not a folder, not writable, busy, foreign run files)."""


class ForeignPathError(OutputFolderError):
    """A path where a sample folder should go exists and was not made by LayerFlow."""


def write_marker(folder: Path, sample_id: str) -> None:
    """Mark ``folder`` (a fresh temporary sample folder) as made by LayerFlow for ``sample_id``.

    The content is fixed by the id alone, so that identical runs give byte-identical folders.
    """
    record = {"tool": "layerflow", "id": sample_id}
    (folder / SAMPLE_MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def is_ours(path: Path) -> bool:
    """True when ``path`` is a real folder (not a link) that holds the LayerFlow sample marker."""
    return path.is_dir() and not path.is_symlink() and (path / SAMPLE_MARKER).is_file()


def is_complete(path: Path) -> bool:
    """A finished sample folder of ours: the marker and ``meta.json`` (written last)."""
    return is_ours(path) and (path / META_FILE).is_file()


def check_sample_target(path: Path) -> None:
    """Raise :class:`ForeignPathError` when ``path`` exists (even as a broken link) and is not ours."""
    if os.path.lexists(path) and not is_ours(path):
        kind = "link" if path.is_symlink() else "folder" if path.is_dir() else "file"
        raise ForeignPathError(
            f"{path}: a {kind} that LayerFlow did not make is in the way of this sample "
            f"(no {SAMPLE_MARKER} marker); it is left untouched: move it away or choose "
            f"another --output"
        )


def check_output_path(path: Path) -> None:
    """Before any model loads: ``path`` is a folder or can be created as one, and is writable."""
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise OutputFolderError(f"--output {path}: exists and is not a folder; give a folder path")
    if probe != path and not probe.is_dir():
        raise OutputFolderError(f"--output {path}: {probe} is a file, so the folder cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--output {path}: {probe} is not writable (permission denied)")
    if probe == path and not (path / LOCK_FILE).exists():
        for name in RUN_FILES:
            if os.path.lexists(path / name):
                raise OutputFolderError(
                    f"--output {path}: it already holds '{name}', which LayerFlow did not "
                    f"make (no {LOCK_FILE}); choose another folder or move '{name}' away"
                )


@dataclass
class OutputFolder:
    """A locked output folder for one run (used by one process, rank 0, while the run lasts)."""

    path: Path
    created: bool = False
    created_logs: bool = False
    _lock: object | None = field(default=None, repr=False)

    def acquire(self) -> OutputFolder:
        """Create the folder if needed and take its lock; :class:`OutputFolderError` when another run holds it."""
        check_output_path(self.path)
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
        except OSError as error:
            raise OutputFolderError(f"--output {self.path}: cannot create it ({error.strerror})") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(
                    f"--output {self.path}: in use by another run ({holder}); wait for it to "
                    f"finish or choose another folder"
                ) from None
            raise OutputFolderError(f"--output {self.path}: cannot lock {LOCK_FILE} ({error.strerror})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle
        self.created_logs = not (self.path / LOGS_DIR).exists()
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def discard_created(self) -> None:
        """After a run that stopped before any sample: remove what this run created, nothing else."""
        self.release()
        if self.created:
            leftovers = {p.name for p in self.path.iterdir()} - {LOCK_FILE, LOGS_DIR}
            if not leftovers:
                shutil.rmtree(self.path, ignore_errors=True)
                return
        if self.created_logs:
            shutil.rmtree(self.path / LOGS_DIR, ignore_errors=True)

    def clean_stale(self) -> list[str]:
        """Remove (or put back) what killed runs left behind; returns the names handled."""
        handled = []
        for folder in (self.path, self.path / LOGS_DIR):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _TEMPORARY.match(entry.name)
                if match is None or entry.is_symlink():
                    continue
                target = folder / f"{match['stem']}{match['suffix']}"
                if entry.is_dir():
                    if not is_ours(entry):
                        continue
                    if match["tag"] == "old" and not os.path.lexists(target) and is_complete(entry):
                        os.replace(entry, target)
                    else:
                        shutil.rmtree(entry, ignore_errors=True)
                    handled.append(entry.name)
                elif folder != self.path or target.name in RUN_FILES:
                    entry.unlink(missing_ok=True)  # a temporary copy of one of the run's own files
                    handled.append(entry.name)
        return handled
