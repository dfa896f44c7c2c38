"""Our sampler as a diffusers scheduler: VP-SDE DPM-Solver++(2M), zero terminal SNR, SNR shift 3.

diffusers' ``CogVideoXDPMScheduler`` (``rescale_betas_zero_snr=True``, ``snr_shift_scale=3``,
``timestep_spacing="trailing"``) visits the same timesteps but does not take the same steps: it rescales
the whole 1000-step table to zero terminal SNR, where the original (and :mod:`layerflow.sampling`)
rescales the N-step subset it visits, and it converts v to x0 with the table's alpha where ours snaps
the sampler's alpha to the table. Its alphas differ from ours by up to 1.5e-2 at 4 steps and 1e-3 at 50,
so :class:`LayerFlowDPMScheduler` is ours: its ``step`` is :func:`layerflow.sampling.sample_vpsde_dpmpp_2m`'s
loop body, on the coefficients :func:`layerflow.sampling.step_coefficients` computes, and
:meth:`LayerFlowDPMScheduler.guidance_weights` gives the dynamic CFG weight of each step.

Random numbers: each step after the first draws its noise like ours (the middle steps draw one more
tensor and drop it, ``faithful_rng``), from ``generator`` when given, else from the global generator as
``torch.randn_like``. A CPU generator seeded like ``torch.manual_seed`` gives the same numbers.

Legend: b batch, x any latent shape (b, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from layerflow.sampling import (
    BETA_END,
    BETA_START,
    DDPM_STEPS,
    SNR_SHIFT,
    DynamicCFG,
    StepCoefficients,
    ZeroSNRSchedule,
    step_coefficients,
)

# What the config must say: the sampler computes these itself (sampling.py), so another value is refused.
FIXED_CONFIG = {
    "num_train_timesteps": DDPM_STEPS,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
}


@dataclass
class LayerFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: x after the step (b, ...); ``pred_original_sample``: the step's denoised estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class LayerFlowDPMScheduler(SchedulerMixin, ConfigMixin):
    """The stochastic DPM-Solver++(2M) sampler of the released LayerFlow checkpoints (see the module docstring).

    ``step`` must be called once per entry of ``timesteps``, in order, after :meth:`set_timesteps`.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = DDPM_STEPS,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        beta_schedule: str = "scaled_linear",
        rescale_betas_zero_snr: bool = True,
        timestep_spacing: str = "trailing",
        prediction_type: str = "v_prediction",
        snr_shift_scale: float = SNR_SHIFT,
        guidance_exponent: float = 5.0,
        faithful_rng: bool = True,
    ):
        given = dict(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            timestep_spacing=timestep_spacing,
            prediction_type=prediction_type,
        )
        wrong = [
            f"{name}={value!r} (expected {FIXED_CONFIG[name]!r})"
            for name, value in given.items()
            if value != FIXED_CONFIG[name]
        ]
        if wrong:
            raise ValueError(f"LayerFlowDPMScheduler reproduces one sampler only: {', '.join(wrong)}")
        DynamicCFG(exponent=guidance_exponent)  # checks the exponent
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._coefficients: StepCoefficients | None = None
        self._schedule: ZeroSNRSchedule | None = None
        self._step_index = 0
        self._old_denoised: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """The ``num_inference_steps`` DDPM timesteps (999 down) and every step's coefficients; resets the state."""
        self._schedule = ZeroSNRSchedule(num_steps=num_inference_steps, shift=self.config.snr_shift_scale)
        coefficients = step_coefficients(self._schedule)
        self._coefficients = StepCoefficients(**{k: v.to(device or "cpu") for k, v in vars(coefficients).items()})
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._schedule.timesteps.to(device or "cpu")  # (S,) int64, descending
        self._step_index = 0
        self._old_denoised = None

    def guidance_weights(self, guidance_scale: float) -> list[float]:
        """The dynamic CFG weight w of each step: ``uncond + w (cond - uncond)`` (:class:`DynamicCFG`)."""
        if self._schedule is None:
            raise RuntimeError("call set_timesteps before guidance_weights")
        return DynamicCFG(scale=guidance_scale, exponent=self.config.guidance_exponent).weights(self._schedule)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The network takes x as it is (VP-SDE, v-prediction)."""
        return sample

    def _noise(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> LayerFlowSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One update from the (guided) v-prediction ``model_output`` at ``timestep`` for ``sample`` (b, ...)."""
        c, i = self._coefficients, self._step_index
        if c is None or i >= len(self.timesteps):
            raise RuntimeError(f"step {i + 1} of {len(self.timesteps)}: call set_timesteps first (once per run)")
        if int(timestep) != int(self.timesteps[i]):
            raise ValueError(f"step {i} expects timestep {int(self.timesteps[i])}, got {int(timestep)}")
        x = sample.float()
        denoised = c.c_skip[i] * x + c.c_out[i] * model_output.float()
        if i == len(self.timesteps) - 1:
            x = denoised
        elif self._old_denoised is None:
            x = c.x_mult[i] * x - c.denoised_mult[i] * denoised + c.noise_mult[i] * self._noise(x, generator)
        else:
            if self.config.faithful_rng:
                self._noise(x, generator)  # the original draws the first-order update's noise, then discards it
            corrected = c.correction_now[i] * denoised - c.correction_last[i] * self._old_denoised
            x = c.x_mult[i] * x - c.denoised_mult[i] * corrected + c.noise_mult[i] * self._noise(x, generator)
        self._old_denoised = denoised
        self._step_index += 1
        if not return_dict:
            return x, denoised
        return LayerFlowSchedulerOutput(prev_sample=x, pred_original_sample=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
