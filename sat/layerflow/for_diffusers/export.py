"""One LayerFlow task checkpoint -> a folder that ``LayerFlowPipeline.from_pretrained`` loads.

The folder holds ``transformer/`` (CogVideoX's transformer with LayerFlow's layer embedding and the
content and motion LoRA as peft adapters, :mod:`layerflow.for_diffusers`), ``vae/``
(``AutoencoderKLCogVideoX``), ``scheduler/`` (:class:`LayerFlowDPMScheduler`), ``text_encoder/`` and
``tokenizer/`` (T5), and ``model_index.json`` naming the task and variant.

Where each part comes from is decided as for sampling (:func:`layerflow.weights.resolve.resolve_weights`):
the network from the checkpoint given, loaded strictly for the config's task and variant (a checkpoint of
another task or variant is one :class:`~layerflow.weights.checkpoint.CheckpointError` line); the VAE and T5
from the config's files, or, with ``model.weights: random`` (the tiny built-in model), the seeded random VAE
and the tiny T5 stand-in that ``layerflow demo`` uses. The folder is written under a temporary name and
renamed when complete; an existing folder that is not empty is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from layerflow.config import LayerFlowConfig
from layerflow.for_diffusers import transformer_from_sat
from layerflow.for_diffusers.pipeline import LayerFlowPipeline
from layerflow.for_diffusers.scheduler import LayerFlowDPMScheduler
from layerflow.for_diffusers.vae_keys import vae_to_diffusers
from layerflow.io.atomic import atomic_path
from layerflow.models.text_encoder import T5TextEncoder
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.sampling import SNR_SHIFT
from layerflow.weights.build import build_network, build_vae
from layerflow.weights.checkpoint import load_network
from layerflow.weights.resolve import resolve_weights


class ExportTargetError(ValueError):
    """The output folder cannot take the export (one line naming it)."""


def check_target(folder: Path) -> None:
    """The output must be a new path or an empty folder."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise ExportTargetError(f"{folder}: exists and is not a folder; give a new or empty folder")
    if any(folder.iterdir()):
        raise ExportTargetError(f"{folder}: folder is not empty; give a new or empty folder")


def with_checkpoint(config: LayerFlowConfig, checkpoint: str | Path) -> LayerFlowConfig:
    """``config`` with ``model.checkpoint`` set to the file or folder to export."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint=str(checkpoint)))


def build_pipeline(config: LayerFlowConfig, checkpoint: str | Path, dtype: torch.dtype) -> LayerFlowPipeline:
    """The diffusers pipeline of ``config``'s task with the network of ``checkpoint`` (loaded strictly)."""
    config = with_checkpoint(config, checkpoint)
    weights = resolve_weights(config)
    ensure_model_parallel()
    network = build_network(config, weights, load=False)
    load_network(network, checkpoint, config.layout)
    transformer = transformer_from_sat(network.state_dict(), config.network, dtype)
    del network
    vae = vae_to_diffusers(build_vae(config, "cpu", torch.float32, weights), config.video_size)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    t5 = T5TextEncoder.from_folder(weights.text_encoder, "cpu", dtype)
    scheduler = LayerFlowDPMScheduler(
        snr_shift_scale=SNR_SHIFT,
        guidance_exponent=config.sampling.guidance_exponent,
        faithful_rng=config.sampling.faithful_rng,
    )
    return LayerFlowPipeline(
        tokenizer=t5.tokenizer,
        text_encoder=t5.model,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        task=config.layout.task.value,
        variant=config.layout.variant.value,
    )


def export_to_diffusers(
    config: LayerFlowConfig, checkpoint: str | Path, folder: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the diffusers folder of ``config``'s task with ``checkpoint``'s network to ``folder`` (see the module)."""
    folder = Path(folder)
    check_target(folder)
    pipeline = build_pipeline(config, checkpoint, dtype)
    with atomic_path(folder, may_replace=lambda existing: existing.is_dir() and not any(existing.iterdir())) as staging:
        pipeline.save_pretrained(staging)
    return folder
