"""The sampler: reference sampling runs, schedule facts, RNG order, and a toy problem with a known answer."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import reference_cases
from reference import case_config, case_dit_config, case_layout, load_pt

from layerflow.checkpoint import load_network
from layerflow.dit import LayerFlowDiT
from layerflow.sampling import DynamicCFG, ZeroSNRSchedule, sample_vpsde_dpmpp_2m

CASES = reference_cases()


def reference_model_fn(case_dir, recorded):
    model = LayerFlowDiT(case_dit_config(case_dir))
    layout = case_layout(case_dir)
    load_network(model, case_dir / "ckpt", layout)
    condition = recorded.get("cond_latent")
    start = layout.condition[0] if layout.condition is not None else 0

    def model_fn(x, timesteps, text):
        given = None if condition is None else condition.expand(x.shape[0], *condition.shape[1:])
        return model(x, timesteps, text, condition=given, condition_start=start)

    return model_fn


@pytest.mark.parametrize("case", CASES)
def test_sampling_matches_reference(reference_dir, case):
    """Same seed and inputs, the fixture's step count, CFG -> the recorded latents (fp32, atol/rtol 1e-4)."""
    case_dir = reference_dir / case
    recorded = load_pt(case_dir / "sampling.pt")
    model_fn = reference_model_fn(case_dir, recorded)
    text = recorded["cond_crossattn"].reshape(1, -1, recorded["cond_crossattn"].shape[-1])
    torch.manual_seed(recorded["seed"])
    noise = torch.randn(recorded["initial_noise"].shape)
    assert torch.equal(noise, recorded["initial_noise"])
    steps = []
    with torch.no_grad():
        final = sample_vpsde_dpmpp_2m(
            model_fn, noise, text, torch.zeros_like(text), ZeroSNRSchedule(recorded["num_steps"]), DynamicCFG(),
            callback=lambda i, x: steps.append(x.clone()),
        )
    for i, expected in enumerate(recorded["x_after_step"]):
        torch.testing.assert_close(steps[i], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, recorded["final_latent"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES[:1])
def test_schedule_matches_recorded_per_step_facts(reference_dir, case):
    config = case_config(reference_dir / case)
    per_step = config["schedule"]["per_step"]
    schedule = ZeroSNRSchedule(len(per_step))
    torch.testing.assert_close(schedule.alphas, torch.tensor(config["schedule"]["alpha_cumprod_sqrt"]),
                               atol=1e-7, rtol=0)
    snapped, index = schedule.snapped(schedule.alphas[:-1])
    weights = DynamicCFG(6, 5).weights(schedule)
    for i, step in enumerate(per_step):
        assert int(schedule.timesteps[i]) == step["timestep_idx_fed_to_network"]
        assert snapped[i].item() == pytest.approx(step["denoiser_quantized_alpha_cumprod_sqrt"], abs=1e-7)
        assert int(index[i]) == step["denoiser_table_index"]
        assert weights[i] == pytest.approx(step["dynamic_cfg_scale"], rel=1e-12)


def _hash(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("case", CASES[:1])
def test_noise_draws_follow_the_reference_order(reference_dir, case, monkeypatch):
    recorded = load_pt(reference_dir / case / "sampling.pt")
    draws = []
    original = torch.randn_like

    def recording_randn_like(x, *args, **kwargs):
        value = original(x, *args, **kwargs)
        draws.append(_hash(value))
        return value

    monkeypatch.setattr(torch, "randn_like", recording_randn_like)
    torch.manual_seed(recorded["seed"])
    noise = torch.randn(recorded["initial_noise"].shape)
    text = torch.zeros(1, 4, 2)
    sample_vpsde_dpmpp_2m(lambda x, t, c: torch.zeros_like(x), noise, text, text,
                          ZeroSNRSchedule(recorded["num_steps"]), DynamicCFG())
    steps = recorded["num_steps"]
    assert len(draws) == 1 + 2 * (steps - 2)
    assert draws == list(recorded["noise_draw_sha256_16"])


def exact_v(x0: torch.Tensor, schedule: ZeroSNRSchedule):
    """The v-prediction a perfect model of the point mass at x0 makes, given the snapped alphas."""
    snapped, _ = schedule.snapped(schedule.alphas[:-1])
    lookup = {int(t): a for t, a in zip(schedule.timesteps, snapped, strict=True)}

    def model_fn(x, timesteps, text):
        a = lookup[int(timesteps[0])]
        sigma = (1 - a**2) ** 0.5
        eps = (x - a * x0) / sigma if sigma > 0 else torch.zeros_like(x)
        return a * eps - sigma * x0  # v = a eps - sigma x0, so c_skip x + c_out v = x0

    return model_fn


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_perfect_denoiser_lands_on_the_data_point(steps):
    schedule = ZeroSNRSchedule(steps)
    x0 = torch.linspace(-1, 1, 24).reshape(1, 2, 3, 4)
    text = torch.zeros(1, 3, 2)
    torch.manual_seed(0)
    out = sample_vpsde_dpmpp_2m(exact_v(x0, schedule), torch.randn_like(x0), text, text, schedule, DynamicCFG())
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_guidance_with_equal_conditions_changes_nothing():
    schedule = ZeroSNRSchedule(6)
    model_fn = lambda x, t, c: 0.3 * x + c.mean() + 0.001 * t[:, None, None]  # noqa: E731
    text = torch.full((1, 3, 2), 0.5)
    torch.manual_seed(1)
    noise = torch.randn(1, 5, 3)
    torch.manual_seed(2)
    guided = sample_vpsde_dpmpp_2m(model_fn, noise, text, text, schedule, DynamicCFG(scale=6))
    torch.manual_seed(2)
    unguided = sample_vpsde_dpmpp_2m(model_fn, noise, text, text, schedule, DynamicCFG(scale=0))
    torch.testing.assert_close(guided, unguided)


def test_batched_and_two_pass_guidance_agree_and_seeds_reproduce():
    schedule = ZeroSNRSchedule(5)
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t, c: x @ weight + c.sum(dim=(1, 2))[:, None, None]  # noqa: E731
    cond, uncond = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)
    noise = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(3))
    results = []
    for batched in (True, False, True):
        torch.manual_seed(7)
        results.append(sample_vpsde_dpmpp_2m(model_fn, noise, cond, uncond, schedule, DynamicCFG(),
                                             batched_guidance=batched))
    torch.testing.assert_close(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_skipping_the_discarded_draw_changes_the_stream_only():
    schedule = ZeroSNRSchedule(5)
    x0 = torch.full((1, 2, 2), 0.25)
    text = torch.zeros(1, 1, 1)
    outs = []
    for faithful in (True, False):
        torch.manual_seed(0)
        outs.append(sample_vpsde_dpmpp_2m(exact_v(x0, schedule), torch.randn_like(x0), text, text, schedule,
                                          DynamicCFG(), faithful_rng=faithful))
    torch.testing.assert_close(outs[0], x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[1], x0, atol=1e-4, rtol=0)
