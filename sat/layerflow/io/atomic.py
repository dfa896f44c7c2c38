"""All-or-nothing writes of files and folders.

Every output is first written under a hidden temporary name in its final folder and renamed
into place only when the writer finished without error, so a reader never sees a half-written
video, PNG sequence, checkpoint or ``meta.json``. On error the temporary file or folder is
removed and any earlier output at the target path is left untouched.

Two more rules hold for every write (see also :mod:`layerflow.io.links`):

* A symbolic link at the target is refused, never replaced or written through; with ``within``,
  no folder between that root and the target may be a link either.
* When the disk fills up (``ENOSPC``/``EDQUOT``, also reported by ffmpeg), what was written is
  removed and :class:`DiskFullError` says in one line which folder needs how much free space.

An existing folder of ours that is replaced (an unfinished sample redone, a checkpoint rewritten)
may hold files someone else put there: an :class:`OwnedFolder` tells which entries the tool wrote.
Only those are deleted; the others are kept, and one whose name the new folder needs is reported.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from layerflow.io import links

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_MARGIN = 2**20  # at least this much more than the estimate, and 10% of it
MIN_FREE = 64 * 2**10  # a run does not start with less free: not even the smallest sample would fit
# Hidden temporary siblings made below: ".<stem>.<tag>-<8 hex><suffix>".
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # never through a link
TEMPORARY_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<tag>tmp|old|probe)-[0-9a-f]{8}(?P<suffix>.*)$")


class NotWritableError(OSError):
    """The folder that should receive an output cannot be created or written to."""


class TargetInTheWayError(OSError):
    """An existing path at the target that the caller did not allow to be replaced."""


def format_bytes(count: int) -> str:
    if count < 2**20:
        return f"{count / 2**10:.0f} KiB"
    if count < 2**30:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 2**30:.2f} GiB"


def free_bytes(folder: Path) -> int:
    """Free space for this user on the disk of ``folder`` (or of its nearest existing parent).

    For root this includes the blocks a file system reserves for it, which root may fill.
    """
    folder = Path(folder)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        info = os.statvfs(folder)
    except OSError:
        return 0
    return (info.f_bfree if os.geteuid() == 0 else info.f_bavail) * info.f_frsize


class DiskFullError(OSError):
    """The disk (or quota) of ``folder`` is full; ``needed`` bytes is the estimate of what must be free there.

    Raised after the partial output was removed, so ``free`` is what the disk has again.
    """

    def __init__(self, folder: Path, written: int, needed: int, message: str | None = None):
        self.folder, self.written, self.needed = Path(folder), written, needed
        self.free = free_bytes(self.folder)
        removed = " (the partial files were removed)" if written else ""
        super().__init__(
            message
            or f"{self.folder}: no space left on device; about {format_bytes(needed)} must be free there and "
            f"{format_bytes(self.free)} is{removed}; free some space and rerun the same command to resume"
        )
        self.errno = errno.ENOSPC


def with_margin(estimate: int) -> int:
    """A free-space figure to ask for: the estimate plus 10% and at least :data:`DISK_MARGIN`."""
    return estimate + max(DISK_MARGIN, estimate // 10)


def is_disk_full(error: BaseException | None) -> bool:
    """True when ``error`` (or what caused it) says the disk or quota is full, also in ffmpeg's words."""
    texts = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in texts):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def bytes_under(path: Path) -> int:
    """The size of a file, or of every plain file below a folder (links not followed); 0 when absent."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def disk_full(folder: Path, written: int, expected: int = 0, cause: BaseException | None = None) -> DiskFullError:
    """The :class:`DiskFullError` for a write into ``folder`` that failed after ``written`` bytes.

    ``expected`` is the caller's estimate of the whole write (0: unknown); a :class:`DiskFullError`
    from a write inside it (``cause``) adds what that write had written.
    """
    if isinstance(cause, DiskFullError):
        written += cause.written
        expected = max(expected, cause.needed)
    return DiskFullError(folder, written, with_margin(max(written, expected)))


def temporary_of(name: str) -> str | None:
    """The name a hidden temporary sibling stands for (``.a.tmp-0123abcd.mp4`` -> ``a.mp4``), else None."""
    match = TEMPORARY_NAME.match(name)
    return None if match is None else f"{match['stem']}{match['suffix']}"


def _temporary_sibling(target: Path, tag: str) -> Path:
    """A hidden, unique name next to ``target`` that keeps its suffix (ffmpeg picks the container by it)."""
    return target.parent / f".{target.stem}.{tag}-{uuid.uuid4().hex[:8]}{target.suffix}"


def _check_folder_writable(target: Path, expected: int = 0) -> None:
    """Create the parent folder if needed and prove it writable by creating and deleting a probe file."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temporary_sibling(target, "probe")
        probe.touch(exist_ok=False)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(folder, 0, expected) from err
        what = "cannot be created" if not folder.is_dir() else "is not writable"
        raise NotWritableError(f"cannot write {target}: folder {folder} {what} ({err.strerror})") from err
    probe.unlink()


def _relative_parent(target: Path, within: Path) -> Path:
    return target.parent.relative_to(within) if target.parent != within else Path()


def _check_beneath(target: Path, within: Path | None, where: str) -> None:
    """No link in the way: at ``target`` itself, nor (with ``within``) at any folder below ``within``."""
    if within is not None:
        with links.folder(within, _relative_parent(target, within), create=True, where=where):
            pass
    links.refuse_link(target, where)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class OwnedFolder:
    """A kind of folder the tool writes, and how to tell its own entries from ones someone added.

    ``is_ours(folder)``: the folder was made by the tool (it may be replaced). ``owns(entry)``: an
    entry inside it was written by the tool (it may be deleted; a folder entry only when everything
    in it is the tool's too). ``finished_by``: the file written last, whose presence means complete.
    """

    is_ours: Callable[[Path], bool]
    owns: Callable[[Path], bool]
    finished_by: str


def remove_owned(folder: Path, owns: Callable[[Path], bool]) -> list[str]:
    """Delete what in ``folder`` the tool wrote, and the folder when nothing else is left in it.

    Returns the names of the entries kept (someone else's); links are never followed.
    """
    kept = []
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if not owns(path):
            kept.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path)
        else:
            path.unlink()
    if not kept:
        os.rmdir(folder)
    return sorted(kept)


def _swap_in(temporary: Path, target: Path) -> Path:
    """Rename the finished folder onto ``target``, moving the old one aside first; returns where it went."""
    previous = _temporary_sibling(target, "old")
    os.replace(target, previous)
    try:
        os.replace(temporary, target)
    except BaseException:
        os.replace(previous, target)
        raise
    return previous


def _merge_into(temporary: Path, target: Path, kind: OwnedFolder, foreign: list[str]) -> None:
    """Replace the tool's entries of ``target`` by those of ``temporary``, keeping the ``foreign`` ones.

    ``kind.finished_by`` goes first and comes back last, so the folder reads as unfinished meanwhile.
    """
    incoming = sorted(os.listdir(temporary))
    clash = sorted(set(incoming) & set(foreign))
    if clash:
        raise TargetInTheWayError(
            f"{target}: {', '.join(clash)} in it {'was' if len(clash) == 1 else 'were'} not written by LayerFlow "
            f"and {'is' if len(clash) == 1 else 'are'} in the way of the new files; left untouched (move "
            f"{'it' if len(clash) == 1 else 'them'} away and rerun)"
        )
    (target / kind.finished_by).unlink(missing_ok=True)
    for name in incoming:
        if name == kind.finished_by:
            continue
        old = target / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        os.replace(temporary / name, old)
    for name in sorted(os.listdir(target)):
        if name not in incoming and name not in foreign and kind.owns(target / name):
            _remove(target / name)
    if kind.finished_by in incoming:
        os.replace(temporary / kind.finished_by, target / kind.finished_by)
    os.rmdir(temporary)


def _move_into_place(
    temporary: Path,
    target: Path,
    may_replace: Callable[[Path], bool] | None = None,
    owned: OwnedFolder | None = None,
) -> None:
    """Rename a finished file or folder onto ``target``; a folder replaces the old one only once complete.

    With ``may_replace``, an existing ``target`` is replaced only when ``may_replace(target)`` is
    true; otherwise :class:`TargetInTheWayError` is raised and the target is left as it is. With
    ``owned``, only the tool's entries of an old folder are deleted (see :class:`OwnedFolder`).
    """
    if owned is not None:
        may_replace = owned.is_ours
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
    if owned is None:
        _remove(_swap_in(temporary, target))
        return
    foreign = sorted(entry.name for entry in os.scandir(target) if not owned.owns(target / entry.name))
    if foreign:
        _merge_into(temporary, target, owned, foreign)
    else:
        remove_owned(_swap_in(temporary, target), owned.owns)


@contextmanager
def atomic_path(
    path: str | os.PathLike,
    may_replace: Callable[[Path], bool] | None = None,
    *,
    owned: OwnedFolder | None = None,
    within: str | os.PathLike | None = None,
    where: str = "output path",
    expected_bytes: int = 0,
) -> Iterator[Path]:
    """Yield a free temporary path beside ``path``; move what was written there onto ``path`` on success.

    The writer may create a file or a folder at the yielded path. The parent folder is created
    if missing and checked first, so an unwritable destination fails at once with
    :class:`NotWritableError`. If the block raises, whatever it wrote is deleted and the
    exception propagates (as :class:`DiskFullError` when the disk filled up; ``expected_bytes``
    is the caller's estimate of the whole output for its message). ``may_replace`` and ``owned``
    guard an existing target (see :func:`_move_into_place`); ``within`` names the root below which
    no folder may be a link, and ``where`` the setting the user would change (in messages).
    """
    target = Path(path)
    _check_beneath(target, None if within is None else Path(within), where)
    _check_folder_writable(target, expected_bytes)
    temporary = _temporary_sibling(target, "tmp")
    try:
        yield temporary
        links.refuse_link(target, where)  # again: one may have appeared while the writer ran
        _move_into_place(temporary, target, may_replace, owned)
    except BaseException as error:
        written = bytes_under(temporary)
        _remove(temporary)
        if is_disk_full(error):
            raise disk_full(target.parent, written, expected_bytes, error) from error
        raise


@contextmanager
def atomic_directory(
    path: str | os.PathLike,
    may_replace: Callable[[Path], bool] | None = None,
    prepare: Callable[[Path], None] | None = None,
    **options,
) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: yields the temporary folder already created.

    ``prepare(folder)`` runs right after the folder is made, before the caller writes anything
    (e.g. to mark the folder as its own, so that a leftover can be recognised later). The keyword
    ``options`` are those of :func:`atomic_path`.
    """
    with atomic_path(path, may_replace, **options) as temporary:
        temporary.mkdir()
        if prepare is not None:
            prepare(temporary)
        yield temporary


def write_text_atomic(
    path: str | os.PathLike, text: str, within: str | os.PathLike | None = None, where: str = "output path"
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once; returns the path.

    The temporary file is made and renamed relative to the open parent folder, without following a
    link, so a folder swapped for a link meanwhile is not written through either.
    """
    target = Path(path)
    data = text.encode("utf-8")
    _check_beneath(target, None if within is None else Path(within), where)
    _check_folder_writable(target, len(data))
    temporary = _temporary_sibling(target, "tmp").name
    if within is None:
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        parent = links.open_folder(within, _relative_parent(target, Path(within)), where=where)
    try:
        fd = os.open(temporary, _NEW_FILE, 0o644, dir_fd=parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if stat.S_ISLNK(_lstat_mode(target.name, parent)):
            raise links.link_refusal(target, where)
        os.replace(temporary, target.name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException as error:
        try:
            os.unlink(temporary, dir_fd=parent)
        except FileNotFoundError:
            pass
        if is_disk_full(error):
            raise disk_full(target.parent, 0, len(data), error) from error
        raise
    finally:
        os.close(parent)
    return target


def _lstat_mode(name: str, folder_fd: int) -> int:
    try:
        return os.lstat(name, dir_fd=folder_fd).st_mode
    except FileNotFoundError:
        return 0


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` into a new file (never through a link) via a Python file, so a full disk is ``ENOSPC``.

    (Given a path, torch writes through its own C++ stream, which reports a full disk only as
    ``unexpected pos``.) Meant for a path inside a fresh temporary of :func:`atomic_path`.
    """
    import torch

    target = Path(path)
    fd = os.open(target, _NEW_FILE, 0o644)
    with os.fdopen(fd, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
    return target


def append_text(root: str | os.PathLike, relative: str | os.PathLike, text: str, where: str = "output path") -> None:
    """Append ``text`` to ``root / relative`` without following a link below ``root``, all or nothing.

    If the write fails (a full disk: :class:`DiskFullError`), the file is cut back to its old length,
    so that no half line is left for a reader.
    """
    root, data = Path(root), text.encode("utf-8")
    fd = links.open_beneath(root, relative, os.O_WRONLY | os.O_APPEND | os.O_CREAT, where, create_folders=True)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException as error:
            os.ftruncate(fd, size)
            if is_disk_full(error):
                raise disk_full((root / relative).parent, 0, len(data), error) from error
            raise
    finally:
        os.close(fd)
