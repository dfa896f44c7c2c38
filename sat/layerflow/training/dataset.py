"""Layered training samples: the manifest, and one sample's layers as the model's stacked clip.

A training manifest is the sampling manifest with every layer given, one JSON object per line::

    {"id": "bear-01", "prompts": {"fg": "...", "bg": "...", "blend": "..."},
     "inputs": {"fg": "bear_rgba/", "bg": "river.mp4", "blend": "bear.mp4"}}

* ``inputs.fg`` is the foreground with its matte: RGBA frames, or colour plus ``inputs.mask``;
* ``inputs.blend`` may be left out: it is composited as ``alpha * fg + (1 - alpha) * bg``;
* any input may be a single image (PNG/JPEG); it becomes a frozen clip of 16 identical frames;
* ``still`` (optional) says whether the sample is a still clip, which switches the motion LoRA on
  for it; by default a sample is still when all its inputs are single images.

Layers are read as the original data code builds them (foreground matted over grey, the alpha
layer as the mask in RGB, 16 frames from the first 64, cover-resize and centre crop). Any problem
is a :class:`SampleError` naming the sample id and the file.

Legend: F pixel frames, H/W pixel size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerflow.geometry import PIXEL_FRAMES_PER_LAYER
from layerflow.io.manifest_lines import SAFE_ID, content_id, json_type, jsonl_entries, string_map
from layerflow.io.pixels import matte_foreground, uint8_to_model, uint8_to_unit
from layerflow.io.reader import (
    FRAME_SUFFIXES,
    LayerSourceError,
    _load_image,
    read_foreground,
    read_layer_video,
    resize_for_rectangle_crop,
)
from layerflow.tasks import MASK_INPUT, Layer, TaskLayout, stack_layers

LAYER_NAMES = (Layer.FG, Layer.BG, Layer.BLEND)
INPUT_NAMES = (Layer.FG, MASK_INPUT, Layer.BG, Layer.BLEND)


class SampleError(ValueError):
    """A training sample or manifest line that cannot be used; one line naming the id and file."""


@dataclass(frozen=True)
class TrainingSample:
    """One layered clip: prompts and input paths by layer, and whether it is a still clip."""

    id: str
    prompts: Mapping[str, str]
    inputs: Mapping[str, str]
    still: bool
    where: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in FRAME_SUFFIXES and Path(path).is_file()


def _parse_line(entry: object, where: str, base: Path, layout: TaskLayout) -> TrainingSample:
    """One manifest line, every field type-checked (a wrong type is an error, never stringified)."""
    if not isinstance(entry, dict) or "prompts" not in entry or "inputs" not in entry:
        raise SampleError(f"{where}: expected an object with 'prompts' and 'inputs' mappings")
    unknown = sorted(set(entry) - {"id", "prompts", "inputs", "still"})
    if unknown:
        raise SampleError(f"{where}: unknown fields {unknown} (expected id, prompts, inputs, still)")
    prompts = string_map(entry["prompts"], "prompts", where, error_type=SampleError)
    given = string_map(
        entry["inputs"], "inputs", where, item="a string path", error_type=SampleError, entries="layer: path"
    )
    empty = [name for name, value in given.items() if not value.strip()]
    if empty:
        raise SampleError(f"{where}: inputs.{empty[0]} must be a path, got an empty string")
    inputs = {name: str(value if Path(value).is_absolute() else base / value) for name, value in given.items()}
    raw_id = entry.get("id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise SampleError(f"{where}: id must be a string, got {json_type(raw_id)}")
    sample_id = raw_id if raw_id is not None else content_id(prompts, given)
    if not SAFE_ID.match(sample_id):
        raise SampleError(f"{where}: id {sample_id!r} must be letters, digits, '.', '_' or '-'")
    where = f"{where} (sample {sample_id})"
    wrong_prompts = sorted(set(prompts) - set(LAYER_NAMES))
    missing_prompts = [name for name in layout.prompt_layers if not prompts.get(name, "").strip()]
    if wrong_prompts or missing_prompts:
        raise SampleError(
            f"{where}: {layout.name} needs prompts for {list(layout.prompt_layers)}; "
            f"missing or empty {missing_prompts}, unknown {wrong_prompts}"
        )
    wrong_inputs = sorted(set(inputs) - set(INPUT_NAMES))
    missing_inputs = [name for name in (Layer.FG, Layer.BG) if name not in inputs]
    if wrong_inputs or missing_inputs:
        raise SampleError(
            f"{where}: inputs need fg and bg (blend and mask optional); missing {missing_inputs}, "
            f"unknown {wrong_inputs}"
        )
    still = entry.get("still")
    if "still" in entry and not isinstance(still, bool):
        raise SampleError(f"{where}: still must be true or false, got {json_type(still)}")
    if still is None:
        still = all(is_image(path) for path in inputs.values())
    return TrainingSample(sample_id, prompts, inputs, still, where)


def read_manifest(path: str | Path, layout: TaskLayout) -> list[TrainingSample]:
    """Every sample of a JSONL training manifest (paths relative to the manifest); ids are unique."""
    path = Path(path)
    samples, seen = [], {}
    for where, entry in jsonl_entries(path, "training manifest", SampleError):
        sample = _parse_line(entry, where, path.parent, layout)
        if sample.id in seen:
            raise SampleError(f"{where}: duplicate id {sample.id!r} (first at {seen[sample.id]})")
        seen[sample.id] = where
        samples.append(sample)
    if not samples:
        raise SampleError(f"{path}: no samples (expected one JSON object per line)")
    return samples


def _image_array(path: Path, mode: str) -> np.ndarray:
    """One image as (1, h, w, c) bytes in PIL ``mode``."""
    array = np.array(_load_image(path).convert(mode))
    return (array[..., None] if array.ndim == 2 else array)[None]


def _frozen(frames: torch.Tensor) -> torch.Tensor:
    """(1, c, H, W) -> (16, c, H, W): a still image as a clip that does not move."""
    return frames.expand(PIXEL_FRAMES_PER_LAYER, *frames.shape[1:]).contiguous()


def _image_has_alpha(path: Path) -> bool:
    image = _load_image(path)
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _foreground(fg: Path, mask: Path | None, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Foreground layer, alpha layer (F, 3, H, W) in [-1, 1] and matte (F, 1, H, W) in [0, 1]."""
    if not is_image(fg) and (mask is None or not is_image(mask)):
        return read_foreground(fg, mask, num_frames=PIXEL_FRAMES_PER_LAYER, size=size)
    if not is_image(fg) or (mask is not None and not is_image(mask)):
        raise LayerSourceError(f"{fg}: a still foreground needs a still mask and a video one a video mask")
    if mask is None:
        if not _image_has_alpha(fg):
            raise LayerSourceError(f"{fg}: no alpha channel; give an RGBA image or inputs.mask")
        rgba = _image_array(fg, "RGBA")
        colour, matte = rgba[..., :3], rgba[..., 3:]
        mask_rgb = np.repeat(matte, 3, axis=-1)
    else:
        colour, matte, mask_rgb = _image_array(fg, "RGB"), _image_array(mask, "L"), _image_array(mask, "RGB")
        if matte.shape[1:3] != colour.shape[1:3]:
            raise LayerSourceError(f"{mask}: mask size {matte.shape[2]}x{matte.shape[1]} differs from {fg}")
    layer = matte_foreground(uint8_to_model(colour), uint8_to_unit(matte))  # (1, 3, h0, w0)
    alpha = resize_for_rectangle_crop(uint8_to_unit(matte), size).clamp(0.0, 1.0)
    return (
        _frozen(resize_for_rectangle_crop(layer, size)),
        _frozen(resize_for_rectangle_crop(uint8_to_model(mask_rgb), size)),
        _frozen(alpha),
    )


def _plain_layer(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Background or blend (F, 3, H, W) in [-1, 1], from a clip or a still image."""
    if is_image(path):
        return _frozen(resize_for_rectangle_crop(uint8_to_model(_image_array(path, "RGB")), size))
    return read_layer_video(path, num_frames=PIXEL_FRAMES_PER_LAYER, size=size)[:, :3]


def read_layers(sample: TrainingSample, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The sample's layers fg, alpha, bg, blend, each (16, 3, H, W) in [-1, 1]."""
    inputs = {name: Path(value) for name, value in sample.inputs.items()}
    fg, alpha_layer, matte = _foreground(inputs[Layer.FG], inputs.get(MASK_INPUT), size)
    bg = _plain_layer(inputs[Layer.BG], size)
    if Layer.BLEND in inputs:
        blend = _plain_layer(inputs[Layer.BLEND], size)
    else:
        blend = fg + (1 - matte) * bg  # fg is colour * alpha already: alpha * colour + (1 - alpha) * bg
    return {Layer.FG: fg, Layer.ALPHA: alpha_layer, Layer.BG: bg, Layer.BLEND: blend}


def stack_clip(sample: TrainingSample, layout: TaskLayout, size: tuple[int, int]) -> torch.Tensor:
    """All layers of the sample in the layout's order as one clip (1, 3, F, H, W) for the VAE.

    Raises :class:`SampleError` naming the sample and its line when a file cannot be used.
    """
    try:
        layers = read_layers(sample, size)
    except (LayerSourceError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SampleError(f"{sample.where or sample.id}: {first}") from None
    return stack_layers(layers, layout)  # (1, 3, F, H, W)
