"""The LayerFlow training objective: v-prediction on the zero-SNR schedule, given layers kept clean.

For clean latents x0 of the whole stacked clip, the layout splits off the given layers (they
enter the network clean, as at inference) and the other frames x are noised at a DDPM index
t ~ U{0, ..., 999}:

    a = sqrt(alpha-bar_t)  (zero-terminal-SNR table with SNR shift 3, :class:`ZeroSNRSchedule`)
    x_t = a x + sqrt(1 - a^2) eps
    x0_hat = a x_t - sqrt(1 - a^2) v_theta(x_t, t, text, given)
    loss = mean over the sample of  (x0_hat - x)^2 / (1 - a^2)

which is the squared error of v (the weight 1 / (1 - a^2) turns the x0 error back into a
v error). This is what the original's ``VideoDiffusionLoss`` computes with its ``VideoScaling``
denoiser; the index t itself is what the network sees as its timestep.

Legend: b batch, T latent frames (T_gen generated, T_cond given), c channels, h/w latent size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerflow.sampling import DDPM_STEPS, ZeroSNRSchedule
from layerflow.tasks import TaskLayout, insert_condition, remove_condition, split_condition


@dataclass
class NoisedBatch:
    """What one loss evaluation needs besides the network; every tensor has batch size b."""

    latents: torch.Tensor  # (b, T, c, h, w) clean latents of the whole clip
    context: torch.Tensor  # (b, L, e) text states
    timesteps: torch.Tensor  # (b,) DDPM indices in [0, 1000)
    noise: torch.Tensor  # (b, T_gen, c, h, w)
    lora_scale: torch.Tensor  # (b,) motion-LoRA switch per sample


def alpha_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """sqrt(alpha-bar) of the 1000 DDPM indices (zero terminal SNR, shift 3), float32: index 999 is 0."""
    return ZeroSNRSchedule().table.to(device)


def diffusion_loss(network, batch: NoisedBatch, layout: TaskLayout) -> torch.Tensor:
    """Per-sample loss (b,) of the batch; see the module docstring."""
    if int(batch.timesteps.min()) < 0 or int(batch.timesteps.max()) >= DDPM_STEPS:
        raise ValueError(f"timesteps must be DDPM indices in [0, {DDPM_STEPS}), got {batch.timesteps.tolist()}")
    latents = batch.latents.float()
    target = remove_condition(latents, layout)  # (b, T_gen, c, h, w)
    a = alpha_table(latents.device)[batch.timesteps].reshape(-1, 1, 1, 1, 1)  # (b, 1, 1, 1, 1)
    sigma = (1 - a**2) ** 0.5
    noised = target * a + batch.noise.float() * sigma  # (b, T_gen, c, h, w)
    if layout.condition is not None:  # the given layers enter clean, at their place in the stack
        noised_stack = insert_condition(noised, split_condition(latents, layout), layout)  # (b, T, c, h, w)
    else:
        noised_stack = noised
    v = remove_condition(
        network(noised_stack, batch.timesteps, batch.context, lora_scale=batch.lora_scale), layout
    )  # (b, T, c, h, w) -> (b, T_gen, c, h, w)
    denoised = v.float() * -sigma + noised * a
    weight = 1 / (1 - a**2)
    return (weight * (denoised - target) ** 2).reshape(target.shape[0], -1).mean(dim=1)  # (b,)
