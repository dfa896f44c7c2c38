"""Composite a foreground over a background into a sample folder: the blend MP4 and every layer file.

The foreground is RGBA PNGs, an alpha video, RGB frames or a video plus a matte, or an earlier
sample folder (its straight RGBA export). The background is a video, a frame folder, a still
image, an earlier sample folder (its ``background.mp4``) or a solid colour (``#204080``,
``white``, ``rgb(32,64,128)``). Clips follow the input rules of sampling
(:mod:`layerflow.io.reader`): frames picked from the first 64, cover-resized and
centre-cropped to the size.

The output folder has the same files as a generated RGBA sample (so ``layerflow score``,
``inspect`` and ``--input fg=...`` work on it), with ``blend = a * fg + (1 - a) * bg`` and a
``meta.json`` that records the sources and the command.

Legend: t frames, c channels, h height, w width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import ImageColor

from layerflow.batch.sample_folder import code_version, write_layer_files
from layerflow.config import OutputSection
from layerflow.io.atomic import atomic_directory
from layerflow.io.output_folder import write_marker
from layerflow.io.pixels import LayerSourceError, alpha_to_layer, matte_foreground
from layerflow.io.reader import (
    DEFAULT_NUM_FRAMES,
    DEFAULT_SIZE,
    FRAME_SUFFIXES,
    layer_provenance,
    read_layer_video,
    read_layer_with_alpha,
    read_still_video,
    resolve_layer_source,
)
from layerflow.io.sample_files import META_FILE
from layerflow.scores import score_folder, to_json
from layerflow.tasks import MASK_INPUT, Layer


class ComposeError(ValueError):
    """A compose input or option that cannot be used; the message names it."""


def read_background(spec: str, num_frames: int, size: Sequence[int]) -> tuple[torch.Tensor, dict]:
    """Background (t, 3, h, w) in [-1, 1] from a clip, a still image or a colour, and where it came from."""
    path = Path(spec)
    if path.exists():
        source = resolve_layer_source(path, Layer.BG)
        if source.is_file() and source.suffix.lower() in FRAME_SUFFIXES:
            still = read_still_video(source, num_frames=num_frames, size=size)  # (t, c, h, w)
            return still[:, :3], {"path": str(source.resolve()), "still": True}
        video = read_layer_video(source, num_frames=num_frames, size=size)  # (t, c, h, w)
        return video[:, :3], layer_provenance(path, Layer.BG)
    try:
        rgb = ImageColor.getrgb(spec)[:3]
    except ValueError:
        raise ComposeError(
            f"--bg {spec!r}: no such file or folder, and not a colour (expected a video, a frame "
            f"folder, an image, a sample folder, or a colour such as '#204080' or 'white')"
        ) from None
    colour = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1  # (3,)
    hex_colour = "#" + "".join(f"{channel:02x}" for channel in rgb)
    return colour[None, :, None, None].expand(num_frames, 3, *size).contiguous(), {"colour": hex_colour}


def compose_layers(rgb: torch.Tensor, alpha: torch.Tensor, bg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Straight colour (t, 3, h, w), matte (t, 1, h, w) in [0, 1] and background -> the sample's layers.

    The foreground layer is matted over grey as the model's is; ``blend = rgb * a + bg * (1 - a)``.
    """
    return {
        Layer.FG: matte_foreground(rgb, alpha),
        Layer.BG: bg,
        Layer.BLEND: rgb * alpha + bg * (1 - alpha),
        Layer.ALPHA: alpha_to_layer(alpha),
    }  # each (t, 3, h, w)


def compose(
    fg: str,
    bg: str,
    output: str | os.PathLike,
    mask: str | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    settings: OutputSection | None = None,
    command: Sequence[str] = (),
) -> Path:
    """Write the composite sample folder ``output`` (which must not exist yet); returns it."""
    output = Path(output)
    settings = settings or OutputSection()
    if output.exists():
        raise ComposeError(f"{output}: already exists (compose writes a new folder; choose another --output)")
    if num_frames < 1:
        raise ComposeError(f"--frames must be at least 1, got {num_frames}")
    if len(size) != 2 or min(size) < 2 or size[0] % 2 or size[1] % 2:
        raise ComposeError(f"--size {size[0]}x{size[1]}: expected an even height and width (H.264 needs them)")
    fg_source = resolve_layer_source(fg, Layer.FG, with_alpha=True)
    mask_source = resolve_layer_source(mask, MASK_INPUT) if mask else None
    try:
        rgb, alpha = read_layer_with_alpha(fg_source, mask_source, num_frames=num_frames, size=size)
    except LayerSourceError as error:
        raise ComposeError(f"--fg: {error}") from None
    background, bg_record = read_background(bg, num_frames, size)
    layers = compose_layers(rgb, alpha, background)
    sources = {Layer.FG: layer_provenance(fg, Layer.FG, with_alpha=True), Layer.BG: bg_record}
    if mask:
        sources[MASK_INPUT] = layer_provenance(mask, MASK_INPUT)
    never_replace = lambda existing: False  # compose only ever writes a new folder
    with atomic_directory(output, may_replace=never_replace, prepare=lambda tmp: write_marker(tmp, output.name)) as tmp:
        write_layer_files(tmp, layers, settings)
        record = {
            "id": output.name,
            "tool": "compose",
            "given_sources": sources,
            "frames": num_frames,
            "size": list(size),
            "config": {"output": dataclasses.asdict(settings)},
            "command": list(command),
            "scores": to_json(score_folder(tmp)),
            "code_version": code_version(),
            "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE],
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return output
