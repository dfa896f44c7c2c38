"""The pipeline's denoise function: given latents go in clean at the layout's place, their output is dropped."""

from __future__ import annotations

import pytest
import torch

from layerflow.pipeline import conditioned_denoiser
from layerflow.tasks import LAYOUTS, get_layout


class FrameTagger:
    """Stands in for the network: records what it is called with and returns x + (frame index)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.calls: list[dict] = []

    def __call__(self, x, timesteps, text, *, lora_scale, sequence_parallel):
        self.calls.append(
            {
                "x": x,
                "timesteps": timesteps,
                "text": text,
                "lora_scale": lora_scale,
                "sequence_parallel": sequence_parallel,
            }
        )
        return x + torch.arange(x.shape[1], dtype=x.dtype).reshape(1, -1, 1, 1, 1)


@pytest.mark.parametrize("name", [f"{task.value}_{variant.value}" for task, variant in LAYOUTS])
def test_given_latents_enter_at_the_layout_place_and_leave_the_output(name):
    layout = get_layout(*name.split("_"))
    total = layout.latent_frames
    given_frames = set(range(*layout.condition)) if layout.condition is not None else set()
    generated_at = [f for f in range(total) if f not in given_frames]  # stack positions of the generated frames
    x = torch.randn(2, len(generated_at), 3, 2, 2)
    condition = None
    if layout.condition is not None:  # one clean copy, shared by both halves of the guidance batch
        condition = 1000 + torch.arange(len(given_frames), dtype=torch.float32).reshape(1, -1, 1, 1, 1).expand(
            1, -1, 3, 2, 2
        )
    network = FrameTagger()
    text = torch.ones(2, 5, 4)
    out = conditioned_denoiser(network, layout, condition, lora_scale=1, sequence_parallel="group")(
        x, torch.tensor([7, 7]), text
    )

    (call,) = network.calls
    stack = call["x"]
    assert stack.shape == (2, total, 3, 2, 2)
    for j, f in enumerate(generated_at):
        assert torch.equal(stack[:, f], x[:, j])
    for k, f in enumerate(sorted(given_frames)):
        assert torch.all(stack[:, f] == 1000 + k)
    assert call["lora_scale"] == 1 and call["sequence_parallel"] == "group" and call["text"] is text
    expected = torch.stack([x[:, j] + f for j, f in enumerate(generated_at)], dim=1)  # the tag of each stack place
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_network_dtype_in_float32_out():
    layout = get_layout("fg2bg", "rgb")
    network = FrameTagger(torch.bfloat16)
    x = torch.randn(1, layout.generated_frames, 1, 1, 1)
    condition = torch.randn(1, layout.condition_frames, 1, 1, 1)
    out = conditioned_denoiser(network, layout, condition)(x, torch.zeros(1), torch.zeros(1, 1, 1))
    assert network.calls[0]["x"].dtype == torch.bfloat16
    assert out.dtype == torch.float32
    assert torch.equal(out[:, 0], (x[:, 0].to(torch.bfloat16) + layout.condition[1]).float())


def test_given_latents_must_match_the_task():
    with pytest.raises(ValueError, match="seg_rgb: given latents missing"):
        conditioned_denoiser(FrameTagger(), get_layout("seg", "rgb"), None)
    with pytest.raises(ValueError, match="gen_rgb: given latents not used"):
        conditioned_denoiser(FrameTagger(), get_layout("gen", "rgb"), torch.zeros(1, 4, 1, 1, 1))
