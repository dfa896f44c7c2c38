"""All-or-nothing writes of files and folders.

Every output is first written under a hidden temporary name in its final folder and renamed
into place only when the writer finished without error, so a reader never sees a half-written
video, PNG sequence, checkpoint or ``meta.json``. On error the temporary file or folder is
removed and any earlier output at the target path is left untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class NotWritableError(OSError):
    """The folder that should receive an output cannot be created or written to."""


class TargetInTheWayError(OSError):
    """An existing path at the target that the caller did not allow to be replaced."""


def _temporary_sibling(target: Path, tag: str) -> Path:
    """A hidden, unique name next to ``target`` that keeps its suffix (ffmpeg picks the container by it)."""
    return target.parent / f".{target.stem}.{tag}-{uuid.uuid4().hex[:8]}{target.suffix}"


def _check_folder_writable(target: Path) -> None:
    """Create the parent folder if needed and prove it writable by creating and deleting a probe file."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotWritableError(f"cannot write {target}: folder {folder} cannot be created ({err.strerror})") from err
    probe = _temporary_sibling(target, "probe")
    try:
        probe.touch(exist_ok=False)
    except OSError as err:
        raise NotWritableError(f"cannot write {target}: folder {folder} is not writable ({err.strerror})") from err
    probe.unlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _move_into_place(temporary: Path, target: Path, may_replace: Callable[[Path], bool] | None = None) -> None:
    """Rename a finished file or folder onto ``target``; a folder replaces the old one only once complete.

    With ``may_replace``, an existing ``target`` is replaced only when ``may_replace(target)`` is
    true; otherwise :class:`TargetInTheWayError` is raised and the target is left as it is.
    """
    if may_replace is not None and os.path.lexists(target) and not may_replace(target):
        raise TargetInTheWayError(f"{target}: exists and may not be replaced; left untouched")
    if temporary.is_file():
        _fsync_file(temporary)
        os.replace(temporary, target)
        return
    if not temporary.is_dir():
        raise FileNotFoundError(f"the writer for {target} left nothing at {temporary}")
    if not target.exists():
        os.replace(temporary, target)
        return
    previous = _temporary_sibling(target, "old")
    os.replace(target, previous)
    try:
        os.replace(temporary, target)
    except BaseException:
        os.replace(previous, target)
        raise
    _remove(previous)


@contextmanager
def atomic_path(path: str | os.PathLike, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a free temporary path beside ``path``; move what was written there onto ``path`` on success.

    The writer may create a file or a folder at the yielded path. The parent folder is created
    if missing and checked first, so an unwritable destination fails at once with
    :class:`NotWritableError`. If the block raises, whatever it wrote is deleted and the
    exception propagates. ``may_replace`` guards an existing target (see :func:`_move_into_place`).
    """
    target = Path(path)
    _check_folder_writable(target)
    temporary = _temporary_sibling(target, "tmp")
    try:
        yield temporary
        _move_into_place(temporary, target, may_replace)
    except BaseException:
        _remove(temporary)
        raise


@contextmanager
def atomic_directory(
    path: str | os.PathLike,
    may_replace: Callable[[Path], bool] | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: yields the temporary folder already created.

    ``prepare(folder)`` runs right after the folder is made, before the caller writes anything
    (e.g. to mark the folder as its own, so that a leftover can be recognised later).
    """
    with atomic_path(path, may_replace) as temporary:
        temporary.mkdir()
        if prepare is not None:
            prepare(temporary)
        yield temporary


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once; returns the path."""
    target = Path(path)
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return target
