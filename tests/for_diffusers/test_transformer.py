"""The diffusers transformer against our network: the same v for every task and variant, the LoRA scales."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import reference_cases, tiny_config  # noqa: E402
from reference import batch_major_context, case_dit_config, case_layout, load_pt  # noqa: E402

from layerflow.for_diffusers import (  # noqa: E402
    LayerFlowTransformer3DModel,
    load_transformer,
    save_transformer,
    set_motion_scale,
    transformer_from_sat,
)
from layerflow.io.atomic import TargetInTheWayError  # noqa: E402
from layerflow.models.dit import LayerFlowDiT  # noqa: E402
from layerflow.tasks import LAYOUTS  # noqa: E402
from layerflow.weights.checkpoint import load_network  # noqa: E402
from layerflow.weights.random import randomize_  # noqa: E402

CONFIGS = [f"{task.value}_{variant.value}" for task, variant in LAYOUTS]
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("model_parallel")


def tiny_network(name: str, seed: int = 0) -> tuple[LayerFlowDiT, object]:
    """Our tiny network of a config with seeded random weights (LoRA factors nonzero; a learned
    position table moved off the sin-cos values, text rows included)."""
    config = tiny_config(name)
    network = LayerFlowDiT(config.network).eval()
    randomize_(network, seed)
    if config.network.learnable_pos_embed:
        table = network.mixins.pos_embed.pos_embedding
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            table.add_(0.1 * torch.randn(table.shape, generator=generator))
    return network, config


def tiny_inputs(config, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (b, T, c, H, W) over the task's whole stack of layers, timesteps (b,), context (b, L, e)."""
    network = config.network
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(
        batch,
        config.layout.latent_frames,
        network.in_channels,
        network.latent_height,
        network.latent_width,
        generator=generator,
    )
    timesteps = torch.tensor([999.0, 249.0])[:batch]
    context = torch.randn(batch, network.text_length, network.text_hidden_size, generator=generator)
    return x, timesteps, context


def diffusers_v(model: LayerFlowTransformer3DModel, x, timesteps, context) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=context, timestep=timesteps, return_dict=False)[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_our_network(name):
    network, config = tiny_network(name)
    model = transformer_from_sat(network.state_dict(), config.network)
    x, timesteps, context = tiny_inputs(config)
    with torch.no_grad():
        ours = network(x, timesteps, context)
    theirs = diffusers_v(model, x, timesteps, context)
    assert theirs.shape == ours.shape == x.shape
    assert (theirs - ours).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("case", reference_cases())
def test_forward_of_released_checkpoint_format_equals_ours(reference_dir, case):
    """The fixtures' checkpoints (written by the original code) and recorded inputs."""
    case_dir = reference_dir / case
    config = case_dit_config(case_dir)
    network = LayerFlowDiT(config).eval()
    load_network(network, case_dir / "ckpt", case_layout(case_dir))
    model = transformer_from_sat(network.state_dict(), config)
    recorded = load_pt(case_dir / "forward.pt")
    x, timesteps = recorded["x"], recorded["timesteps"]
    context = batch_major_context(recorded["context"], x.shape[0])
    with torch.no_grad():
        ours = network(x, timesteps, context)
    assert (diffusers_v(model, x, timesteps, context) - ours).abs().max().item() <= TOLERANCE


def test_content_adapter_carries_sats_scale():
    """peft scales by lora_alpha / r: the content adapter must have SAT's alpha (1), not alpha = r."""
    network, config = tiny_network("gen_rgba")
    lora = config.network.lora
    model = transformer_from_sat(network.state_dict(), config.network)
    projection = model.transformer_blocks[0].attn1.to_q
    assert projection.scaling["content"] == pytest.approx(lora.lora_alpha / lora.spatial_r)
    assert projection.scaling["content"] != pytest.approx(1.0)
    x, timesteps, context = tiny_inputs(config)
    with torch.no_grad():
        ours = network(x, timesteps, context)
    with_content = diffusers_v(model, x, timesteps, context)
    model.disable_adapters()
    without = diffusers_v(model, x, timesteps, context)
    model.enable_adapters()
    set_motion_scale(model, 0.0)
    assert (with_content - ours).abs().max().item() <= TOLERANCE
    assert (without - ours).abs().max().item() > 1e-3, "the content LoRA must change the output"


@pytest.mark.parametrize("scale", [0.5, 1.0, -2.0])
def test_motion_adapter_matches_lora_scale(scale):
    network, config = tiny_network("fg2bg_rgb")
    model = transformer_from_sat(network.state_dict(), config.network)
    assert model.active_adapters() == ["content"], "motion is off at inference"
    x, timesteps, context = tiny_inputs(config)
    with torch.no_grad():
        ours = network(x, timesteps, context, lora_scale=scale)
        ours_off = network(x, timesteps, context)
    set_motion_scale(model, scale)
    theirs = diffusers_v(model, x, timesteps, context)
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    assert (theirs - ours_off).abs().max().item() > 1e-3, "the motion adapter must change the output"
    set_motion_scale(model, 0.0)
    assert (diffusers_v(model, x, timesteps, context) - ours_off).abs().max().item() <= TOLERANCE


def test_saving_replaces_an_earlier_save_but_never_a_folder_of_someone_else(tmp_path):
    network, config = tiny_network("gen_rgb")
    model = transformer_from_sat(network.state_dict(), config.network)
    folder = save_transformer(model, tmp_path / "transformer")
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("{", '{"stale": 1,', 1))
    save_transformer(model, folder)  # an earlier save: replaced, with a fresh config
    assert "stale" not in json.loads((folder / "config.json").read_text())
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(TargetInTheWayError, match="theirs: exists and may not be replaced"):
        save_transformer(model, theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs", "transformer"]  # no temporary left


@pytest.mark.parametrize("name", ["gen_rgba", "seg_rgb"])  # sin-cos table + layer embedding; learned table
def test_saved_folder_loads_back_exactly(name, tmp_path):
    network, config = tiny_network(name)
    model = transformer_from_sat(network.state_dict(), config.network)
    folder = save_transformer(model, tmp_path / "transformer")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "content_lora.safetensors",
        "diffusion_pytorch_model.safetensors",
        "motion_lora.safetensors",
    ]
    loaded = load_transformer(folder)
    assert loaded.active_adapters() == ["content"]
    saved, restored = model.state_dict(), loaded.state_dict()
    assert sorted(saved) == sorted(restored)
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    x, timesteps, context = tiny_inputs(config)
    assert torch.equal(diffusers_v(loaded, x, timesteps, context), diffusers_v(model, x, timesteps, context))
    set_motion_scale(loaded, 1.0)
    set_motion_scale(model, 1.0)
    assert torch.equal(diffusers_v(loaded, x, timesteps, context), diffusers_v(model, x, timesteps, context))


def test_base_weights_are_plain_diffusers_and_adapters_record_alpha(tmp_path):
    """Without our adapters the saved weights load into the bare class; the LoRA files name alpha and rank."""
    import json

    from safetensors import safe_open

    network, config = tiny_network("gen_rgb")
    model = transformer_from_sat(network.state_dict(), config.network)
    folder = save_transformer(model, tmp_path / "transformer")
    bare = LayerFlowTransformer3DModel.from_pretrained(folder)
    assert not getattr(bare, "peft_config", {})
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert not [key for key in handle.keys() if "lora" in key or "base_layer" in key]
    lora = config.network.lora
    for name, rank in (("content", lora.spatial_r), ("motion", lora.motion_r)):
        with safe_open(str(folder / f"{name}_lora.safetensors"), framework="pt") as handle:
            peft_config = json.loads(handle.metadata()["lora_adapter_metadata"])
            assert handle.get_tensor("transformer.transformer_blocks.0.attn1.to_v.lora_B.weight").shape[1] == rank
        assert (peft_config["transformer.r"], peft_config["transformer.lora_alpha"]) == (rank, lora.lora_alpha)


def test_bfloat16_export_keeps_its_dtype(tmp_path):
    network, config = tiny_network("bg2fg_rgba")
    model = transformer_from_sat(network.state_dict(), config.network, dtype=torch.bfloat16)
    assert {value.dtype for value in model.state_dict().values()} == {torch.bfloat16}
    loaded = load_transformer(save_transformer(model, tmp_path / "transformer"), dtype=torch.bfloat16)
    assert {value.dtype for value in loaded.state_dict().values()} == {torch.bfloat16}
    x, timesteps, context = tiny_inputs(config)
    assert diffusers_v(loaded, x.bfloat16(), timesteps, context.bfloat16()).dtype == torch.bfloat16


def test_norms_and_activation_are_ours():
    """Each LayerNorm's epsilon (1e-5 in the blocks, 1e-6 for q/k and the final adaLN) and the tanh GELU."""
    network, config = tiny_network("gen_rgba")
    model = transformer_from_sat(network.state_dict(), config.network)
    layer, block = network.transformer.layers[0], model.transformer_blocks[0]
    adaln, mixins = network.mixins.adaln_layer, network.mixins
    pairs = [
        (layer.input_layernorm, block.norm1.norm),
        (layer.post_attention_layernorm, block.norm2.norm),
        (adaln.query_layernorm_list[0], block.attn1.norm_q),
        (adaln.key_layernorm_list[0], block.attn1.norm_k),
        (network.transformer.final_layernorm, model.norm_final),
        (mixins.final_layer.norm_final, model.norm_out.norm),
        (mixins.pos_embed.txt_embedder[1], model.patch_embed.txt_embedder[1]),
    ]
    assert [theirs.eps for _, theirs in pairs] == [ours.eps for ours, _ in pairs]
    assert block.ff.net[0].approximate == layer.mlp.activation_func.approximate == "tanh"


@pytest.mark.filterwarnings("ignore:Already found a:UserWarning")  # peft, on the second adapter: by design
def test_adapter_files_load_through_the_pipelines_lora_loader(tmp_path):
    """What ``CogVideoXPipeline.load_lora_weights`` does with our files gives the same model."""
    from diffusers.loaders import CogVideoXLoraLoaderMixin

    network, config = tiny_network("gen_rgba")
    model = transformer_from_sat(network.state_dict(), config.network)
    folder = save_transformer(model, tmp_path / "transformer")
    bare = LayerFlowTransformer3DModel.from_pretrained(folder)
    for name in ("content", "motion"):
        state, metadata = CogVideoXLoraLoaderMixin.lora_state_dict(
            str(folder), weight_name=f"{name}_lora.safetensors", return_lora_metadata=True
        )
        CogVideoXLoraLoaderMixin.load_lora_into_transformer(
            state, transformer=bare, adapter_name=name, metadata=metadata
        )
    set_motion_scale(bare, 0.0)
    x, timesteps, context = tiny_inputs(config)
    assert torch.equal(diffusers_v(bare, x, timesteps, context), diffusers_v(model, x, timesteps, context))


@pytest.mark.slow  # ~130M parameters on the CPU
def test_full_width_blocks_equal_ours():
    """The released width (30 heads of 64, T5 width 4096, LoRA ranks 256 and 8), two blocks, a small grid."""
    from dataclasses import replace

    from conftest import CONFIGS as CONFIG_DIR

    from layerflow.config import load_config

    config = load_config([CONFIG_DIR / "model.yaml", CONFIG_DIR / "tasks" / "gen_rgba.yaml"])
    network_config = replace(config.network, num_layers=2, latent_height=4, latent_width=6)
    network = randomize_(LayerFlowDiT(network_config).eval(), 0)
    model = transformer_from_sat(network.state_dict(), network_config)
    assert (model.config.num_attention_heads, model.config.attention_head_dim) == (30, 64)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.layout.latent_frames, 16, 4, 6, generator=generator)
    context = torch.randn(2, network_config.text_length, network_config.text_hidden_size, generator=generator)
    timesteps = torch.tensor([999.0, 10.0])
    for scale in (0.0, 1.0):
        with torch.no_grad():
            ours = network(x, timesteps, context, lora_scale=scale)
        set_motion_scale(model, scale)
        assert (diffusers_v(model, x, timesteps, context) - ours).abs().max().item() <= TOLERANCE
