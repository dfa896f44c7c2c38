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
* Links: the output folder itself may be a link (the user named it); nothing below it is written,
  appended to or deleted through a link (:mod:`layerflow.io.links`). A linked lock file, ``logs``
  folder or log file stops the run before anything is written; a linked marker or sample folder is
  not LayerFlow's.
* A disk with less than :data:`layerflow.io.atomic.MIN_FREE` free stops the run before any model
  loads (one line with the space needed); one that fills later stops it at the sample being written.
* Inside a sample folder of ours only the files LayerFlow writes (:func:`written_by_layerflow`) are
  ever deleted: redoing an unfinished sample or cleaning a leftover keeps anything else found there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from layerflow.io import links
from layerflow.io.atomic import (
    MIN_FREE,
    TEMPORARY_NAME,
    DiskFullError,
    OwnedFolder,
    bytes_under,
    disk_full,
    free_bytes,
    is_disk_full,
    remove_owned,
    temporary_of,
)
from layerflow.io.sample_files import (
    ALPHA_EXPORTS,
    CONTACT_SHEET_FILE,
    META_FILE,
    PREVIEW_FILE,
    SCORES_FILE,
    VIDEO_NAMES,
)
from layerflow.io.writer import ALPHA_CODECS

SAMPLE_MARKER = ".layerflow-sample"
LOCK_FILE = ".layerflow.lock"
LOGS_DIR = "logs"
FAILURES_FILE = "failures.jsonl"
RUN_FILES = (LOGS_DIR, FAILURES_FILE)
WHERE = "--output"  # what the user changes to avoid a path in the way (named in messages)
_LOG_FILE = re.compile(r"^(rank\d+\.log|failures\.rank\d+\.jsonl)$")  # what the runs write into logs/
_FRAME_FILE = re.compile(r"^\d{4}\.png$")
_MARKER_MAX_BYTES = 4096

log = logging.getLogger("layerflow")


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


def _is_marker(path: Path) -> bool:
    """A plain file (not a link) holding the record :func:`write_marker` writes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        data = handle.read(_MARKER_MAX_BYTES)
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("tool") == "layerflow"


def _mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def is_ours(path: Path) -> bool:
    """True when ``path`` is a real folder (not a link) holding the LayerFlow sample marker (not a link either)."""
    return stat.S_ISDIR(_mode(path)) and _is_marker(path / SAMPLE_MARKER)


def is_complete(path: Path) -> bool:
    """A finished sample folder of ours: the marker and ``meta.json`` (written last), both plain files."""
    return is_ours(path) and stat.S_ISREG(_mode(path / META_FILE))


def _sample_names() -> tuple[frozenset[str], frozenset[str]]:
    """Every file and frame folder name LayerFlow may write into a sample folder, whatever the config."""
    files = {SAMPLE_MARKER, META_FILE, SCORES_FILE, PREVIEW_FILE, CONTACT_SHEET_FILE}
    for video in VIDEO_NAMES.values():
        files |= {f"{video}.mp4", f"given_{video}.mp4"}
    for export in ALPHA_EXPORTS.values():
        files |= {export.video_stem + codec.suffix for codec in ALPHA_CODECS.values()}
    return frozenset(files), frozenset(export.png_folder for export in ALPHA_EXPORTS.values())


SAMPLE_FILES, FRAME_FOLDERS = _sample_names()


def written_by_layerflow(path: Path) -> bool:
    """An entry of a sample folder that LayerFlow writes there (or a temporary of one), of the right kind.

    Files must be plain files and frame folders real folders of ``NNNN.png`` plain files: a link, or
    anything else someone put there, is not LayerFlow's.
    """
    name = temporary_of(path.name) or path.name
    mode = _mode(path)
    if stat.S_ISREG(mode):
        return name in SAMPLE_FILES
    if stat.S_ISDIR(mode) and name in FRAME_FOLDERS:
        return all(entry.is_file(follow_symlinks=False) and _FRAME_FILE.match(entry.name) for entry in os.scandir(path))
    return False


SAMPLE_FOLDER = OwnedFolder(is_ours=is_ours, owns=written_by_layerflow, finished_by=META_FILE)


def _in_the_way(folder: Path) -> list[str]:
    """Entries of an unfinished sample folder of ours that bear a name LayerFlow writes but are not its own."""
    names = SAMPLE_FILES | FRAME_FOLDERS
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if (temporary_of(entry.name) or entry.name) in names and not written_by_layerflow(Path(entry.path))
    )


def check_sample_target(path: Path) -> None:
    """Raise :class:`ForeignPathError` when ``path`` exists (even as a broken link) and is not ours, or
    is an unfinished folder of ours where something LayerFlow did not write takes a name it needs."""
    if not os.path.lexists(path):
        return
    if not is_ours(path):
        kind = "link" if path.is_symlink() else "folder" if path.is_dir() else "file"
        raise ForeignPathError(
            f"{path}: a {kind} that LayerFlow did not make is in the way of this sample "
            f"(no {SAMPLE_MARKER} marker); it is left untouched: move it away or choose "
            f"another --output"
        )
    blocking = [] if is_complete(path) else _in_the_way(path)
    if blocking:
        one = len(blocking) == 1
        raise ForeignPathError(
            f"{path}: {', '.join(blocking)} in this unfinished sample folder {'is' if one else 'are'} not "
            f"LayerFlow's (a link or another kind of file) and in the way of the new files; left untouched: "
            f"move {'it' if one else 'them'} away"
        )


def largest_sample_bytes(output: Path, ids: Iterable[str]) -> int:
    """The size of the largest complete sample folder among ``ids`` in ``output`` (0 when none is complete)."""
    return max((bytes_under(output / i) for i in ids if is_complete(output / i)), default=0)


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
    if probe == path and not os.path.lexists(path / LOCK_FILE):
        for name in RUN_FILES:
            if os.path.lexists(path / name):
                raise OutputFolderError(
                    f"--output {path}: it already holds '{name}', which LayerFlow did not "
                    f"make (no {LOCK_FILE}); choose another folder or move '{name}' away"
                )


def _is_log_file(path: Path) -> bool:
    """A plain file the runs write into ``logs/`` (a rank log, a rank's failures, or a temporary of one)."""
    return bool(_LOG_FILE.match(temporary_of(path.name) or path.name)) and stat.S_ISREG(_mode(path))


@dataclass
class OutputFolder:
    """A locked output folder for one run (used by one process, rank 0, while the run lasts)."""

    path: Path
    created: bool = False
    created_logs: bool = False
    _lock: int | None = None  # the descriptor of the lock file, held for the run
    _found: frozenset[str] = frozenset()  # the names in the folder when the lock was taken

    def acquire(self) -> OutputFolder:
        """Create the folder if needed and take its lock; :class:`OutputFolderError` when another run
        holds it, or when a link or a full disk is in the way (the lock file, ``logs``)."""
        check_output_path(self.path)
        self.created = not self.path.exists()
        try:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                if is_disk_full(error):
                    raise disk_full(self.path, 0) from error
                raise OutputFolderError(f"--output {self.path}: cannot create it ({error.strerror})") from None
            self._lock = self._open_lock()
            self._take_lock()
            self._write_holder()
            self._check_run_files()
            if free_bytes(self.path) < MIN_FREE:  # completely full: stop before any model loads
                raise disk_full(self.path, 0)
        except (links.LinkInTheWayError, DiskFullError) as error:
            self.release()
            raise OutputFolderError(str(error)) from None
        self.created_logs = not os.path.lexists(self.path / LOGS_DIR)
        self._found = frozenset(os.listdir(self.path))
        return self

    def _open_lock(self) -> int:
        """The lock file: made new (``O_EXCL``) or an existing plain file; never a link."""
        with links.folder(self.path, where=WHERE) as root:
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                return os.open(LOCK_FILE, flags, 0o644, dir_fd=root)
            except FileExistsError:
                pass
            except OSError as error:
                if is_disk_full(error):
                    raise disk_full(self.path, 0) from error
                raise OutputFolderError(f"--output {self.path}: cannot create {LOCK_FILE} ({error.strerror})") from None
            try:
                return links.open_file(root, LOCK_FILE, os.O_RDWR, self.path / LOCK_FILE, WHERE)
            except links.LinkInTheWayError:
                raise
            except OSError as error:
                raise OutputFolderError(f"--output {self.path}: cannot open {LOCK_FILE} ({error.strerror})") from None

    def _take_lock(self) -> None:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(self._lock, 512, 0).decode("utf-8", errors="replace").strip() or "another process"
            self.release()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(
                    f"--output {self.path}: in use by another run ({holder}); wait for it to "
                    f"finish or choose another folder"
                ) from None
            raise OutputFolderError(f"--output {self.path}: cannot lock {LOCK_FILE} ({error.strerror})") from None

    def _write_holder(self) -> None:
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        try:
            os.ftruncate(self._lock, 0)
            os.pwrite(self._lock, text.encode("utf-8"), 0)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(self.path, 0, len(text)) from error
            raise

    def _check_run_files(self) -> None:
        """The run's own files, where present, are what LayerFlow writes: a real ``logs`` folder of plain files."""
        logs, failures = self.path / LOGS_DIR, self.path / FAILURES_FILE
        if os.path.lexists(failures) and not stat.S_ISREG(_mode(failures)):
            raise links.refusal(failures, "file", WHERE)
        if not os.path.lexists(logs):
            return
        with links.folder(self.path, LOGS_DIR, where=WHERE) as folder:
            for entry in os.scandir(folder):
                if not _LOG_FILE.match(entry.name):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    raise links.refusal(logs / entry.name, "file", WHERE)
                if entry.name.endswith(".log") and entry.stat(follow_symlinks=False).st_nlink > 1:
                    raise links.hard_link_refusal(logs / entry.name, WHERE)  # every rank appends to its log

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the file drops the lock
            self._lock = None

    def discard_created(self) -> None:
        """After a run that stopped before any sample: remove what this run created, nothing else.

        A run that did write a sample (then stopped, say on a full disk) keeps its logs."""
        self.release()
        if set(os.listdir(self.path)) - self._found - {LOCK_FILE, LOGS_DIR}:
            return
        logs = self.path / LOGS_DIR
        if self.created_logs and stat.S_ISDIR(_mode(logs)):
            remove_owned(logs, _is_log_file)
        lock = self.path / LOCK_FILE
        if self.created and stat.S_ISDIR(_mode(self.path)) and os.listdir(self.path) == [LOCK_FILE]:
            if stat.S_ISREG(_mode(lock)):
                lock.unlink()
                self.path.rmdir()

    def clean_stale(self) -> list[str]:
        """Remove (or put back) what killed runs left behind; returns the names handled.

        Only LayerFlow's own leftovers go, and never through a link: a leftover sample folder loses
        the files LayerFlow writes, and is kept (with a warning) if anything else is in it.
        """
        handled = []
        for entry in os.scandir(self.path):
            match = TEMPORARY_NAME.match(entry.name)
            if match is None or entry.is_symlink():
                continue
            path, original = Path(entry.path), temporary_of(entry.name)
            if entry.is_dir(follow_symlinks=False):
                if not is_ours(path):
                    continue
                if match["tag"] == "old" and not os.path.lexists(self.path / original) and is_complete(path):
                    os.replace(path, self.path / original)
                else:
                    kept = remove_owned(path, written_by_layerflow)
                    if kept:
                        log.warning(
                            "%s: left by an interrupted run, it holds files LayerFlow did not write (%s); kept",
                            path,
                            ", ".join(kept),
                        )
                        continue
                handled.append(entry.name)
            elif entry.is_file(follow_symlinks=False) and original in RUN_FILES:
                path.unlink()  # a temporary copy of one of the run's own files
                handled.append(entry.name)
        if os.path.lexists(self.path / LOGS_DIR):
            with links.folder(self.path, LOGS_DIR, where=WHERE) as logs:
                for entry in os.scandir(logs):
                    original = temporary_of(entry.name)
                    if original and _LOG_FILE.match(original) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.name, dir_fd=logs)
                        handled.append(f"{LOGS_DIR}/{entry.name}")
        return handled
