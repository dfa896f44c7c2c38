"""The files of a sample folder by name: one table that the writers, the readers and the tools share.

A sample folder (``OUTPUT/<id>/``) is complete when it holds ``meta.json``; the layer files are
named below. RGBA exports come in two kinds: straight colour (the default) and colour
premultiplied by alpha, each as a PNG folder and an alpha video; the kind is in the file name,
because ProRes and WebM do not record it.

Every layer also has an H.264 file (``background.mp4``; for ``alpha`` the grey matte) and, when
``output.master`` asks for one, a master copy whose codec is in its name (``background_ffv1.mkv``,
``background_png/``), so the foreground's master never collides with its alpha export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layerflow.tasks import Layer

META_FILE = "meta.json"
SCORES_FILE = "scores.json"
PREVIEW_FILE = "preview.mp4"
CONTACT_SHEET_FILE = "contact_sheet.png"
VIDEO_NAMES = {Layer.FG: "foreground", Layer.BG: "background", Layer.BLEND: "blend", Layer.ALPHA: "alpha"}
# output.master codecs and the suffix of their file ("" is a folder of PNG frames); the encoder
# settings are in layerflow.io.writer.MASTER_CODECS
MASTER_SUFFIXES = {"png": "", "ffv1": ".mkv", "prores_hq": ".mov", "prores_4444": ".mov"}
MASTER_PREFERENCE = ("png", "ffv1", "prores_4444", "prores_hq")  # best first, for reading a layer back
GIVEN_FOLDER = "given"  # conditional tasks: each given input as it was given, given/<input>/<its name>


@dataclass(frozen=True)
class AlphaExport:
    """One kind of RGBA export: its PNG folder, the stem of its alpha video and whether colour is premultiplied."""

    kind: str
    png_folder: str
    video_stem: str
    premultiplied: bool


ALPHA_EXPORTS = {
    "straight": AlphaExport("straight", "foreground_rgba", "foreground", premultiplied=False),
    "premultiplied": AlphaExport(
        "premultiplied", "foreground_rgba_premultiplied", "foreground_premultiplied", premultiplied=True
    ),
}
ALPHA_MODE_EXPORTS = {
    "straight": ("straight",),
    "premultiplied": ("premultiplied",),
    "both": ("straight", "premultiplied"),
}


class SampleFolderError(ValueError):
    """A folder that is not a usable sample folder; the message names the folder and what is missing."""


def layer_video(layer: str) -> str:
    """The H.264 file of a layer: ``fg`` -> ``foreground.mp4``."""
    return f"{VIDEO_NAMES[layer]}.mp4"


def master_file(layer: str, codec: str) -> str:
    """The master copy of a layer in ``codec``: ``bg``, ``ffv1`` -> ``background_ffv1.mkv``."""
    return f"{VIDEO_NAMES[layer]}_{codec}{MASTER_SUFFIXES[codec]}"


def layer_files(layer: str) -> list[str]:
    """The files of a sample folder that hold ``layer``, best first: its masters, then the H.264 file."""
    return [*(master_file(layer, codec) for codec in MASTER_PREFERENCE), layer_video(layer)]


def given_video(layer: str) -> str:
    """The model's re-decode of a given layer, as it entered the model: ``fg`` -> ``given_foreground.mp4``."""
    return f"given_{VIDEO_NAMES[layer]}.mp4"


def kept_given_path(name: str, source: str | Path, inside: str | Path | None = None) -> str:
    """Where a sample folder keeps given input ``name`` as it was given: ``given/<name>/<source's own name>``
    (a file, or a frame folder), and for ``inside`` a frame folder, the path of that frame file."""
    path = f"{GIVEN_FOLDER}/{name}/{Path(source).name}"
    return f"{path}/{Path(inside).as_posix()}" if inside is not None else path


def alpha_exports(mode: str) -> list[AlphaExport]:
    """The RGBA exports that ``output.alpha_mode`` = ``mode`` writes."""
    return [ALPHA_EXPORTS[kind] for kind in ALPHA_MODE_EXPORTS[mode]]


def is_sample_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def read_meta(folder: str | Path) -> dict:
    """The ``meta.json`` of a sample folder, with a one-line error when it is absent or unreadable."""
    path = Path(folder) / META_FILE
    if not Path(folder).is_dir():
        raise SampleFolderError(f"{folder}: not a folder (expected a sample folder with {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SampleFolderError(f"{folder}: no {META_FILE}, so not a (complete) sample folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleFolderError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(meta, dict):
        raise SampleFolderError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta
