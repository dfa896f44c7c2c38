"""One folder per sample: a video per layer, editor-ready alpha outputs, a preview and meta.json.

The folder is written under a temporary name and renamed when every file is in place, with
``meta.json`` written last, so a folder that exists is complete (resume relies on this). The
hidden marker file ``.layerflow-sample`` is written first: it proves the folder is LayerFlow's
(see :mod:`layerflow.io.output_folder`).

Files (RGBA variant; the RGB variant has no alpha files; names in :mod:`layerflow.io.sample_files`):
  foreground.mp4 background.mp4 blend.mp4 alpha.mp4   one H.264 video per layer (alpha: the grey matte)
  background_ffv1.mkv, ...                            output.master: a master copy of each layer
  foreground_rgba/0000.png ...                        straight RGBA frames (output.alpha_mode straight, both)
  foreground.mov | foreground.webm                    ProRes 4444 or VP9 with alpha (or both), straight
  foreground_rgba_premultiplied/, foreground_premultiplied.mov|.webm   the same premultiplied
                                                      (output.alpha_mode premultiplied, both)
  preview.mp4                                         foreground over checkerboard | background | blend
  contact_sheet.png                                   a grid of frames by layers (with the preview)
  given/<input>/<name>                                conditional tasks: each given input as it was given,
                                                      copied byte for byte (a file, or a folder's frames)
  given_<layer>.mp4                                   conditional tasks: the given layer as it entered the
                                                      model (resized, cropped, frames picked), re-decoded
  meta.json                                           prompts, task, config, seed, checkpoint, versions,
                                                      given-layer sources and files, fingerprint, scores
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch

from layerflow import __version__
from layerflow.config import LayerFlowConfig, OutputSection
from layerflow.io.atomic import atomic_directory
from layerflow.io.contact_sheet import write_contact_sheet
from layerflow.io.output_folder import SAMPLE_FOLDER, write_marker
from layerflow.io.pixels import premultiply, rgba_from_layers, to_uint8
from layerflow.io.sample_files import (
    CONTACT_SHEET_FILE,
    META_FILE,
    PREVIEW_FILE,
    alpha_exports,
    given_video,
)
from layerflow.io.writer import (
    ALPHA_CODECS,
    write_alpha_video,
    write_layer,
    write_mp4,
    write_png_sequence,
    write_preview,
)
from layerflow.scores import score_folder, to_json
from layerflow.tasks import Layer


def code_version() -> str:
    """``<package version>+<git commit>`` when run from a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def foreground_rgba(layers: Mapping[str, torch.Tensor]):
    """Straight RGBA bytes (F, H, W, 4) of the foreground, or None without an alpha layer."""
    if Layer.ALPHA not in layers:
        return None
    return rgba_from_layers(layers[Layer.FG], layers[Layer.ALPHA])  # undoes the grey matte itself


def alpha_video_codecs(alpha_video: str) -> tuple[str, ...]:
    """The alpha codecs (keys of :data:`ALPHA_CODECS`) that ``output.alpha_video`` asks for."""
    return {"none": (), "both": ("prores", "vp9")}.get(alpha_video, (alpha_video,))


def write_layer_files(folder: Path, layers: Mapping[str, torch.Tensor], output: OutputSection) -> None:
    """The layer files of one sample into an existing ``folder``: a video per layer, the RGBA exports
    of ``output.alpha_mode``, the preview and the contact sheet."""
    for name, video in layers.items():
        master = output.master if name in output.master_layers else "none"
        write_layer(folder, name, video, fps=output.fps, crf=output.crf, master=master)
    rgba = foreground_rgba(layers)
    if rgba is not None:
        for export in alpha_exports(output.alpha_mode):
            frames = premultiply(rgba) if export.premultiplied else rgba  # (F, H, W, 4)
            if output.png_sequence:
                write_png_sequence(folder / export.png_folder, frames)
            for codec in alpha_video_codecs(output.alpha_video):
                suffix = ALPHA_CODECS[codec].suffix
                write_alpha_video(folder / f"{export.video_stem}{suffix}", frames, codec=codec, fps=output.fps)
    if output.preview:
        fg = rgba if rgba is not None else to_uint8(layers[Layer.FG])
        bg, blend = to_uint8(layers[Layer.BG]), to_uint8(layers[Layer.BLEND])
        write_preview(folder / PREVIEW_FILE, fg, bg, blend, fps=output.fps)
        write_contact_sheet(folder / CONTACT_SHEET_FILE, fg, bg, blend)


def copy_files(folder: Path, files: Mapping[str, Path]) -> None:
    """Copy each file's bytes to ``folder / relative path`` (the file's content only, not its times)."""
    for relative, source in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def write_sample(
    folder: Path,
    layers: Mapping[str, torch.Tensor],
    config: LayerFlowConfig,
    meta: Mapping[str, object],
    given: Mapping[str, torch.Tensor] | None = None,
    kept: Mapping[str, Path] | None = None,
) -> Path:
    """Write every output of one sample into ``folder``; ``kept`` (relative path -> file) is copied in
    byte for byte (the given inputs as they were given).

    The folder appears only when complete. An existing ``folder`` is replaced only when it is a
    sample folder of ours (it has the marker); anything else there is left untouched and
    :class:`layerflow.io.atomic.TargetInTheWayError` is raised. Of an old folder of ours only the
    files LayerFlow writes are deleted; anything else found in it stays.
    """
    output = config.output
    with atomic_directory(folder, owned=SAMPLE_FOLDER, prepare=lambda tmp: write_marker(tmp, folder.name)) as tmp:
        write_layer_files(tmp, layers, output)
        for name, video in (given or {}).items():
            write_mp4(tmp / given_video(name), to_uint8(video), fps=output.fps)
        copy_files(tmp, kept or {})
        scores = {"scores": to_json(score_folder(tmp))} if Layer.ALPHA in layers and output.scores else {}
        record = {
            **meta,
            **scores,
            "task": config.layout.task.value,
            "variant": config.layout.variant.value,
            "config": config.to_dict(),
            "config_files": list(config.sources),
            "code_version": code_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE],
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
