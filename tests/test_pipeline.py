"""The pipeline steps with the tiny model: stacking, encoding, reproducibility, memory release."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from layerflow.pipeline import InputError, LayerFlowPipeline

CONFIGS = REPO_ROOT / "configs"
PROMPTS = {"fg": "a red ball", "bg": "a green field", "blend": "a red ball on a green field"}


def tiny_pipeline(name: str, *overrides: str) -> LayerFlowPipeline:
    return LayerFlowPipeline(tiny_config(name, "sampling.num_steps=2", *overrides))


@pytest.fixture(scope="module")
def fg2bg_rgba():
    return tiny_pipeline("fg2bg_rgba")


def layer_video(pipeline, value: float, frames: int = 16) -> torch.Tensor:
    height, width = pipeline.config.video_size
    return torch.full((frames, 3, height, width), value)


def test_stacked_clip_places_layers_and_repeats_first_frame(fg2bg_rgba):
    fg = layer_video(fg2bg_rgba, 0.5)
    fg[0] = 0.9
    alpha = layer_video(fg2bg_rgba, -0.25)
    clip = fg2bg_rgba.stack_given_layers({"fg": fg, "alpha": alpha})[0]  # (3, F, H, W)
    layout = fg2bg_rgba.layout
    assert clip.shape[1] == layout.pixel_frames
    assert torch.all(clip[:, 0] == 0.9) and torch.all(clip[:, 1] == 0.9)  # the duplicated first frame
    alpha_span = layout.span("alpha")
    assert torch.all(clip[:, alpha_span.pixel_start : alpha_span.pixel_stop] == -0.25)
    fg_span = layout.span("fg")
    assert torch.all(clip[:, fg_span.pixel_start + 1 : fg_span.pixel_stop] == 0.5)


def test_given_layers_must_match_the_task(fg2bg_rgba):
    with pytest.raises(InputError, match=r"takes the layers \['fg', 'alpha'\]; missing \['alpha'\]"):
        fg2bg_rgba.stack_given_layers({"fg": layer_video(fg2bg_rgba, 0.0)})
    with pytest.raises(InputError, match="layer fg: expected frames of shape"):
        fg2bg_rgba.stack_given_layers({"fg": layer_video(fg2bg_rgba, 0.0, 8), "alpha": layer_video(fg2bg_rgba, 0.0)})


@pytest.fixture(scope="module")
def runs(fg2bg_rgba):
    """Four tiny runs: (seed 5, given A) twice, (seed 6, given A), (seed 5, given B)."""
    given_a = {"fg": layer_video(fg2bg_rgba, 0.3), "alpha": layer_video(fg2bg_rgba, -0.5)}
    given_b = {"fg": layer_video(fg2bg_rgba, -0.3), "alpha": layer_video(fg2bg_rgba, 0.5)}
    return {
        "a": fg2bg_rgba.generate(PROMPTS, given_a, seed=5),
        "a_again": fg2bg_rgba.generate(PROMPTS, given_a, seed=5),
        "a_other_seed": fg2bg_rgba.generate(PROMPTS, given_a, seed=6),
        "b": fg2bg_rgba.generate(PROMPTS, given_b, seed=5),
    }


@pytest.mark.slow
def test_same_seed_same_result_and_layers_have_the_layout_sizes(fg2bg_rgba, runs):
    height, width = fg2bg_rgba.config.video_size
    assert set(runs["a"].layers) == set(fg2bg_rgba.layout.video_layers)
    for name, video in runs["a"].layers.items():
        assert video.shape == (16, 3, height, width)
        assert torch.equal(video, runs["a_again"].layers[name])
    assert not torch.equal(runs["a"].layers["bg"], runs["a_other_seed"].layers["bg"])


@pytest.mark.slow
def test_given_latents_enter_clean(runs):
    """The generated frames depend on the given layer: change it and the background changes."""
    assert not torch.equal(runs["a"].layers["bg"], runs["b"].layers["bg"])


def test_text_encoder_is_released_after_encoding():
    pipeline = tiny_pipeline("gen_rgb")
    pipeline.encode_prompts(PROMPTS)
    assert pipeline.text_encoder is None
    kept = tiny_pipeline("gen_rgb", "runtime.keep_text_encoder=true")
    kept.encode_prompts(PROMPTS)
    assert kept.text_encoder is not None and not kept.text_encoder.released


def test_prompt_segments_follow_the_layout_order():
    pipeline = tiny_pipeline("gen_rgb", "runtime.keep_text_encoder=true")
    states = pipeline.encode_prompts(PROMPTS)  # (1, 3*226, e)
    swapped = pipeline.encode_prompts({"fg": PROMPTS["bg"], "bg": PROMPTS["fg"], "blend": PROMPTS["blend"]})
    assert states.shape[1] == 3 * 226
    assert not torch.equal(states[:, :226], swapped[:, :226])
    torch.testing.assert_close(states[:, 452:], swapped[:, 452:])


def test_missing_prompt_is_an_input_error():
    pipeline = tiny_pipeline("seg_rgb")
    with pytest.raises(InputError, match=r"needs a prompt for each of \['fg', 'bg'\]"):
        pipeline.encode_prompts({"fg": "a"})


@pytest.mark.slow
def test_chunked_decode_matches_plain_decode(fg2bg_rgba):
    layout = fg2bg_rgba.layout
    generated = torch.randn(1, layout.generated_frames, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    condition = torch.randn(1, layout.condition_frames, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    plain = fg2bg_rgba.decode_layers(generated, condition)
    config = fg2bg_rgba.config
    chunked_runtime = dataclasses.replace(config.runtime, vae_temporal_chunk=4, vae_spatial_tile=4)
    fg2bg_rgba.config = dataclasses.replace(config, runtime=chunked_runtime)
    try:
        chunked = fg2bg_rgba.decode_layers(generated, condition)
    finally:
        fg2bg_rgba.config = config
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_network_matches_eager():
    """runtime.compile=true: the torch.compile'd network samples the same latents (CPU inductor, ~1 min)."""
    eager = tiny_pipeline("gen_rgb", "runtime.keep_text_encoder=true")
    compiled = tiny_pipeline("gen_rgb", "runtime.compile=true")
    text = eager.encode_prompts(PROMPTS)
    expected = eager.sample_latents(text, None, seed=3)
    result = compiled.sample_latents(text, None, seed=3)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)
