"""Our VAE as diffusers' AutoencoderKLCogVideoX: strict key mapping both ways, and the same encode/decode.

Measured on the reference fixture's tiny VAE (float32, CPU, |x| <= 10): encode mean <= 4e-6 and decode
<= 2e-5 apart for 16, 17 and 65 frames when the diffusers VAE takes the whole clip at once
(:func:`whole_clip`); its default piecewise encode/decode differs by O(1) on these random weights.
"""

import json

import pytest
import torch
from conftest import reference_fixture_dir

pytest.importorskip("diffusers")

from layerflow.for_diffusers.vae_keys import (  # noqa: E402
    VAEExportError,
    diffusers_vae_state,
    sat_vae_state,
    vae_config_from_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
    whole_clip,
)
from layerflow.models.vae import CausalVideoVAE, VAEConfig  # noqa: E402
from layerflow.weights.vae import load_vae  # noqa: E402

TOLERANCE = {"mean": 1e-5, "decode": 5e-5}


@pytest.fixture(scope="module")
def fixture_vae():
    folder = reference_fixture_dir() / "vae"
    sizes = json.loads((folder / "vae.json").read_text())["encoder"]["params"]
    config = VAEConfig(ch=sizes["ch"], ch_mult=tuple(sizes["ch_mult"]), num_res_blocks=sizes["num_res_blocks"])
    return load_vae(folder / "3d-vae.pt", config)


def test_full_size_vae_keys_map_one_to_one():
    """The CogVideoX-2B VAE's schema (reference full_size_keys) maps onto diffusers' model and back, every key."""
    schema = json.loads((reference_fixture_dir() / "full_size_keys" / "vae_full.json").read_text())
    state = {
        entry["key"]: torch.empty(entry["shape"], device="meta")
        for entry in schema["keys"]
        if not entry["key"].startswith("loss")
    }
    assert len(schema["keys"]) == schema["n_keys"]
    config = VAEConfig.cogvideox_2b()
    mapped = diffusers_vae_state(state, config)
    assert len(mapped) == len(state)
    back = sat_vae_state(mapped, config)
    assert set(back) == set(state)


def test_a_missing_or_extra_key_is_refused(fixture_vae):
    state = dict(fixture_vae.state_dict())
    state.pop("decoder.conv_out.conv.bias")
    with pytest.raises(VAEExportError, match="decoder.conv_out.conv.bias"):
        diffusers_vae_state(state, fixture_vae.config)
    state = {**fixture_vae.state_dict(), "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(VAEExportError, match="encoder.extra.weight"):
        diffusers_vae_state(state, fixture_vae.config)


def test_round_trip_gives_back_every_tensor(fixture_vae):
    exported = vae_to_diffusers(fixture_vae, (32, 48))
    assert vae_config_from_diffusers(exported.config) == fixture_vae.config
    assert exported.config.scaling_factor == fixture_vae.config.scale_factor
    back = vae_from_diffusers(exported)
    for key, value in fixture_vae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("frames", [17, 16])
def test_diffusers_vae_encodes_and_decodes_like_ours(fixture_vae, frames):
    exported = vae_to_diffusers(fixture_vae, (32, 48))
    video = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        mean = fixture_vae.posterior(video).mean
        decoded = fixture_vae.decode(mean)
        with whole_clip(exported, frames, mean.shape[2]):
            their_mean = exported.encode(video).latent_dist.mean
            their_decoded = exported.decode(mean).sample
    assert their_mean.shape == mean.shape and their_decoded.shape == decoded.shape
    assert (their_mean - mean).abs().max() <= TOLERANCE["mean"]
    assert (their_decoded - decoded).abs().max() <= TOLERANCE["decode"]
    assert exported.num_latent_frames_batch_size == 2  # restored after the block


def test_tiny_model_vae_maps(fixture_vae):
    """The tiny built-in model's VAE (configs/tiny.yaml sizes) exports strictly too."""
    from conftest import tiny_config

    sizes = tiny_config("gen_rgb").model.vae.sizes
    vae = CausalVideoVAE(sizes)
    exported = vae_to_diffusers(vae, tiny_config("gen_rgb").video_size)
    assert exported.config.block_out_channels == tuple(sizes.ch * m for m in sizes.ch_mult)
    assert exported.config.layers_per_block == sizes.num_res_blocks
