"""LayerFlowDPMScheduler against our sampler (layerflow.sampling) on a toy denoiser with guidance."""

import pytest
import torch

pytest.importorskip("diffusers")

from layerflow.for_diffusers.scheduler import LayerFlowDPMScheduler  # noqa: E402
from layerflow.sampling import DynamicCFG, ZeroSNRSchedule, sample_vpsde_dpmpp_2m  # noqa: E402


def toy_model(x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A v-prediction that depends on x, t and the text (b, 1) so that guidance matters."""
    t = timesteps.float().view(-1, *([1] * (x.dim() - 1))) / 1000
    return torch.tanh(x) * (0.5 + t) + text.view(-1, *([1] * (x.dim() - 1))) * (1 - t)


def scheduler_loop(scheduler, noise, cond, uncond, steps, scale, generator):
    scheduler.set_timesteps(steps)
    weights = scheduler.guidance_weights(scale)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        batch = torch.full((x.shape[0],), int(t))
        v_uncond, v_cond = toy_model(x, batch, uncond), toy_model(x, batch, cond)
        x = scheduler.step(v_uncond + weights[i] * (v_cond - v_uncond), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("steps, faithful_rng", [(4, True), (7, False), (50, True)])
def test_scheduler_steps_like_our_sampler(steps, faithful_rng):
    shape, seed, scale = (2, 3, 4, 5), 7, 6.0
    cond, uncond = torch.tensor([[0.8], [-0.3]]), torch.zeros(2, 1)
    torch.manual_seed(seed)
    noise = torch.randn(shape)
    ours = sample_vpsde_dpmpp_2m(
        toy_model,
        noise,
        cond,
        uncond,
        ZeroSNRSchedule(steps),
        DynamicCFG(scale=scale),
        faithful_rng=faithful_rng,
        batched_guidance=False,
    )
    generator = torch.Generator().manual_seed(seed)
    their_noise = torch.randn(shape, generator=generator)
    assert torch.equal(their_noise, noise)
    theirs = scheduler_loop(
        LayerFlowDPMScheduler(faithful_rng=faithful_rng), their_noise, cond, uncond, steps, scale, generator
    )
    assert torch.isfinite(ours).all()
    # guidance mixes v here and the denoised estimate there: the same sum, rounded differently
    assert (theirs - ours).abs().max() <= 1e-5 * max(1.0, ours.abs().max().item())
    # without the discarded draw the stream shifts: the result must differ, proving the draw order is what matches
    other = scheduler_loop(
        LayerFlowDPMScheduler(faithful_rng=not faithful_rng),
        noise.clone(),
        cond,
        uncond,
        steps,
        scale,
        torch.Generator().manual_seed(seed),
    )
    if steps > 2:
        assert (other - ours).abs().max() > 1e-3


def test_config_round_trip_and_refusals(tmp_path):
    scheduler = LayerFlowDPMScheduler(faithful_rng=False)
    scheduler.save_pretrained(tmp_path)
    loaded = LayerFlowDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.faithful_rng is False and loaded.config.snr_shift_scale == 3.0
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        LayerFlowDPMScheduler(prediction_type="epsilon")
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="expects timestep 999"):
        scheduler.step(torch.zeros(1), 500, torch.zeros(1))


def test_weights_follow_dynamic_cfg():
    scheduler = LayerFlowDPMScheduler()
    scheduler.set_timesteps(5)
    assert scheduler.guidance_weights(6.0) == DynamicCFG(scale=6.0).weights(ZeroSNRSchedule(5))
    assert scheduler.timesteps.tolist() == ZeroSNRSchedule(5).timesteps.tolist()
