"""Our CogVideoX VAE (:class:`~layerflow.models.vae.CausalVideoVAE`, SAT keys) <-> ``AutoencoderKLCogVideoX``.

The two networks are the same layers under other names; :func:`diffusers_vae_key` renames one SAT key
and the mapping is strict both ways (every key mapped once, none left, same shapes), else
:class:`VAEExportError` names the keys. Renames, SAT -> diffusers:

* ``encoder.down.i.block.j.`` -> ``down_blocks.i.resnets.j.``,
  ``down.i.downsample.`` -> ``down_blocks.i.downsamplers.0.``;
* ``decoder.up.i.`` -> ``up_blocks.(n-1-i).``: SAT numbers the decoder's levels by resolution (level 0
  is the last to run), diffusers in the order they run; ``upsample.`` -> ``upsamplers.0.``;
* ``mid.block_1.``/``mid.block_2.`` -> ``mid_block.resnets.0.``/``.1.``; ``nin_shortcut`` -> ``conv_shortcut``.

Frames at once. diffusers encodes 8 pixel frames and decodes 2 latent frames at a time, carrying the
causal convolutions' cache between the pieces; every GroupNorm then sees one piece only, so the result
differs from our one-call encode/decode (the original LayerFlow's). :func:`whole_clip` lets the diffusers
VAE take the whole clip in one call, which is what :class:`~layerflow.for_diffusers.pipeline.LayerFlowPipeline`
does by default; spatial tiling (``vae.enable_tiling()``) still applies.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import torch
from diffusers import AutoencoderKLCogVideoX

from layerflow.geometry import VAE_SPATIAL_COMPRESSION
from layerflow.models.vae import CausalVideoVAE, VAEConfig
from layerflow.models.vae_blocks import NORM_EPS

BLOCK_TYPES = {"encoder": "CogVideoXDownBlock3D", "decoder": "CogVideoXUpBlock3D"}


class VAEExportError(ValueError):
    """VAE weights that do not map one to one between our layout and diffusers' (the message names the keys)."""


def diffusers_vae_config(config: VAEConfig, video_size: tuple[int, int]) -> dict:
    """The ``AutoencoderKLCogVideoX`` config of our VAE sizes; ``video_size`` (H, W) pixels sets its tiling sizes."""
    levels = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=(BLOCK_TYPES["encoder"],) * levels,
        up_block_types=(BLOCK_TYPES["decoder"],) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        latent_channels=config.z_channels,
        layers_per_block=config.num_res_blocks,
        act_fn="silu",
        norm_eps=NORM_EPS,
        norm_num_groups=config.norm_groups,
        temporal_compression_ratio=config.temporal_compress_times,
        sample_height=video_size[0],
        sample_width=video_size[1],
        scaling_factor=config.scale_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def vae_config_from_diffusers(config: Mapping) -> VAEConfig:
    """Our :class:`VAEConfig` of an ``AutoencoderKLCogVideoX`` config (the inverse of :func:`diffusers_vae_config`)."""
    widths = tuple(config["block_out_channels"])
    if any(width % widths[0] for width in widths):
        raise VAEExportError(f"block_out_channels {widths} are not multiples of the first width")
    return VAEConfig(
        ch=widths[0],
        ch_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=config["layers_per_block"],
        z_channels=config["latent_channels"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        temporal_compress_times=int(config["temporal_compression_ratio"]),
        norm_groups=config["norm_num_groups"],
        scale_factor=config["scaling_factor"],
    )


_RENAMES = (
    (re.compile(r"^(encoder)\.down\.(\d+)\.block\.(\d+)\."), r"\1.down_blocks.\2.resnets.\3."),
    (re.compile(r"^(encoder)\.down\.(\d+)\.downsample\."), r"\1.down_blocks.\2.downsamplers.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\."), r"\1.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\."), r"\1.mid_block.resnets.1."),
)
_DECODER_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.")


def diffusers_vae_key(key: str, levels: int) -> str:
    """One SAT VAE key -> its diffusers name (``levels`` = len(ch_mult)); a key no rule covers is kept as is."""
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    level = _DECODER_LEVEL.match(key)
    if level:
        up = levels - 1 - int(level.group(1))
        inner = f"resnets.{level.group(3)}" if level.group(3) is not None else "upsamplers.0"
        key = f"decoder.up_blocks.{up}.{inner}." + key[level.end() :]
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _check_one_to_one(renamed: Mapping[str, str], expected: Mapping[str, tuple], source: Mapping, what: str) -> None:
    """Every source key lands on a distinct expected key of the same shape, and every expected key is hit."""
    landed = set(renamed.values())
    unmapped = [key for key, target in renamed.items() if target not in expected]
    missing = [key for key in expected if key not in landed]
    if len(landed) != len(renamed) or unmapped or missing:
        raise VAEExportError(
            f"{what}: keys do not map one to one: not mapped {_listing(unmapped) or 'none'}; "
            f"left without a source {_listing(missing) or 'none'}"
        )
    wrong = [
        f"{key} {tuple(source[key].shape)} vs {expected[target]}"
        for key, target in renamed.items()
        if tuple(source[key].shape) != expected[target]
    ]
    if wrong:
        raise VAEExportError(f"{what}: shapes differ: {_listing(wrong, 4)}")


def diffusers_vae_state(state: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE's state dict (SAT keys) -> the ``AutoencoderKLCogVideoX`` state dict, strictly."""
    levels = len(config.ch_mult)
    with torch.device("meta"):
        target = AutoencoderKLCogVideoX(**diffusers_vae_config(config, (8 * VAE_SPATIAL_COMPRESSION,) * 2))
    expected = {key: tuple(value.shape) for key, value in target.state_dict().items()}
    renamed = {key: diffusers_vae_key(key, levels) for key in state}
    _check_one_to_one(renamed, expected, state, "VAE (ours -> diffusers)")
    return {renamed[key]: value for key, value in state.items()}


def sat_vae_state(state: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKLCogVideoX`` state dict -> our VAE's (SAT keys), strictly (the inverse renaming)."""
    levels = len(config.ch_mult)
    with torch.device("meta"):
        ours = CausalVideoVAE(config)
    back = {diffusers_vae_key(key, levels): key for key in ours.state_dict()}
    expected = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    renamed = {key: back.get(key, key) for key in state}
    _check_one_to_one(renamed, expected, state, "VAE (diffusers -> ours)")
    return {renamed[key]: value for key, value in state.items()}


def vae_to_diffusers(vae: CausalVideoVAE, video_size: tuple[int, int]) -> AutoencoderKLCogVideoX:
    """Our VAE as an ``AutoencoderKLCogVideoX`` with the same weights (float32 copies), in eval mode."""
    state = diffusers_vae_state({key: value.float() for key, value in vae.state_dict().items()}, vae.config)
    model = AutoencoderKLCogVideoX(**diffusers_vae_config(vae.config, video_size))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def vae_from_diffusers(model: AutoencoderKLCogVideoX) -> CausalVideoVAE:
    """An ``AutoencoderKLCogVideoX`` as our VAE (the round trip of :func:`vae_to_diffusers`), in eval mode."""
    config = vae_config_from_diffusers(model.config)
    ours = CausalVideoVAE(config)
    ours.load_state_dict(sat_vae_state(model.state_dict(), config), strict=True)
    return ours.to(next(model.parameters()).dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def whole_clip(vae: AutoencoderKLCogVideoX, pixel_frames: int, latent_frames: int) -> Iterator[None]:
    """Inside, the diffusers VAE encodes ``pixel_frames`` and decodes ``latent_frames`` in one call, like ours."""
    saved = vae.num_sample_frames_batch_size, vae.num_latent_frames_batch_size
    vae.num_sample_frames_batch_size, vae.num_latent_frames_batch_size = pixel_frames, latent_frames
    try:
        yield
    finally:
        vae.num_sample_frames_batch_size, vae.num_latent_frames_batch_size = saved
