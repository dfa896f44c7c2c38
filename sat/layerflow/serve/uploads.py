"""Given layers sent by the page: refused when too large or of the wrong type, checked, then kept.

An upload is one file in the request body (``POST /api/uploads?filename=NAME``). Its size comes from
``Content-Length`` and is checked before a byte is read (:class:`UploadTooLarge`, HTTP 413). Its type
is checked twice: by the name's suffix (:data:`UPLOAD_TYPES`) and by its content, which must start
as that type does and read as a layer (:mod:`layerflow.io.reader`): a video, an image (an RGBA PNG
keeps its alpha), or a zip of PNG frames, unpacked flat into a frame folder (each member by its own
name, so no member can reach outside it; links, other files and duplicate names are refused).
Anything else is :class:`UploadRefused` (HTTP 415). An upload appears under
``uploads/<id>/`` only once it passed every check.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from layerflow.io.atomic import TEMPORARY_NAME, atomic_directory
from layerflow.io.pixels import LayerSourceError
from layerflow.io.reader import PICK_ONE_FOR_ONE, check_layer_source, clip_length, probe_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UPLOAD_TYPES = (".mp4", ".mov", ".webm", ".png", ".jpg", ".zip")
ACCEPTED_SUFFIXES = (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES, ".zip")  # .jpeg too, written .jpg in the list
FRAMES_FOLDER = "frames"  # a zip's frames, unpacked: uploads/<id>/frames/0000.png ...
MAX_ZIP_MEMBERS = 1000
ZIP_EXPANSION = 8  # a zip may unpack to at most this many times the upload limit
_CHUNK = 1 << 20
_ID = re.compile(r"^[0-9a-f]{16}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# How each type's content starts (the name alone is not trusted).
_MAGIC = {
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".webm": (b"\x1a\x45\xdf\xa3",),
    ".zip": (b"PK\x03\x04",),
}
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")  # the first box of an MP4 / QuickTime


class UploadTooLarge(ValueError):
    """The upload is over the size limit (HTTP 413)."""


class UploadRefused(ValueError):
    """The upload's type is not accepted or its content does not read as that type (HTTP 415)."""


@dataclass(frozen=True)
class Upload:
    """A kept upload: its id, the name it was sent with, what it is and where the reader finds it."""

    id: str
    filename: str
    kind: str  # video, image or frames_zip
    frames: int
    alpha: bool
    path: Path  # the file, or the frame folder of a zip

    def as_json(self) -> dict:
        return {
            "upload": self.id,
            "filename": self.filename,
            "kind": self.kind,
            "frames": self.frames,
            "alpha": self.alpha,
        }


def safe_filename(filename: str) -> str:
    """The name's last part with only letters, digits and ``._-`` (the suffix checked by the caller)."""
    name = PurePosixPath(str(filename).replace("\\", "/")).name
    name = _SAFE_NAME.sub("_", name).lstrip(".")
    return name[-100:] or "upload"


def suffix_of(filename: str) -> str:
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        shown = suffix or "no suffix"
        raise UploadRefused(
            f"{filename!r}: {shown} is not accepted; upload a video ({', '.join(VIDEO_SUFFIXES)}), "
            f"an image (.png, .jpg) or a .zip of PNG frames"
        )
    return suffix


class UploadStore:
    """The uploads of one server: ``root`` (``OUTPUT/uploads``), ``limit`` bytes per upload."""

    def __init__(self, root: Path, limit: int, within: Path, size: tuple[int, int]):
        self.root = root
        self.size = size  # (height, width) the layers are read at: a warning names what is enlarged
        self.limit = limit
        self.within = within
        self._uploads: dict[str, Upload] = {}

    def check_request(self, filename: str, length: int | None) -> None:
        """Before reading the body: a name with an accepted suffix, a declared length within the limit."""
        if not filename:
            raise UploadRefused("no ?filename=NAME given (its suffix says what the file is)")
        suffix_of(safe_filename(filename))
        if length is None:
            raise UploadRefused("the upload has no Content-Length; send the file as the request body")
        if length > self.limit:
            raise UploadTooLarge(f"the upload is {length} bytes; the limit is {self.limit} bytes (--max-upload-mb)")
        if length == 0:
            raise UploadRefused("the upload is empty")

    def receive(self, filename: str, body: BinaryIO, length: int) -> Upload:
        """Keep ``length`` bytes of ``body`` as ``filename`` once its type and content are checked."""
        self.check_request(filename, length)
        name = safe_filename(filename)
        suffix = suffix_of(name)
        upload_id = secrets.token_hex(8)
        with atomic_directory(self.root / upload_id, within=self.within, where="--output") as folder:
            file = folder / name
            _copy_body(body, file, length)
            kind, frames, alpha = _check_content(file, suffix, folder, self.limit * ZIP_EXPANSION, self.size)
            if kind == "frames_zip":
                file.unlink()  # the frames stay, unpacked
        path = self.root / upload_id / (FRAMES_FOLDER if kind == "frames_zip" else name)
        upload = Upload(upload_id, str(filename), kind, frames, alpha, path)
        self._uploads[upload_id] = upload
        return upload

    def get(self, upload_id: object) -> Upload | None:
        if not isinstance(upload_id, str) or not _ID.match(upload_id):
            return None
        return self._uploads.get(upload_id)


def _copy_body(body: BinaryIO, file: Path, length: int) -> None:
    left = length
    with open(file, "xb") as out:
        while left:
            chunk = body.read(min(_CHUNK, left))
            if not chunk:
                raise UploadRefused(f"the upload ended after {length - left} of {length} bytes")
            out.write(chunk)
            left -= len(chunk)


def _check_magic(file: Path, suffix: str) -> None:
    with open(file, "rb") as handle:
        head = handle.read(16)
    if suffix in (".mp4", ".mov"):
        ok = head[4:8] in _MP4_BOXES
    else:
        ok = head.startswith(_MAGIC[suffix])
    if not ok:
        raise UploadRefused(f"{file.name}: its content is not {suffix[1:].upper()} (the name says it is)")


def _check_content(
    file: Path, suffix: str, folder: Path, unpacked_limit: int, size: tuple[int, int]
) -> tuple[str, int, bool]:
    """(kind, frames, has alpha) of a checked upload; :class:`UploadRefused` when it does not read."""
    _check_magic(file, suffix)
    try:
        if suffix in VIDEO_SUFFIXES:
            check_layer_source(file, num_frames=1, size=size, pick=PICK_ONE_FOR_ONE)  # decodes it
            return "video", clip_length(file)[0], probe_video(file).has_alpha
        if suffix in IMAGE_SUFFIXES:
            check_layer_source(file, num_frames=1, size=size, pick=PICK_ONE_FOR_ONE)
            return "image", 1, _image_has_alpha(file)
        frames = unpack_frames(file, folder / FRAMES_FOLDER, unpacked_limit)
        check_layer_source(frames, num_frames=1, size=size, pick=PICK_ONE_FOR_ONE)
        return "frames_zip", clip_length(frames)[0], _image_has_alpha(sorted(frames.iterdir())[0])
    except (LayerSourceError, OSError) as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UploadRefused(text.replace(str(folder), "upload")) from None


def _image_has_alpha(file: Path) -> bool:
    with Image.open(file) as image:
        return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def unpack_frames(archive: Path, target: Path, unpacked_limit: int) -> Path:
    """The PNG frames of a zip into ``target`` (flat: each by its own name); refuses anything else."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            _check_members(members, unpacked_limit)
            target.mkdir()
            for member in members:
                with zipped.open(member) as source, open(target / PurePosixPath(member.filename).name, "xb") as out:
                    _copy_limited(source, out, member.file_size)
    except zipfile.BadZipFile as error:
        raise UploadRefused(f"{archive.name}: not a readable zip ({error})") from None
    for frame in target.iterdir():
        with open(frame, "rb") as handle:
            if not handle.read(8).startswith(_MAGIC[".png"][0]):
                raise UploadRefused(
                    f"{archive.name}: {frame.name} is not a PNG image (a zip must hold PNG frames only)"
                )
    return target


def _check_members(members: list[zipfile.ZipInfo], unpacked_limit: int) -> None:
    if not members:
        raise UploadRefused("the zip holds no frames (expected PNG frames: 0000.png, 0001.png, ...)")
    if len(members) > MAX_ZIP_MEMBERS:
        raise UploadRefused(f"the zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS} frames are accepted")
    names = set()
    for member in members:
        path = PurePosixPath(member.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or stat.S_ISLNK(member.external_attr >> 16):
            raise UploadRefused(f"the zip member {member.filename!r} points outside the zip; refused")
        if path.suffix.lower() != ".png":
            raise UploadRefused(
                f"the zip member {member.filename!r} is not a .png frame (a zip must hold PNG frames only)"
            )
        if path.name in names or path.name.startswith("."):
            raise UploadRefused(f"the zip member {member.filename!r}: frame names must be distinct and visible")
        names.add(path.name)
    total = sum(member.file_size for member in members)
    if total > unpacked_limit:
        raise UploadRefused(f"the zip unpacks to {total} bytes; at most {unpacked_limit} are accepted")


def _copy_limited(source: BinaryIO, out: BinaryIO, size: int) -> None:
    """Copy a member, never more than its declared size (a member that lies about it is cut, then fails to read)."""
    left = size
    while left > 0:
        chunk = source.read(min(_CHUNK, left))
        if not chunk:
            break
        out.write(chunk)
        left -= len(chunk)


def remove_upload_leftovers(root: Path) -> None:
    """Remove what uploads cut off by a killed server left: their hidden temporary folders
    (``.<id>.tmp-<hex>``, :mod:`layerflow.io.atomic`) directly under ``root``; links are left alone."""
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        if TEMPORARY_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
