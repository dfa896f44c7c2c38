"""The SAT <-> diffusers key mapping: strict both ways, every full-size key, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import REPO_ROOT, reference_cases  # noqa: E402
from reference import case_dit_config, case_layout  # noqa: E402
from test_transformer import CONFIGS, tiny_network  # noqa: E402

from layerflow.config import load_config  # noqa: E402
from layerflow.for_diffusers import ExportError, sat_state_from_transformer, transformer_from_sat  # noqa: E402
from layerflow.for_diffusers.lora import adapter_states, base_state  # noqa: E402
from layerflow.for_diffusers.transformer_keys import (  # noqa: E402
    NORM1_CHUNKS,
    NORM2_CHUNKS,
    POSITION_TABLE_KEY,
    diffusers_to_sat,
    sat_to_diffusers,
)
from layerflow.models.dit import LayerFlowDiT  # noqa: E402
from layerflow.weights.checkpoint import NETWORK_PREFIX, load_network  # noqa: E402

pytestmark = pytest.mark.usefixtures("model_parallel")


def one_line_error(state, config, match: str) -> str:
    with pytest.raises(ExportError, match=match) as error:
        transformer_from_sat(state, config)
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_loads_strictly_with_identical_tensors(name):
    network, config = tiny_network(name)
    state = network.state_dict()
    back = sat_state_from_transformer(transformer_from_sat(state, config.network))
    fresh = LayerFlowDiT(config.network)
    fresh.load_state_dict(back, strict=True)
    assert sorted(back) == sorted(state)
    assert [key for key, value in state.items() if not torch.equal(back[key], value)] == []


@pytest.mark.parametrize("case", reference_cases())
def test_original_checkpoints_position_table_is_recomputed_exactly(reference_dir, case):
    """The original's sin-cos tables (dropped in the export) come back bit for bit; learned ones are kept."""
    case_dir = reference_dir / case
    config = case_dit_config(case_dir)
    network = LayerFlowDiT(config)
    load_network(network, case_dir / "ckpt", case_layout(case_dir))
    state = network.state_dict()
    base, _ = sat_to_diffusers(state, config)
    assert ("patch_embed.pos_embedding" in base) == config.learnable_pos_embed
    back = sat_state_from_transformer(transformer_from_sat(state, config))
    assert torch.equal(back[POSITION_TABLE_KEY], state[POSITION_TABLE_KEY])


def test_adaln_chunks_land_where_diffusers_reads_them():
    """Chunk c of our 12 adaLN chunks, filled with the value c, ends up in the converter's place."""
    network, config = tiny_network("gen_rgb")
    state = dict(network.state_dict())
    hidden = config.network.hidden_size
    key = "mixins.adaln_layer.adaLN_modulations.1.1.bias"
    state[key] = torch.arange(12.0).repeat_interleave(hidden)
    base, _ = sat_to_diffusers(state, config.network)
    for norm, chunks in (("norm1", NORM1_CHUNKS), ("norm2", NORM2_CHUNKS)):
        values = base[f"transformer_blocks.1.{norm}.linear.bias"].view(6, hidden)
        assert values[:, 0].tolist() == [float(c) for c in chunks]
    assert NORM1_CHUNKS == (0, 1, 2, 6, 7, 8)  # video shift/scale/gate (attention), then text's


def test_every_tensor_is_mapped_once():
    network, config = tiny_network("gen_rgba")
    state = network.state_dict()
    base, adapters = sat_to_diffusers(state, config.network)
    model = transformer_from_sat(state, config.network)
    assert sorted(base) == sorted(base_state(model))
    assert {name: sorted(tensors) for name, tensors in adapters.items()} == {
        name: sorted(tensors) for name, tensors in adapter_states(model).items()
    }
    mapped = sum(v.numel() for v in base.values()) + sum(
        v.numel() for tensors in adapters.values() for v in tensors.values()
    )
    assert mapped == sum(v.numel() for k, v in state.items() if k != POSITION_TABLE_KEY)


@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_schema_maps_every_key(reference_dir, name):
    """Each listed released checkpoint's keys and shapes (meta tensors, no weights) map with none left."""
    schema_dir = reference_dir / "full_size_keys"
    index = json.loads((schema_dir / "index.json").read_text())
    if name not in index:
        pytest.skip(f"{name} not listed in {schema_dir / 'index.json'}")
    entry = index[name]
    schema = json.loads((schema_dir / entry["schema_file"]).read_text())
    state = {
        item["key"].removeprefix(NETWORK_PREFIX): torch.empty(item["shape"], device="meta") for item in schema["keys"]
    }
    configs = REPO_ROOT / "configs"
    config = load_config([configs / "model.yaml", configs / "tasks" / f"{name}.yaml"]).network
    model = transformer_from_sat(state, config)
    tensors = model.state_dict()
    assert {value.device.type for value in tensors.values()} == {"meta"}
    assert model.config.num_layers == 30 and model.config.num_attention_heads == 30
    kept_table = 0 if config.learnable_pos_embed else state[POSITION_TABLE_KEY].numel()
    assert sum(value.numel() for value in tensors.values()) == entry["total_parameters"] - kept_table
    lora = sum(v.numel() for k, v in tensors.items() if ".lora_" in k)
    assert lora == entry["n_lora_parameters"]
    back = sat_state_from_transformer(model)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_missing_key_is_one_line():
    network, config = tiny_network("gen_rgba")
    state = dict(network.state_dict())
    del state["transformer.layers.1.attention.query_key_value.matrix_C.2"]
    message = one_line_error(state, config.network, "missing key")
    assert "transformer.layers.1.attention.query_key_value.matrix_C.2" in message


def test_extra_key_is_one_line():
    network, config = tiny_network("gen_rgba")
    state = dict(network.state_dict())
    state["transformer.layers.2.mlp.dense_h_to_4h.weight"] = torch.zeros(1)
    message = one_line_error(state, config.network, "unexpected key")
    assert "transformer.layers.2.mlp.dense_h_to_4h.weight" in message


def test_wrong_shape_is_one_line():
    network, config = tiny_network("gen_rgba")
    state = dict(network.state_dict())
    state["time_embed.2.weight"] = torch.zeros(3, 3)
    assert "time_embedding.linear_2.weight (3, 3)" in one_line_error(state, config.network, "wrong shape")


@pytest.mark.parametrize(
    ("state_of", "config_of", "match"),
    [
        ("gen_rgb", "gen_rgba", "missing key mixins.pos_embed.txt_embedder"),  # no layer embedding: other variant
        ("gen_rgba", "seg_rgba", "unexpected key mixins.pos_embed.txt_embedder"),
        ("seg_rgb", "gen_rgb", "another task or variant"),  # position tables of other lengths
        ("seg_rgba", "seg_rgb", "another task or variant"),
    ],
)
def test_network_of_another_task_or_variant_is_one_line(state_of, config_of, match):
    network, _ = tiny_network(state_of)
    _, config = tiny_network(config_of)
    one_line_error(network.state_dict(), config.network, match)


def test_edited_sincos_table_is_refused():
    """A fixed table that is not the sin-cos table cannot be dropped and recomputed."""
    network, config = tiny_network("gen_rgb")
    state = dict(network.state_dict())
    state[POSITION_TABLE_KEY] = state[POSITION_TABLE_KEY] + 1e-3
    one_line_error(state, config.network, "differs from the sin-cos table")


def test_diffusers_side_is_strict_too():
    network, config = tiny_network("fg2bg_rgba")
    base, adapters = sat_to_diffusers(network.state_dict(), config.network)
    del adapters["motion"]["transformer_blocks.0.attn1.to_out.0.lora_A.weight"]
    with pytest.raises(ExportError, match=r"missing key motion/transformer_blocks\.0\.attn1\.to_out\.0\.lora_A"):
        diffusers_to_sat(base, adapters, config.network)
    base["proj_out.extra"] = torch.zeros(1)
    with pytest.raises(ExportError, match=r"unexpected key proj_out\.extra"):
        diffusers_to_sat(base, adapters, config.network)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"qk_ln": False}, "q/k LayerNorms"),
        ({"elementwise_affine": False}, "q/k LayerNorms"),
        ({"text_length": 0}, "text_length is not set"),
    ],
)
def test_configs_diffusers_cannot_express_are_refused(change, match):
    from dataclasses import replace

    from layerflow.for_diffusers import transformer_config

    _, config = tiny_network("gen_rgb")
    with pytest.raises(ExportError, match=match):
        transformer_config(replace(config.network, **change))


def test_stage1_network_is_refused():
    from dataclasses import replace

    from layerflow.for_diffusers import transformer_config

    _, config = tiny_network("gen_rgb")
    stage1 = replace(config.network, lora=replace(config.network.lora, is_stage1=True))
    with pytest.raises(ExportError, match="stage-1"):
        transformer_config(stage1)
