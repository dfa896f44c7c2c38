"""The sampler: reference sampling runs, schedule facts, RNG order, and a toy problem with a known answer."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from conftest import reference_cases
from reference import case_config, case_dit_config, case_layout, load_pt

from layerflow.models.dit import LayerFlowDiT
from layerflow.pipeline import conditioned_denoiser
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.sampling import DynamicCFG, ZeroSNRSchedule, sample_vpsde_dpmpp_2m
from layerflow.weights.checkpoint import load_network

CASES = reference_cases()


def reference_model_fn(case_dir, recorded):
    ensure_model_parallel()
    model = LayerFlowDiT(case_dit_config(case_dir))
    layout = case_layout(case_dir)
    load_network(model, case_dir / "ckpt", layout)
    return conditioned_denoiser(model, layout, recorded.get("cond_latent"))


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
            model_fn,
            noise,
            text,
            torch.zeros_like(text),
            ZeroSNRSchedule(recorded["num_steps"]),
            DynamicCFG(),
            callback=lambda i, x: steps.append(x.clone()),
        )
    for i, expected in enumerate(recorded["x_after_step"]):
        torch.testing.assert_close(steps[i], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, recorded["final_latent"], atol=1e-4, rtol=1e-4)


def reference_settings(case_dir):
    """The schedule and guidance the reference sampler of a case was configured with."""
    params = case_config(case_dir)["sampler_config"]["params"]
    guider = params["guider_config"]["params"]
    assert guider["num_steps"] == params["num_steps"], "the guider and sampler step counts differ"
    schedule = ZeroSNRSchedule(params["num_steps"], params["discretization_config"]["params"]["shift_scale"])
    return schedule, DynamicCFG(guider["scale"], guider["exp"])


@pytest.mark.parametrize("case", CASES)
def test_schedule_matches_recorded_per_step_facts(reference_dir, case):
    config = case_config(reference_dir / case)
    recorded = config["schedule"]
    schedule, guidance = reference_settings(reference_dir / case)
    steps = schedule.num_steps
    assert len(recorded["per_step"]) == steps
    torch.testing.assert_close(schedule.alphas, torch.tensor(recorded["alpha_cumprod_sqrt"]), atol=1e-7, rtol=0)
    assert [-1, *schedule.timesteps.flip(0).tolist()] == recorded["timesteps"]
    snapped, index = schedule.snapped(schedule.alphas[:-1])
    weights = guidance.weights(schedule)
    for i, step in enumerate(recorded["per_step"]):
        assert step["i"] == i
        assert schedule.alphas[i].item() == pytest.approx(step["alpha_cumprod_sqrt"], abs=1e-7)
        assert schedule.alphas[i + 1].item() == pytest.approx(step["next_alpha_cumprod_sqrt"], abs=1e-7)
        assert int(schedule.timesteps[i]) == step["timestep_idx_fed_to_network"]
        assert steps - int(schedule.timesteps[i]) == step["dynamic_cfg_step_index_arg"]
        assert snapped[i].item() == pytest.approx(step["denoiser_quantized_alpha_cumprod_sqrt"], abs=1e-7)
        assert int(index[i]) == step["denoiser_table_index"]
        assert weights[i] == pytest.approx(step["dynamic_cfg_scale"], rel=1e-12, abs=1e-7)


def _hash(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def record_draws(monkeypatch) -> list[torch.Tensor]:
    """Every torch.randn_like result from now on, in order (the generator is used exactly as before)."""
    draws = []
    original = torch.randn_like

    def recording_randn_like(x, *args, **kwargs):
        value = original(x, *args, **kwargs)
        draws.append(value.clone())
        return value

    monkeypatch.setattr(torch, "randn_like", recording_randn_like)
    return draws


@pytest.mark.parametrize("case", CASES)
def test_noise_draws_follow_the_reference_order(reference_dir, case, monkeypatch):
    recorded = load_pt(reference_dir / case / "sampling.pt")
    per_step = case_config(reference_dir / case)["schedule"]["per_step"]
    schedule, guidance = reference_settings(reference_dir / case)
    draws = record_draws(monkeypatch)
    draws_after_step = []
    torch.manual_seed(recorded["seed"])
    noise = torch.randn(recorded["initial_noise"].shape)
    assert _hash(noise) == _hash(recorded["initial_noise"])
    text = torch.zeros(1, 4, 2)
    sample_vpsde_dpmpp_2m(
        lambda x, t, c: torch.zeros_like(x),
        noise,
        text,
        text,
        schedule,
        guidance,
        callback=lambda i, x: draws_after_step.append(len(draws)),
    )
    steps = schedule.num_steps
    assert len(draws) == 1 + 2 * (steps - 2)
    assert [_hash(d) for d in draws] == list(recorded["noise_draw_sha256_16"])
    per_step_counts = [b - a for a, b in zip([0, *draws_after_step[:-1]], draws_after_step, strict=True)]
    assert per_step_counts == [step["randn_like_draws"] for step in per_step]


@pytest.mark.parametrize("case", CASES[:1])
def test_skipping_the_wasted_draw_uses_the_stream_without_gaps(reference_dir, case, monkeypatch):
    recorded = load_pt(reference_dir / case / "sampling.pt")
    schedule, guidance = reference_settings(reference_dir / case)
    draws = record_draws(monkeypatch)
    torch.manual_seed(recorded["seed"])
    noise = torch.randn(recorded["initial_noise"].shape)
    text = torch.zeros(1, 4, 2)
    sample_vpsde_dpmpp_2m(
        lambda x, t, c: torch.zeros_like(x), noise, text, text, schedule, guidance, faithful_rng=False
    )
    steps = schedule.num_steps
    assert [_hash(d) for d in draws] == list(recorded["noise_draw_sha256_16"])[: steps - 1]


def model_with_denoised(target, schedule: ZeroSNRSchedule):
    """A model whose denoised output c_skip x + c_out v is ``target(t, text)`` exactly (up to rounding).

    v = a eps - sigma x0 with eps = (x - a x0) / sigma, a the alpha the denoiser snaps to.
    """
    snapped, _ = schedule.snapped(schedule.alphas[:-1])
    lookup = {int(t): a.item() for t, a in zip(schedule.timesteps, snapped, strict=True)}

    def model_fn(x, timesteps, text):
        a = lookup[int(timesteps[0])]
        sigma = (1 - a**2) ** 0.5
        x0 = target(int(timesteps[0]), text)
        return a * (x - a * x0) / sigma - sigma * x0

    return model_fn


def exact_v(x0: torch.Tensor, schedule: ZeroSNRSchedule):
    """The v-prediction a perfect model of the point mass at x0 makes, given the snapped alphas."""
    return model_with_denoised(lambda t, text: x0, schedule)


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
        results.append(
            sample_vpsde_dpmpp_2m(model_fn, noise, cond, uncond, schedule, DynamicCFG(), batched_guidance=batched)
        )
    torch.testing.assert_close(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_skipping_the_discarded_draw_changes_the_stream_only():
    schedule = ZeroSNRSchedule(5)
    x0 = torch.full((1, 2, 2), 0.25)
    text = torch.zeros(1, 1, 1)
    outs = []
    for faithful in (True, False):
        torch.manual_seed(0)
        outs.append(
            sample_vpsde_dpmpp_2m(
                exact_v(x0, schedule), torch.randn_like(x0), text, text, schedule, DynamicCFG(), faithful_rng=faithful
            )
        )
    torch.testing.assert_close(outs[0], x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[1], x0, atol=1e-4, rtol=0)


def _lambda(a: float) -> float:
    return math.log(a / math.sqrt(1 - a * a))


def test_states_follow_the_exact_marginals_of_a_point_mass(monkeypatch):
    """Data = one point x0 and a perfect denoiser: after step i, x = a x0 + sigma eps exactly, with
    eps_next = e^-h eps + sqrt(1 - e^-2h) z for the used draw z (the second of each middle step's pair)."""
    schedule = ZeroSNRSchedule(10)
    x0 = torch.linspace(-1.5, 1.5, 240).reshape(1, 4, 3, 4, 5)
    text = torch.zeros(1, 3, 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    draws = record_draws(monkeypatch)
    states = []
    out = sample_vpsde_dpmpp_2m(
        exact_v(x0, schedule), noise, text, text, schedule, DynamicCFG(), callback=lambda i, x: states.append(x.clone())
    )
    alphas = schedule.alphas.double().tolist()
    used = draws[0::2]
    assert len(used) == schedule.num_steps - 1
    eps = noise.double()
    for i in range(schedule.num_steps - 1):
        a, a_next = alphas[i], alphas[i + 1]
        sigma, sigma_next = math.sqrt(1 - a * a), math.sqrt(1 - a_next * a_next)
        decay = a * sigma_next / (sigma * a_next)  # e^-h; 0 at the pure-noise step
        eps = decay * eps + math.sqrt(1 - decay * decay) * used[i].double()
        expected = a_next * x0.double() + sigma_next * eps
        torch.testing.assert_close(states[i].double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_second_order_correction_matches_dpmpp_2m(monkeypatch):
    """A denoised output that moves with t: each step equals the SDE-DPM-Solver++(2M) formula of
    Lu et al. 2022, D' = D + (D - D_previous) / (2r), r = h_previous / h, evaluated in float64."""
    schedule = ZeroSNRSchedule(6)
    x0 = torch.linspace(-1, 1, 60).reshape(1, 3, 4, 5)
    target = lambda t, text: x0 * (1 + t / 1000) + 0.2 * math.sin(t / 100)  # noqa: E731
    text = torch.zeros(1, 2, 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    draws = record_draws(monkeypatch)
    states = []
    out = sample_vpsde_dpmpp_2m(
        model_with_denoised(target, schedule),
        noise,
        text,
        text,
        schedule,
        DynamicCFG(),
        callback=lambda i, x: states.append(x.clone()),
    )
    alphas = schedule.alphas.double().tolist()
    timesteps = schedule.timesteps.tolist()
    used = draws[0::2]
    denoised = [target(t, text).double() for t in timesteps]
    x = noise.double()
    correction_seen = 0.0
    for i in range(schedule.num_steps - 1):
        a, a_next = alphas[i], alphas[i + 1]
        sigma, sigma_next = math.sqrt(1 - a * a), math.sqrt(1 - a_next * a_next)
        decay = a * sigma_next / (sigma * a_next)
        extrapolated = denoised[i]
        if i >= 2:  # at step 1 the previous lambda is -inf, so r = inf and the correction is 0
            r = (_lambda(a) - _lambda(alphas[i - 1])) / (_lambda(a_next) - _lambda(a))
            extrapolated = denoised[i] + (denoised[i] - denoised[i - 1]) / (2 * r)
            correction_seen = max(correction_seen, (extrapolated - denoised[i]).abs().max().item())
        expected = (
            sigma_next / sigma * decay * x
            + a_next * (1 - decay**2) * extrapolated
            + sigma_next * math.sqrt(1 - decay**2) * used[i].double()
        )
        torch.testing.assert_close(states[i].double(), expected, atol=2e-5, rtol=0)
        x = states[i].double()
    assert correction_seen > 1e-3, "the toy must make the second-order term matter"
    torch.testing.assert_close(out.double(), denoised[-1], atol=1e-5, rtol=0)


def test_guidance_puts_uncond_first_and_mixes_the_denoised_outputs():
    """uncond and cond point masses: the result is D_u + g (D_c - D_u) with the last step's weight."""
    schedule = ZeroSNRSchedule(5)
    point_u, point_c = torch.full((1, 2, 3), -0.5), torch.full((1, 2, 3), 0.75)
    target = lambda t, text: torch.where(text[:, :1, :1] > 0, point_c, point_u)  # noqa: E731
    inner = model_with_denoised(target, schedule)
    calls = []

    def model_fn(x, timesteps, text):
        calls.append((x.clone(), timesteps.clone(), text.clone()))
        return inner(x, timesteps, text)

    cond, uncond = torch.ones(1, 4, 2), torch.zeros(1, 4, 2)
    guidance = DynamicCFG()
    torch.manual_seed(3)
    out = sample_vpsde_dpmpp_2m(model_fn, torch.randn(1, 2, 3), cond, uncond, schedule, guidance)
    assert len(calls) == schedule.num_steps
    for (x, timesteps, text), t in zip(calls, schedule.timesteps.tolist(), strict=True):
        assert torch.equal(text, torch.cat([uncond, cond]))
        assert torch.equal(x[:1], x[1:])
        assert timesteps.dtype == torch.float32 and timesteps.tolist() == [float(t), float(t)]
    weight = guidance.weights(schedule)[-1]
    torch.testing.assert_close(out, point_u + weight * (point_c - point_u), atol=1e-5, rtol=0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_steps"):
        ZeroSNRSchedule(1)
    with pytest.raises(ValueError, match="exponent"):
        DynamicCFG(6.0, 2.5)
