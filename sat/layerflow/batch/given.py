"""A sample's given layers: its files checked, read and traced, by the rules of the task table.

What a task takes (which layers, how many frames each, whether the foreground must bring its
matte) is data in :mod:`layerflow.tasks` (``TaskLayout.given_inputs``); this module applies it to
the files of one sample:

* an RGBA task's foreground brings its matte: RGBA frames, or an RGB clip plus a ``mask`` file;
* an RGB task's foreground is taken as it is when it has three channels; RGBA frames are first
  matted over grey, as the original data code does;
* background and blend are read as RGB;
* an input may be an earlier sample folder, whose matching file is used.

Legend: t frames, H/W pixel size.
"""

from __future__ import annotations

import torch

from layerflow.batch.manifest import Sample
from layerflow.config import LayerFlowConfig
from layerflow.io.reader import (
    check_layer_source,
    layer_provenance,
    read_foreground_layers,
    read_layer_video,
    resolve_layer_source,
)
from layerflow.tasks import MASK_INPUT, GivenInput, Layer


def _with_matte(given: GivenInput, sample: Sample) -> bool:
    """Whether the foreground is read together with its matte (the task needs it, or a mask was given)."""
    return given.needs_alpha or (given.layer == Layer.FG and MASK_INPUT in sample.inputs)


def _mask_source(sample: Sample):
    mask = sample.inputs.get(MASK_INPUT)
    return resolve_layer_source(mask, MASK_INPUT) if mask is not None else None


def check_given_layers(sample: Sample, config: LayerFlowConfig) -> None:
    """Cheap checks of a sample's given-layer files before any model loads: the errors reading would give."""
    for given in config.layout.given_inputs:
        source = resolve_layer_source(sample.inputs[given.layer], given.layer, _with_matte(given, sample))
        mask = _mask_source(sample) if given.takes_mask else None
        check_layer_source(source, given.pixel_frames, config.video_size, needs_alpha=given.needs_alpha, mask=mask)


def read_given_layers(sample: Sample, config: LayerFlowConfig) -> dict[str, torch.Tensor]:
    """The sample's given-layer files -> layer videos (t, 3, H, W) in [-1, 1], as the model takes them.

    An RGBA task also gets its ``alpha`` layer (the matte as three channels).
    """
    size = config.video_size
    layers: dict[str, torch.Tensor] = {}
    for given in config.layout.given_inputs:
        with_matte = _with_matte(given, sample)
        source = resolve_layer_source(sample.inputs[given.layer], given.layer, with_matte)
        if not with_matte:
            video = read_layer_video(source, num_frames=given.pixel_frames, size=size)  # (t, 3 or 4, H, W)
            if given.layer != Layer.FG or video.shape[1] == 3:
                layers[given.layer] = video[:, :3]
                continue
        fg, alpha_layer = read_foreground_layers(
            source, _mask_source(sample), num_frames=given.pixel_frames, size=size
        )  # (t, 3, H, W) each
        layers[Layer.FG] = fg
        if given.needs_alpha:
            layers[Layer.ALPHA] = alpha_layer
    return layers


def given_layer_sources(sample: Sample, config: LayerFlowConfig) -> dict[str, dict]:
    """Where each given file came from (absolute path; the file and sample when it is a sample folder)."""
    with_matte = any(_with_matte(given, sample) for given in config.layout.given_inputs)
    return {name: layer_provenance(source, name, with_matte) for name, source in sample.inputs.items()}
