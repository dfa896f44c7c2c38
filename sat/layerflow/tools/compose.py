"""Composite a foreground over a background into a sample folder: the blend MP4 and every layer file.

The foreground is RGBA PNGs, an alpha video, RGB frames or a video plus a matte (white =
opaque), a still image, or an earlier sample folder (its straight RGBA export). The background
is a video, a frame folder, a still image, an earlier sample folder (its ``background.mp4``) or a
solid colour (``#204080``, ``white``, ``rgb(32,64,128)``). Clips follow the input rules of
sampling (:mod:`layerflow.io.reader`): frames are taken one for one, so output frame i is frame
i of each clip (a clip shorter than ``frames`` is refused; a still image is held), and clips are
cover-resized (colour with alpha premultiplied) and centre-cropped.

The output folder has the same files as a generated RGBA sample (so ``layerflow score``,
``inspect`` and ``--input fg=...`` work on it), with ``blend = a * fg + (1 - a) * bg`` computed
on the display values (sRGB bytes, as editors blend by default), or in linear light with
``blend_space="linear"``, and a ``meta.json`` that records the sources, the frames taken from
each and the command.

Legend: t frames, c channels, h height, w width.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import ImageColor

from layerflow.batch.sample_folder import code_version, write_layer_files
from layerflow.config import OutputSection
from layerflow.io.atomic import atomic_directory
from layerflow.io.output_folder import write_marker
from layerflow.io.pixels import LayerSourceError, alpha_to_layer, matte_foreground
from layerflow.io.reader import (
    DEFAULT_SIZE,
    MAX_SOURCE_FRAMES,
    PICK_ONE_FOR_ONE,
    check_layer_source,
    clip_length,
    layer_provenance,
    read_layer_video,
    read_layer_with_alpha,
    resolve_layer_source,
)
from layerflow.io.sample_files import META_FILE
from layerflow.scores import score_folder, to_json
from layerflow.tasks import MASK_INPUT, Layer

BLEND_SPACES = ("display", "linear")
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ComposeError(ValueError):
    """A compose input or option that cannot be used; the message names it."""


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as ffmpeg writes it (``720x480``) -> (height, width).

    A width smaller than the height is refused: it is what the old ``HEIGHTxWIDTH`` form of a
    landscape size looks like (``480x720``), so it cannot be told from a portrait frame. The
    error message names the value, not the option (the caller adds that).
    """
    match = _SIZE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT as in ffmpeg, e.g. 720x480")
    width, height = int(match.group(1)), int(match.group(2))
    if width < height:
        raise ValueError(
            f"{text} is ambiguous: sizes are WIDTHxHEIGHT as in ffmpeg (write {height}x{width} for a frame "
            f"{height} wide); a width below the height is refused, as earlier versions read HEIGHTxWIDTH"
        )
    return height, width


def format_size(size: Sequence[int]) -> str:
    """(height, width) -> ``WIDTHxHEIGHT``."""
    return f"{size[1]}x{size[0]}"


def _is_colour(spec: str) -> bool:
    return not Path(spec).exists()


def read_background(spec: str, num_frames: int, size: Sequence[int]) -> tuple[torch.Tensor, dict]:
    """Background (t, 3, h, w) in [-1, 1] from a clip, a still image or a colour, and where it came from."""
    path = Path(spec)
    if path.exists():
        source = resolve_layer_source(path, Layer.BG)
        video = read_layer_video(source, num_frames=num_frames, size=size, pick=PICK_ONE_FOR_ONE)  # (t, c, h, w)
        return video[:, :3], layer_provenance(path, Layer.BG, num_frames=num_frames, pick=PICK_ONE_FOR_ONE)
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


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Model pixels in [-1, 1] (sRGB-encoded) -> linear light in [0, 1] (the sRGB EOTF, IEC 61966-2-1)."""
    v = ((x + 1) / 2).clamp(0.0, 1.0)
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(v: torch.Tensor) -> torch.Tensor:
    """Linear light in [0, 1] -> model pixels in [-1, 1] (sRGB-encoded); inverse of :func:`srgb_to_linear`."""
    v = v.clamp(0.0, 1.0)
    encoded = torch.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)
    return 2 * encoded - 1


def compose_layers(
    rgb: torch.Tensor, alpha: torch.Tensor, bg: torch.Tensor, blend_space: str = "display"
) -> dict[str, torch.Tensor]:
    """Straight colour (t, 3, h, w), matte (t, 1, h, w) in [0, 1] and background -> the sample's layers.

    The foreground layer is matted over grey as the model's is; ``blend = rgb * a + bg * (1 - a)``
    on the display (sRGB) values, or on linear light for ``blend_space="linear"``.
    """
    if blend_space == "display":
        blend = rgb * alpha + bg * (1 - alpha)
    elif blend_space == "linear":
        blend = linear_to_srgb(srgb_to_linear(rgb) * alpha + srgb_to_linear(bg) * (1 - alpha))
    else:
        raise ComposeError(f"--blend-space {blend_space!r}: expected one of {', '.join(BLEND_SPACES)}")
    return {
        Layer.FG: matte_foreground(rgb, alpha),
        Layer.BG: bg,
        Layer.BLEND: blend,
        Layer.ALPHA: alpha_to_layer(alpha),
    }  # each (t, 3, h, w)


def compose(
    fg: str,
    bg: str,
    output: str | os.PathLike,
    mask: str | None = None,
    num_frames: int | None = None,
    size: Sequence[int] = DEFAULT_SIZE,
    settings: OutputSection | None = None,
    command: Sequence[str] = (),
    blend_space: str = "display",
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Write the composite sample folder ``output`` (which must not exist yet); returns it.

    ``num_frames`` defaults to the foreground's length (at most the first 64 frames); ``size``
    is (height, width). ``on_stage(name)`` is told as each stage starts: ``read``, ``write``,
    ``score`` (for a progress bar).
    """
    stage = on_stage or (lambda name: None)
    output = Path(output)
    settings = settings or OutputSection()
    if output.exists():
        raise ComposeError(f"{output}: already exists (compose writes a new folder; choose another --output)")
    if num_frames is not None and num_frames < 1:
        raise ComposeError(f"--frames must be at least 1, got {num_frames}")
    if len(size) != 2 or min(size) < 2 or size[0] % 2 or size[1] % 2:
        raise ComposeError(f"--size {format_size(size)}: expected an even width and height (H.264 needs them)")
    if blend_space not in BLEND_SPACES:
        raise ComposeError(f"--blend-space {blend_space!r}: expected one of {', '.join(BLEND_SPACES)}")
    stage("read")
    fg_source = resolve_layer_source(fg, Layer.FG, with_alpha=True)
    mask_source = resolve_layer_source(mask, MASK_INPUT) if mask else None
    try:  # the checks (and warnings, once each) that sampling makes, then the read
        if num_frames is None:
            num_frames = min(clip_length(fg_source)[0], MAX_SOURCE_FRAMES)
        check_layer_source(fg_source, num_frames, size, needs_alpha=True, mask=mask_source, pick=PICK_ONE_FOR_ONE)
        rgb, alpha = read_layer_with_alpha(
            fg_source, mask_source, num_frames=num_frames, size=size, pick=PICK_ONE_FOR_ONE
        )  # (t, 3, h, w), (t, 1, h, w)
    except LayerSourceError as error:
        raise ComposeError(
            f"--fg: {str(error).replace('--input mask=PATH (manifest: inputs.mask)', '--mask PATH')}"
        ) from None
    try:
        if not _is_colour(bg):
            check_layer_source(resolve_layer_source(bg, Layer.BG), num_frames, size, pick=PICK_ONE_FOR_ONE)
        background, bg_record = read_background(bg, num_frames, size)
    except LayerSourceError as error:
        raise ComposeError(f"--bg: {error}") from None
    layers = compose_layers(rgb, alpha, background, blend_space)
    frames = {"num_frames": num_frames, "pick": PICK_ONE_FOR_ONE}
    sources = {Layer.FG: layer_provenance(fg, Layer.FG, with_alpha=True, **frames), Layer.BG: bg_record}
    if mask:
        sources[MASK_INPUT] = layer_provenance(mask, MASK_INPUT, **frames)
    never_replace = lambda existing: False  # compose only ever writes a new folder
    with atomic_directory(output, may_replace=never_replace, prepare=lambda tmp: write_marker(tmp, output.name)) as tmp:
        stage("write")
        write_layer_files(tmp, layers, settings)
        stage("score")
        record = {
            "id": output.name,
            "tool": "compose",
            "given_sources": sources,
            "frames": num_frames,
            "size": format_size(size),
            "blend_space": blend_space,
            "config": {"output": dataclasses.asdict(settings)},
            "command": list(command),
            "scores": to_json(score_folder(tmp)),
            "code_version": code_version(),
            "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE],
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return output
