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

Legend: t frames, H/W pixel size.
"""

from __future__ import annotations

import torch

from layerflow.batch.manifest import Sample
from layerflow.config import LayerFlowConfig
from layerflow.io.reader import (
    PICK_ONE_FOR_ONE,
    check_layer_source,
    layer_provenance,
    read_foreground_layers,
    read_layer_video,
    resolve_layer_source,
)
from layerflow.tasks import MASK_INPUT, GivenInput


def _with_matte(given: GivenInput, sample: Sample) -> bool:
    """Whether the foreground is read together with its matte (the task needs it, or a mask was given)."""
    return given.needs_alpha or (given.layer == "fg" and MASK_INPUT in sample.inputs)


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
        if given.layer != "fg" or video.shape[1] == 3:
            return {given.layer: video[:, :3]}
    fg, alpha_layer = read_foreground_layers(
        source, _mask_source(sample), num_frames=given.pixel_frames, size=size, pick=PICK_ONE_FOR_ONE
    )  # (t, 3, H, W) each
    return {"fg": fg, "alpha": alpha_layer} if given.needs_alpha else {"fg": fg}


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
