"""Never write through a link that LayerFlow did not make.

A run keeps its files below a folder the user named (``--output``, ``training.save``,
``training.cache``). That folder itself may be a link (to a scratch disk, say) and is followed:
the user chose it. Below it, every folder and file the run creates, appends to, truncates,
replaces or deletes is reached one path component at a time through folder descriptors, each
opened with ``O_NOFOLLOW``, so that a symbolic link left there (to a user's file or folder) is
refused with one line and what it points to is never touched, even if a folder is swapped for a
link while the run goes on. A file the run appends to or truncates must also be a plain file
with no other hard link, since writing it would change the other name's content too.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_WRITING = os.O_WRONLY | os.O_RDWR


class LinkInTheWayError(OSError):
    """A link, or a path of the wrong kind, sits where a run keeps one of its own files or folders."""


def describe(path: Path) -> str:
    """What is at ``path`` without following a link: 'a symbolic link', 'a folder', 'a file', ..."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "nothing"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def link_refusal(path: Path, where: str) -> LinkInTheWayError:
    return LinkInTheWayError(
        f"{path} is a symbolic link; LayerFlow does not write through links it did not make "
        f"(remove it or use another {where})"
    )


def hard_link_refusal(path: Path, where: str) -> LinkInTheWayError:
    return LinkInTheWayError(
        f"{path} has other hard links; LayerFlow does not write into a file it shares with another name "
        f"(remove it or use another {where})"
    )


def refusal(path: Path, wanted: str, where: str) -> LinkInTheWayError:
    """The one-line error for ``path`` when it should be ``wanted`` ('folder' or 'file') and is not."""
    found = describe(path)
    if found == "a symbolic link":
        return link_refusal(path, where)
    return LinkInTheWayError(
        f"{path} is {found} where LayerFlow keeps a {wanted}; it is left untouched "
        f"(move it away or use another {where})"
    )


def refuse_link(path: Path, where: str) -> None:
    """Raise :class:`LinkInTheWayError` when ``path`` itself is a symbolic link (even a broken one)."""
    if os.path.islink(path):
        raise link_refusal(path, where)


def open_folder(root: Path, relative: str | Path = "", create: bool = False, where: str = "output folder") -> int:
    """A descriptor of ``root / relative``; every component below ``root`` is opened without following links.

    With ``create``, missing folders (``root`` too) are made. The caller closes the descriptor.
    """
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _FOLDER_FLAGS)
    shown = root
    try:
        for part in Path(relative).parts:
            shown = shown / part
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                inner = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise refusal(shown, "folder", where) from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def folder(root: Path, relative: str | Path = "", create: bool = False, where: str = "output folder") -> Iterator[int]:
    """:func:`open_folder` as a context manager that closes the descriptor."""
    fd = open_folder(root, relative, create, where)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(folder_fd: int, name: str, flags: int, shown: Path, where: str, mode: int = 0o644) -> int:
    """Open ``name`` inside an open folder without following a link; only a plain file is accepted.

    ``shown`` is the path named in the error. A file opened for writing must have no other hard link.
    """
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=folder_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise refusal(shown, "file", where) from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = refusal(shown, "file", where)
    elif flags & _WRITING and info.st_nlink > 1:
        problem = hard_link_refusal(shown, where)
    if problem is not None:
        os.close(fd)
        raise problem
    os.set_blocking(fd, True)
    return fd


def open_beneath(root: Path, relative: str | Path, flags: int, where: str, create_folders: bool = False) -> int:
    """Open the file ``root / relative`` with ``flags``, following no link below ``root``."""
    relative = Path(relative)
    with folder(root, relative.parent, create_folders, where) as parent:
        return open_file(parent, relative.name, flags, Path(root) / relative, where)


def open_append(root: Path, relative: str | Path, where: str):
    """A text stream appending to ``root / relative`` (created with its folders when missing)."""
    fd = open_beneath(root, relative, os.O_WRONLY | os.O_APPEND | os.O_CREAT, where, create_folders=True)
    return os.fdopen(fd, "a", encoding="utf-8")


def read_text(root: Path, relative: str | Path, where: str) -> str | None:
    """The text of ``root / relative``, or None when it does not exist; a link there is refused."""
    try:
        fd = open_beneath(root, relative, os.O_RDONLY, where)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as handle:
        return handle.read()
