"""A sample's given layers: its files checked, read and traced, by the rules of the task table.

What a task takes (which layers, how many frames each, whether the foreground must bring its
matte) is data in :mod:`layerflow.tasks` (``TaskLayout.given_inputs``); this module applies it to
the files of one sample:

* an RGBA task's foreground brings its matte: RGBA frames, or an RGB clip plus a ``mask`` file;
* an RGB task's foreground is taken as it is when it has three channels; RGBA frames are first
  matted over grey, as the original data code does;
* background and blend are read as RGB;
* an input may be an earlier sample folder, whose matching file is used, or a still image (held);
* frames are taken one for one (frames 0, 1, ... of the clip, the last one held if it is short);
  ``meta.json`` records which (``given_sources.<layer>.frames``).
* the sample folder keeps every given input as it was given (:func:`kept_given_files`), next to
  the model's re-decode of each given layer (``given_<layer>.mp4``).

Legend: t frames, H/W pixel size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from layerflow.batch.manifest import Sample
from layerflow.config import LayerFlowConfig
from layerflow.io.reader import (
    FRAME_SUFFIXES,
    PICK_ONE_FOR_ONE,
    check_layer_source,
    layer_provenance,
    read_foreground_layers,
    read_layer_video,
    resolve_layer_source,
)
from layerflow.io.sample_files import given_video, kept_given_path
from layerflow.tasks import MASK_INPUT, GivenInput, Layer

# The layers of the model input that each given input goes into (the mask mattes the foreground and
# is the alpha layer); a sample writes each of those layers as ``given_<layer>.mp4``.
INPUT_FEEDS = {"fg": ("fg", "alpha"), MASK_INPUT: ("fg", "alpha"), "bg": ("bg",), "blend": ("blend",)}


def _with_matte(given: GivenInput, sample: Sample) -> bool:
    """Whether the foreground is read together with its matte (the task needs it, or a mask was given)."""
    return given.needs_alpha or (given.layer == Layer.FG and MASK_INPUT in sample.inputs)


def _mask_source(sample: Sample):
    mask = sample.inputs.get(MASK_INPUT)
    return resolve_layer_source(mask, MASK_INPUT) if mask is not None else None


def check_given_layers(sample: Sample, config: LayerFlowConfig, checked: set | None = None) -> None:
    """Check a sample's given-layer files before any model loads: the errors reading them would give.

    A video is decoded by the check itself; a folder of frames is read in full, so that a frame that
    does not decode, has another size or lacks the alpha of the others stops the run here, not after
    the model has loaded. ``checked`` (one set per run) holds the files already checked: files that
    every sample shares (``--input``) are checked, and warned about, once.
    """
    size = config.video_size
    for given in config.layout.given_inputs:
        with_matte = _with_matte(given, sample)
        source = resolve_layer_source(sample.inputs[given.layer], given.layer, with_matte)
        mask = _mask_source(sample) if given.takes_mask else None
        key = (given, with_matte, source, mask, size)
        if checked is not None and key in checked:
            continue
        check_layer_source(
            source, given.pixel_frames, size, needs_alpha=given.needs_alpha, mask=mask, pick=PICK_ONE_FOR_ONE
        )
        if source.is_dir() or (mask is not None and mask.is_dir()):
            _read_given_layer(given, sample, size)
        if checked is not None:
            checked.add(key)


def _read_given_layer(given: GivenInput, sample: Sample, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One given layer of ``sample`` as model pixels (t, 3, H, W); the foreground of an RGBA task
    comes with its ``alpha`` layer."""
    with_matte = _with_matte(given, sample)
    source = resolve_layer_source(sample.inputs[given.layer], given.layer, with_matte)
    if not with_matte:
        video = read_layer_video(
            source, num_frames=given.pixel_frames, size=size, pick=PICK_ONE_FOR_ONE
        )  # (t, 3 or 4, H, W)
        if given.layer != Layer.FG or video.shape[1] == 3:
            return {given.layer: video[:, :3]}
    fg, alpha_layer = read_foreground_layers(
        source, _mask_source(sample), num_frames=given.pixel_frames, size=size, pick=PICK_ONE_FOR_ONE
    )  # (t, 3, H, W) each
    return {Layer.FG: fg, Layer.ALPHA: alpha_layer} if given.needs_alpha else {Layer.FG: fg}


def read_given_layers(sample: Sample, config: LayerFlowConfig) -> dict[str, torch.Tensor]:
    """The sample's given-layer files -> layer videos (t, 3, H, W) in [-1, 1], as the model takes them.

    An RGBA task also gets its ``alpha`` layer (the matte as three channels).
    """
    layers: dict[str, torch.Tensor] = {}
    for given in config.layout.given_inputs:
        layers.update(_read_given_layer(given, sample, config.video_size))
    return layers


def given_layer_sources(sample: Sample, config: LayerFlowConfig) -> dict[str, dict]:
    """Where each given file came from (absolute path; the file and sample when it is a sample folder) and
    which of its frames were used (``frames``: the source frame of each of the layer's frames)."""
    with_matte = any(_with_matte(given, sample) for given in config.layout.given_inputs)
    frames = {given.layer: given.pixel_frames for given in config.layout.given_inputs}
    if MASK_INPUT in sample.inputs and "fg" in frames:
        frames[MASK_INPUT] = frames["fg"]
    return {
        name: layer_provenance(source, name, with_matte, num_frames=frames.get(name), pick=PICK_ONE_FOR_ONE)
        for name, source in sample.inputs.items()
    }


def given_layer_file(sample: Sample, config: LayerFlowConfig, name: str) -> Path:
    """The file or frame folder that given input ``name`` is read from (a sample folder's file resolved)."""
    with_matte = any(_with_matte(given, sample) for given in config.layout.given_inputs)
    return resolve_layer_source(sample.inputs[name], name, with_matte)


def given_layer_files(sample: Sample, config: LayerFlowConfig) -> dict[str, Path]:
    """:func:`given_layer_file` of every given input, by input name."""
    return {name: given_layer_file(sample, config, name) for name in sample.inputs}


def source_files(source: Path) -> list[Path]:
    """The files that make a given source: the file itself, or a frame folder's frames in name order
    (the files the reader takes: those with a frame suffix)."""
    if not source.is_dir():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def kept_given_files(sample: Sample, config: LayerFlowConfig) -> dict[str, Path]:
    """Every file of every given input by its place in the sample folder (``given/<input>/<name>...``),
    to be copied there byte for byte."""
    files = {}
    for name, source in given_layer_files(sample, config).items():
        for file in source_files(source):
            inside = file.relative_to(source) if source.is_dir() else None
            files[kept_given_path(name, source, inside)] = file
    return files


def given_layer_record(
    sample: Sample, config: LayerFlowConfig, given: Mapping[str, torch.Tensor], content: Mapping[str, str]
) -> dict[str, dict]:
    """``meta.json``'s ``given_layers``: per given input, the kept copy (as given, lossless), its content
    hash and the re-decoded files of the layers it went into (as the model took them)."""
    record = {}
    for name, source in given_layer_files(sample, config).items():
        record[name] = {
            "as_given": kept_given_path(name, source),
            "content": content.get(name),
            "as_model_input": [given_video(layer) for layer in INPUT_FEEDS[name] if layer in given],
        }
    return record
