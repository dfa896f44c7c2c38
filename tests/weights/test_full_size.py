"""The eight released configurations, built on the meta device, against the real checkpoints' schema."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT

from layerflow.config import load_config
from layerflow.models.dit import LayerFlowDiT
from layerflow.pipeline import conditioned_denoiser
from layerflow.tasks import LAYOUTS
from layerflow.weights.checkpoint import NETWORK_PREFIX

CONFIGS = [f"{task.value}_{variant.value}" for task, variant in LAYOUTS]

pytestmark = [pytest.mark.usefixtures("model_parallel"), pytest.mark.slow]  # full-size networks, on the meta device


def released_config(name: str):
    configs = REPO_ROOT / "configs"
    return load_config([configs / "model.yaml", configs / "tasks" / f"{name}.yaml"])


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_build_matches_released_schema(reference_dir, name):
    schema_dir = reference_dir / "full_size_keys"
    index = json.loads((schema_dir / "index.json").read_text())
    if name not in index:
        pytest.skip(f"{name} not listed in {schema_dir / 'index.json'}")
    schema = json.loads((schema_dir / index[name]["schema_file"]).read_text())
    expected = {entry["key"].removeprefix(NETWORK_PREFIX): tuple(entry["shape"]) for entry in schema["keys"]}
    config = released_config(name)
    model = LayerFlowDiT(config.network, device="meta")
    built = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(expected) - set(built)) == []
    assert sorted(set(built) - set(expected)) == []
    assert {k: v for k, v in built.items() if expected[k] != v} == {}
    total = sum(value.numel() for value in model.state_dict().values())
    assert total == index[name]["total_parameters"]
    assert all(value.device.type == "meta" for value in model.state_dict().values())


@pytest.mark.parametrize("name", CONFIGS)
def test_released_layout_fits_position_table(name):
    """The stacked clip of every task fits the position table its config builds."""
    config = released_config(name)
    layout, network = config.layout, config.network
    assert layout.latent_frames <= network.pos_embed_frames
    assert network.text_length == 226 * len(layout.prompt_layers)


def test_meta_forward_shapes_without_weights():
    """A full-size RGBA fg2bg forward traced on meta gives the generated frames only."""
    config = released_config("fg2bg_rgba")
    model = LayerFlowDiT(config.network, device="meta")
    layout = config.layout
    net = config.network
    x = torch.empty(2, layout.generated_frames, 16, net.latent_height, net.latent_width, device="meta")
    condition = torch.empty(2, layout.condition_frames, 16, net.latent_height, net.latent_width, device="meta")
    context = torch.empty(2, net.text_length, net.text_hidden_size, device="meta")
    out = conditioned_denoiser(model, layout, condition)(x, torch.zeros(2, device="meta"), context)
    assert out.shape == x.shape
