"""The sampler of the released LayerFlow checkpoints, as small pieces.

* :class:`ZeroSNRSchedule` — the zero-terminal-SNR DDPM discretization with an SNR shift
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; CogVideoX
  uses shift 3): the N-step subset of the 1000 DDPM steps and its re-normalisation.
* :func:`dynamic_cfg_scale` — CogVideoX's cosine-ramped classifier-free guidance weight.
* :func:`sample_vpsde_dpmpp_2m` — the stochastic DPM-Solver++(2M) update (Lu et al. 2022,
  "DPM-Solver++") on the VP-SDE with v-prediction, over a caller-given model function.

Everything reproduces the original's numbers and random-number order by default, quirks included
(each is an explicit, documented choice, never a silent fix):

* the guidance weight is computed from the DDPM timestep t (999, 979, ...) where the formula
  means the step number, so ``(S - t)/S`` is a large negative number;
* the v-prediction scaling uses the sampler's alpha snapped to the nearest entry of the
  1000-step table (the sampler's own subset is re-normalised, so they differ slightly);
* the middle steps draw a noise tensor that is thrown away (``faithful_rng=False`` skips it,
  which changes the random stream and therefore the result).

The sampler knows nothing about layers or tasks: the caller closes text, given latents and the
task into ``model_fn(x, timesteps, text) -> v``.

Legend: S steps, b batch, x any latent shape (b, ...), L text tokens, e text width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DDPM_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
SNR_SHIFT = 3.0

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]
"""Called after each step with the step index (0 .. S-1) and the latents x after that step."""


def shifted_alphas_cumprod(shift: float = SNR_SHIFT) -> np.ndarray:
    """alpha-bar of the 1000 DDPM steps (betas linear in sqrt), with log-SNR lowered by log(shift). (1000,) f64.

    The betas come from ``torch.linspace`` as in the original: ``np.linspace`` differs in the last bit
    of some float64 entries (the float32 tables that follow happen to be the same).
    """
    betas = (torch.linspace(BETA_START**0.5, BETA_END**0.5, DDPM_STEPS, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = np.cumprod(1.0 - betas)
    return alphas_cumprod / (shift + (1 - shift) * alphas_cumprod)


def zero_snr_sqrt_alphas(alphas_cumprod: np.ndarray) -> torch.Tensor:
    """sqrt(alpha-bar) rescaled so the last entry is exactly 0 (zero terminal SNR), in float32. Same order."""
    root = torch.tensor(alphas_cumprod, dtype=torch.float32).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return (root - last) * (first / (first - last))


def subset_timesteps(num_steps: int) -> np.ndarray:
    """The DDPM steps a num_steps sampler visits, ascending (e.g. 0, 20, ..., 999 for 50)."""
    if not 2 <= num_steps <= DDPM_STEPS:
        raise ValueError(f"num_steps must be in 2..{DDPM_STEPS} (one step rescales by 0/0), got {num_steps}")
    return np.linspace(DDPM_STEPS - 1, 0, num_steps, endpoint=False).astype(int)[::-1]


@dataclass(frozen=True)
class ZeroSNRSchedule:
    """The sampler's noise levels and timesteps, computed once before the loop.

    ``alphas`` has S+1 entries sqrt(alpha-bar) from 0 (pure noise) to 1 (clean);
    ``timesteps`` has the S DDPM indices fed to the network, from 999 down;
    ``table`` is the denoiser's own 1000-entry sqrt(alpha-bar) table used to snap alphas.
    """

    num_steps: int = 50
    shift: float = SNR_SHIFT

    def __post_init__(self) -> None:
        subset_timesteps(self.num_steps)
        if self.shift <= 0:
            raise ValueError(f"the SNR shift must be positive, got {self.shift}")

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.tensor(subset_timesteps(self.num_steps)[::-1].copy())  # (S,) descending

    @property
    def alphas(self) -> torch.Tensor:
        subset = shifted_alphas_cumprod(self.shift)[subset_timesteps(self.num_steps)]
        ascending_t = zero_snr_sqrt_alphas(subset)  # (S,) for t ascending: decreasing alphas
        return torch.cat([ascending_t.flip(0), torch.ones(1)])  # (S+1,)

    @property
    def table(self) -> torch.Tensor:
        return zero_snr_sqrt_alphas(shifted_alphas_cumprod(self.shift))  # (1000,)

    def snapped(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each alpha snapped to the nearest table entry, and that entry's index."""
        table = self.table
        index = (alphas[None, :] - table[:, None]).abs().argmin(dim=0)
        return table[index], index


def dynamic_cfg_scale(scale: float, exponent: float, num_steps: int, timestep: int) -> float:
    """CogVideoX's guidance weight 1 + scale (1 - cos(pi ((S - t)/S)^exponent)) / 2, with t the DDPM
    timestep as the original passes it (see the module docstring); float64."""
    step_index = num_steps - timestep
    return 1 + scale * (1 - math.cos(math.pi * (step_index / num_steps) ** exponent)) / 2


@dataclass(frozen=True)
class DynamicCFG:
    """Dynamic classifier-free guidance: ``uncond + w (cond - uncond)``, w from :func:`dynamic_cfg_scale`."""

    scale: float = 6.0
    exponent: float = 5.0

    def __post_init__(self) -> None:
        if float(self.exponent) != int(self.exponent):
            raise ValueError(
                f"the guidance exponent must be a whole number: the ramp raises (S - t)/S < 0 "
                f"to it, got {self.exponent}"
            )

    def weights(self, schedule: ZeroSNRSchedule) -> list[float]:
        return [dynamic_cfg_scale(self.scale, self.exponent, schedule.num_steps, int(t)) for t in schedule.timesteps]


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step scalars of the DPM-Solver++(2M) SDE update, all (S,) float32 tensors."""

    c_skip: torch.Tensor  # snapped alpha: denoised = c_skip x + c_out v
    c_out: torch.Tensor  # -sqrt(1 - snapped alpha^2)
    x_mult: torch.Tensor  # sqrt((1-a_next^2)/(1-a^2)) e^-h
    denoised_mult: torch.Tensor  # expm1(-2h) a_next
    noise_mult: torch.Tensor  # sqrt(1-a_next^2) sqrt(1 - e^-2h)
    correction_now: torch.Tensor  # 1 + 1/(2r)
    correction_last: torch.Tensor  # 1/(2r)


def half_log_snr(a: torch.Tensor) -> torch.Tensor:
    """lambda = log(a / sqrt(1 - a^2)), written as the original does: a = 0 gives -inf, a = 1 gives inf."""
    return ((a**2 / (1 - a**2)) ** 0.5).log()


def step_coefficients(schedule: ZeroSNRSchedule) -> StepCoefficients:
    """Precompute every step's scalars in float32 as the original computes them (inf/0 at step 0 included)."""
    alphas = schedule.alphas  # (S+1,)
    a, a_next = alphas[:-1], alphas[1:]
    lamb, lamb_next = half_log_snr(a), half_log_snr(a_next)
    h = lamb_next - lamb  # (S,)
    lamb_prev = torch.cat([torch.full((1,), float("nan")), lamb[:-1]])
    r = (lamb - lamb_prev) / h  # step 0 has no previous step (unused)
    snapped, _ = schedule.snapped(a)
    return StepCoefficients(
        c_skip=snapped,
        c_out=-((1 - snapped**2) ** 0.5),
        x_mult=((1 - a_next**2) / (1 - a**2)) ** 0.5 * (-h).exp(),
        denoised_mult=(-2 * h).expm1() * a_next,
        noise_mult=(1 - a_next**2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5,
        correction_now=1 + 1 / (2 * r),
        correction_last=1 / (2 * r),
    )


def guided_v(
    model_fn: ModelFn, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional and conditional predictions; one batch of 2b (uncond first) or two passes of b."""
    b = x.shape[0]
    if batched:
        v = model_fn(torch.cat([x, x]), timestep.expand(2 * b), torch.cat([uncond, cond]))
        return v[:b], v[b:]
    return model_fn(x, timestep.expand(b), uncond), model_fn(x, timestep.expand(b), cond)


def sample_vpsde_dpmpp_2m(
    model_fn: ModelFn,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    schedule: ZeroSNRSchedule,
    guidance: DynamicCFG,
    *,
    faithful_rng: bool = True,
    batched_guidance: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Stochastic DPM-Solver++(2M) from ``noise`` (b, ...) to clean latents (b, ...), in float32.

    ``model_fn(x, timesteps, text)`` returns the v-prediction for x (n, ...) at DDPM timesteps (n,)
    with text states (n, L, e). Noise is drawn with ``torch.randn_like`` from the global generator
    (the device's generator on CUDA), in the original's order; see the module docstring. To start
    where the original starts, draw ``noise`` as it does: ``torch.manual_seed(seed)``, then
    ``torch.randn(shape).to(device)`` (the CPU generator, whatever the device).
    """
    coeffs = step_coefficients(schedule)
    weights = guidance.weights(schedule)
    device = noise.device
    moved = {name: value.to(device) for name, value in vars(coeffs).items()}
    timesteps = schedule.timesteps.to(device=device, dtype=torch.float32)
    x = noise.to(torch.float32)
    old_denoised = None
    last = schedule.num_steps - 1
    x_mult, denoised_mult, noise_mult = moved["x_mult"], moved["denoised_mult"], moved["noise_mult"]
    for i in range(schedule.num_steps):
        v_uncond, v_cond = guided_v(model_fn, x, timesteps[i : i + 1], cond, uncond, batched_guidance)
        denoised_uncond = moved["c_skip"][i] * x + moved["c_out"][i] * v_uncond.float()
        denoised_cond = moved["c_skip"][i] * x + moved["c_out"][i] * v_cond.float()
        denoised = denoised_uncond + weights[i] * (denoised_cond - denoised_uncond)
        if i == last:
            x = denoised
        elif old_denoised is None:
            x = x_mult[i] * x - denoised_mult[i] * denoised + noise_mult[i] * torch.randn_like(x)
        else:
            if faithful_rng:
                torch.randn_like(x)  # the original draws the first-order update's noise, then discards it
            corrected = moved["correction_now"][i] * denoised - moved["correction_last"][i] * old_denoised
            x = x_mult[i] * x - denoised_mult[i] * corrected + noise_mult[i] * torch.randn_like(x)
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x
