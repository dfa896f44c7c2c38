"""The one place each model is built: the network, the VAE and the T5 encoder, with the weights of a run.

Sampling (:mod:`layerflow.pipeline`), training (:mod:`layerflow.training`) and the benchmarks build
their models here, from the config and the decisions made once for the run and passed down:

* where the weights come from, a :class:`~layerflow.weights.resolve.Weights` record
  (:func:`~layerflow.weights.resolve.resolve_weights`): the release files, or seeded random weights
  (the network from ``sampling.seed``, the VAE from ``sampling.seed + 1``);
* for inference, the device and precision (:class:`~layerflow.runtime.devices.Placement`) and the
  speed path (:class:`~layerflow.runtime.devices.SpeedPlan`: merged LoRA, attention kernel, compiled
  blocks), both from :mod:`layerflow.runtime.devices`.
"""

from __future__ import annotations

import torch

from layerflow.config import LayerFlowConfig
from layerflow.models.dit import LayerFlowDiT
from layerflow.models.text_encoder import T5TextEncoder
from layerflow.models.vae import CausalVideoVAE
from layerflow.runtime.devices import Placement, SpeedPlan
from layerflow.weights.checkpoint import load_network
from layerflow.weights.random import randomize_
from layerflow.weights.resolve import Weights, resolve_weights
from layerflow.weights.vae import load_vae


def build_network(config: LayerFlowConfig, weights: Weights | None = None, load: bool = True) -> LayerFlowDiT:
    """The network of ``config`` in float32 on the CPU, with the run's weights (:func:`load_weights`);
    ``load=False`` leaves it as constructed, for a caller that fills it itself.

    SAT's model-parallel group must exist (:func:`layerflow.runtime.distributed.ensure_model_parallel`).
    """
    network = LayerFlowDiT(config.network, device="cpu", dtype=torch.float32)
    if load:
        load_weights(network, config, weights)
    return network


def load_weights(network: LayerFlowDiT, config: LayerFlowConfig, weights: Weights | None = None) -> None:
    """Fill ``network`` with the run's weights: seeded random ones (``sampling.seed``) or the task checkpoint."""
    weights = weights or resolve_weights(config, check=False)
    if weights.random:
        randomize_(network, config.sampling.seed)
    else:
        load_network(network, weights.checkpoint, config.layout)


def build_inference_network(
    config: LayerFlowConfig, weights: Weights, placement: Placement, speed: SpeedPlan
) -> LayerFlowDiT:
    """:func:`build_network` made ready to sample: the speed path applied, frozen, in the run's dtype, on
    the compute device (on the CPU with ``runtime.model_cpu_offload``, moved over while it runs)."""
    network = build_network(config, weights)
    if speed.merge_lora:
        network.merge_lora_content()
    network = network.to(dtype=placement.dtype).eval().requires_grad_(False)
    network.use_attention(speed.attention)
    if speed.compile:
        # compiled lazily at the first call and reused by every layer and step; under ``auto`` a
        # compiler failure falls back to eager blocks rather than stopping the run
        network.compile_blocks(strict=config.runtime.compile is True)
    return network.to(placement.compute_device) if not placement.offload else network


def build_vae(
    config: LayerFlowConfig, device: torch.device | str, dtype: torch.dtype, weights: Weights | None = None
) -> CausalVideoVAE:
    """The VAE of ``config`` (``model.vae`` sizes), frozen, on ``device`` in ``dtype``: seeded random
    weights or ``model.vae.path``."""
    weights = weights or resolve_weights(config, check=False)
    sizes = config.model.vae.sizes
    if weights.random:
        vae = randomize_(CausalVideoVAE(sizes), config.sampling.seed + 1)
    else:
        vae = load_vae(weights.vae, sizes)
    return vae.eval().requires_grad_(False).to(device=device, dtype=dtype)


def build_text_encoder(weights: Weights, device: torch.device | str, dtype: torch.dtype) -> T5TextEncoder:
    """The T5 encoder of the run's weights (the configured folder, or the tiny stand-in) on ``device``."""
    return T5TextEncoder.from_folder(weights.text_encoder, device=device, dtype=dtype)
