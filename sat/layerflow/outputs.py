"""One folder per sample: a video per layer, editor-ready alpha outputs, a preview and meta.json.

The folder is written under a temporary name and renamed when every file is in place, with
``meta.json`` written last, so a folder that exists is complete (resume relies on this). The
hidden marker file ``.layerflow-sample`` is written first: it proves the folder is LayerFlow's
(see :mod:`layerflow.output_folder`).

Files (RGBA variant; the RGB variant has no alpha files):
  foreground.mp4 background.mp4 blend.mp4 alpha.mp4   one H.264 video per layer
  foreground_rgba/0000.png ...                        straight RGBA frames
  foreground.mov | foreground.webm                    ProRes 4444 or VP9 with alpha
  preview.mp4                                         foreground over checkerboard | background | blend
  given_<layer>.mp4                                   conditional tasks: the given layer as it was used
  meta.json                                           prompts, task, config, seed, checkpoint, versions
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_directory
from .config import LayerFlowConfig
from .output_folder import META_FILE, is_ours, write_marker
from .video_io import rgba_from_layers, to_uint8
from .video_writer import ALPHA_CODECS, write_alpha_video, write_mp4, write_png_sequence, write_preview

VIDEO_NAMES = {"fg": "foreground", "bg": "background", "blend": "blend", "alpha": "alpha"}


def code_version() -> str:
    """``<package version>+<git commit>`` when run from a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def foreground_rgba(layers: Mapping[str, torch.Tensor]):
    """Straight RGBA bytes (F, H, W, 4) of the foreground, or None without an alpha layer."""
    if "alpha" not in layers:
        return None
    return rgba_from_layers(layers["fg"], layers["alpha"])  # undoes the grey matte itself


def write_sample(folder: Path, layers: Mapping[str, torch.Tensor], config: LayerFlowConfig,
                 meta: Mapping[str, object], given: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write every output of one sample into ``folder``.

    The folder appears only when complete. An existing ``folder`` is replaced only when it is a
    sample folder of ours (it has the marker); anything else there is left untouched and
    :class:`layerflow.atomic.TargetInTheWayError` is raised.
    """
    output = config.output
    with atomic_directory(folder, may_replace=is_ours, prepare=lambda tmp: write_marker(tmp, folder.name)) as tmp:
        for name, video in layers.items():
            write_mp4(tmp / f"{VIDEO_NAMES[name]}.mp4", to_uint8(video), fps=output.fps)
        rgba = foreground_rgba(layers)
        if rgba is not None:
            if output.png_sequence:
                write_png_sequence(tmp / "foreground_rgba", rgba)
            if output.alpha_video != "none":
                suffix = ALPHA_CODECS[output.alpha_video].suffix
                write_alpha_video(tmp / f"foreground{suffix}", rgba, codec=output.alpha_video, fps=output.fps)
        if output.preview:
            fg = rgba if rgba is not None else to_uint8(layers["fg"])
            write_preview(tmp / "preview.mp4", fg, to_uint8(layers["bg"]), to_uint8(layers["blend"]), fps=output.fps)
        for name, video in (given or {}).items():
            write_mp4(tmp / f"given_{VIDEO_NAMES[name]}.mp4", to_uint8(video), fps=output.fps)
        record = {
            **meta,
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
