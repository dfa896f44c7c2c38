"""Files the server sends: only plain files inside one folder, by a relative path, with byte ranges.

:func:`confined` turns a URL path into a file below ``root`` or None: no ``..``, no absolute path, no
hidden name (the lock file, the sample marker, temporary folders), no link anywhere on the way (so
nothing outside ``root`` can be reached through one), and a plain file at the end. :func:`byte_range`
reads a ``Range: bytes=...`` header (one range, as ``<video>`` sends to seek).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
    ".jsonl": "application/json",
    ".zip": "application/zip",
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def confined(root: Path, url_path: str) -> Path | None:
    """The plain file that ``url_path`` (percent-encoded, relative) names below ``root``, or None."""
    text = unquote(url_path)
    if "\x00" in text or "\\" in text:
        return None
    relative = PurePosixPath(text)
    if relative.is_absolute() or not relative.parts:
        return None
    if any(part in ("", ".", "..") or part.startswith(".") for part in relative.parts):
        return None
    path = root
    for part in relative.parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    return path if stat.S_ISREG(mode) else None


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a ``Range`` header for a file of ``size`` bytes; None: the whole file.

    Raises ValueError for a range that cannot be met (HTTP 416); a header of another form (several
    ranges, other units) is ignored, as HTTP allows, and the whole file is sent.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - count), size
    start = int(first)
    stop = min(size, int(last) + 1) if last else size
    if start >= size or stop <= start:
        raise ValueError(f"range {header!r} outside the file's {size} bytes")
    return start, stop


def open_confined(path: Path):
    """Open a file found by :func:`confined` for reading without following a link put there since."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
