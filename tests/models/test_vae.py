"""The 3D causal VAE against the reference fixtures (vae/), its chunked decode, its loader and its schema."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from reference import vae_config_from_json

from layerflow.models.vae import CausalVideoVAE, VAEConfig, _ActivationPlacement
from layerflow.weights.vae import VAECheckpointError, load_vae

TOL = dict(atol=1e-4, rtol=1e-4)  # the fixture README's VAE tolerance


@pytest.fixture(scope="module")
def vae_dir(reference_dir: Path) -> Path:
    return reference_dir / "vae"


@pytest.fixture(scope="module")
def config(vae_dir: Path) -> VAEConfig:
    return vae_config_from_json(vae_dir / "vae.json")


@pytest.fixture(scope="module")
def vae(vae_dir: Path, config: VAEConfig) -> CausalVideoVAE:
    return load_vae(vae_dir / "3d-vae.pt", config)


@pytest.fixture(scope="module")
def clip(vae_dir: Path) -> dict:
    return torch.load(vae_dir / "encode_decode_17f.pt", weights_only=True)


@pytest.fixture(scope="module")
def sweep(vae_dir: Path) -> dict:
    return torch.load(vae_dir / "frame_sweep.pt", weights_only=True)


def test_config_reads_the_fixture_sizes(vae_dir: Path, config: VAEConfig, vae: CausalVideoVAE):
    spec = json.loads((vae_dir / "vae.json").read_text())
    enc = spec["encoder"]["params"]
    assert (config.ch, list(config.ch_mult), config.num_res_blocks, config.z_channels) == (
        enc["ch"],
        enc["ch_mult"],
        enc["num_res_blocks"],
        enc["z_channels"],
    )
    assert config.encoder_gather_norm == enc["gather_norm"]
    assert config.scale_factor == spec["scale_factor_used_by_engine"]
    assert sum(p.numel() for p in vae.parameters()) == spec["n_params"]
    assert len(vae.state_dict()) == spec["n_keys"]


def test_encoder_moments_and_posterior(vae: CausalVideoVAE, clip: dict):
    with torch.no_grad():
        moments = vae.encoder(clip["input_video"])
        posterior = vae.posterior(clip["input_video"])
    torch.testing.assert_close(moments, clip["encoder_moments"], **TOL)
    torch.testing.assert_close(posterior.mean, clip["posterior_mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, clip["posterior_logvar_clamped"], **TOL)


def test_posterior_sample_follows_the_reference_draw(vae: CausalVideoVAE, clip: dict):
    seed = int(clip["sample_seed"])
    with torch.no_grad():
        posterior = vae.posterior(clip["input_video"])
        torch.manual_seed(seed)
        global_draw = vae.encode(clip["input_video"])
        own_draw = posterior.sample(torch.Generator().manual_seed(seed))
    torch.testing.assert_close(global_draw, clip["posterior_sample"], **TOL)
    torch.testing.assert_close(own_draw, clip["posterior_sample"], **TOL)
    torch.testing.assert_close(posterior.mean + posterior.std * clip["sample_eps"], clip["posterior_sample"], **TOL)


def test_decode_given_latent(vae: CausalVideoVAE, clip: dict):
    with torch.no_grad():
        video = vae.decode(clip["latent_given"])
    torch.testing.assert_close(video, clip["decoded_from_latent_given"], **TOL)


def test_frame_sweep(vae: CausalVideoVAE, sweep: dict, vae_dir: Path):
    table = {row["input_frames"]: row for row in json.loads((vae_dir / "vae.json").read_text())["frame_count_table"]}
    assert len(sweep) == len(table)
    for case in sweep.values():
        frames = case["input_video"].shape[2]
        with torch.no_grad():
            mean = vae.posterior(case["input_video"]).mean
            video = vae.decode(case["posterior_mean"])
        assert mean.shape[2] == case["posterior_mean"].shape[2] == table[frames]["latent_frames"], frames
        assert video.shape[2] == table[frames]["decoded_frames"], frames
        torch.testing.assert_close(mean, case["posterior_mean"], **TOL, msg=f"posterior mean, {frames} frames")
        torch.testing.assert_close(video, case["decoded_from_mean"], **TOL, msg=f"decode, {frames} frames")


def test_scale_factor_helpers(vae: CausalVideoVAE, sweep: dict, config: VAEConfig):
    case = min(sweep.values(), key=lambda c: c["input_video"].shape[2])
    with torch.no_grad():
        video = vae.decode_from_latent(config.scale_factor * case["posterior_mean"])
        torch.manual_seed(0)
        latent = vae.encode_to_latent(case["input_video"])
        torch.manual_seed(0)
        sample = vae.encode(case["input_video"])
    torch.testing.assert_close(video, case["decoded_from_mean"], **TOL)
    torch.testing.assert_close(latent, config.scale_factor * sample)


@pytest.mark.parametrize(
    "temporal_chunk, spatial_tile", [(2, None), (None, (2, 3)), pytest.param(1, (3, 4), marks=pytest.mark.slow)]
)
def test_chunked_decode_equals_plain_decode(vae: CausalVideoVAE, clip: dict, temporal_chunk, spatial_tile):
    with torch.no_grad():
        video = vae.decode(
            clip["latent_given"], temporal_chunk=temporal_chunk, spatial_tile=spatial_tile, buffer_device="cpu"
        )
    torch.testing.assert_close(video, clip["decoded_from_latent_given"], atol=1e-5, rtol=1e-5)


def test_chunked_decode_is_exact_in_float64(vae_dir: Path, config: VAEConfig, sweep: dict):
    vae64 = load_vae(vae_dir / "3d-vae.pt", config, dtype=torch.float64)
    short = sorted(sweep.values(), key=lambda c: c["input_video"].shape[2])[:2]  # an even and an odd count
    assert {c["posterior_mean"].shape[2] % 2 for c in short} == {0, 1}
    for case in short:
        latent = case["posterior_mean"].double()
        with torch.no_grad():
            plain = vae64.decode(latent)
            chunked = vae64.decode(latent, temporal_chunk=2, spatial_tile=(1, 1))
        torch.testing.assert_close(chunked, plain, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("temporal_chunk, spatial_tile", [(2, None), (3, (2, 3))])
def test_streamed_encode_equals_plain_encode(vae: CausalVideoVAE, clip: dict, temporal_chunk, spatial_tile):
    """Region-by-region encode (halos, frame pairs, whole-activation statistics) against the one-call encode."""
    with torch.no_grad():
        plain = vae.posterior(clip["input_video"])
        streamed = vae.posterior(
            clip["input_video"],
            temporal_chunk=temporal_chunk,
            spatial_tile=spatial_tile,
            buffer_device="cpu",
            device_budget=0,
        )
    # float32 rounding of the GroupNorm statistics only, as for the decode (module docstring)
    torch.testing.assert_close(streamed.mean, plain.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed.logvar, plain.logvar, atol=1e-5, rtol=1e-5)


def test_streamed_encode_is_exact_in_float64(vae_dir: Path, config: VAEConfig, sweep: dict):
    vae64 = load_vae(vae_dir / "3d-vae.pt", config, dtype=torch.float64)
    short = sorted(sweep.values(), key=lambda c: c["input_video"].shape[2])[:2]  # an even and an odd count
    assert {c["input_video"].shape[2] % 2 for c in short} == {0, 1}
    for case in short:
        video = case["input_video"].double()
        with torch.no_grad():
            plain = vae64.encoder(video)
            streamed = vae64._streamed(tuple(plain.shape[2:]), video.device, 1, (1, 1)).encode(vae64.encoder, video)
        torch.testing.assert_close(streamed, plain, atol=1e-10, rtol=1e-10)


def test_activations_beyond_the_budget_go_to_the_buffer_device():
    """Each whole activation goes to the compute device while the ones held there fit the byte budget."""
    placement = _ActivationPlacement(torch.device("cpu"), torch.device("meta"), budget=250 * 4)  # 250 floats
    first = placement.new((100,), torch.float32, zeros=False)
    second = placement.new((200,), torch.float32, zeros=True)
    assert (first.device.type, second.device.type) == ("cpu", "meta")  # 100 + 200 floats > 250
    third = placement.new((100,), torch.float32, zeros=False)
    assert third.device.type == "cpu" and placement.resident == 200 * 4
    del first, third
    assert placement.resident == 0  # released when the activations are garbage
    assert placement.new((250,), torch.float32, zeros=False).device.type == "cpu"


def test_budgeted_decode_equals_plain_decode(vae: CausalVideoVAE, clip: dict):
    """A budget that holds some activations but not all gives the same video as the one-call decode."""
    latent = clip["latent_given"]
    with torch.no_grad():
        video = vae.decode(
            latent,
            temporal_chunk=2,
            spatial_tile=(2, 3),
            buffer_device="cpu",
            device_budget=video_bytes(vae, latent) // 2,
        )
    torch.testing.assert_close(video, clip["decoded_from_latent_given"], atol=1e-5, rtol=1e-5)


def video_bytes(vae: CausalVideoVAE, latent: torch.Tensor) -> int:
    t, h, w = latent.shape[2:]
    s = vae.config.spatial_compression
    return vae.config.ch * (1 + (t - 1) * vae.config.temporal_compress_times) * h * s * w * s * 4


def test_bad_inputs_are_named(vae: CausalVideoVAE, config: VAEConfig):
    s = config.spatial_compression
    with pytest.raises(ValueError, match="frames"):
        vae.posterior(torch.zeros(1, config.in_channels, config.temporal_compress_times + 2, s, s))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, config.z_channels + 1, 1, 1, 1))
    with pytest.raises(ValueError, match="norm groups"):
        VAEConfig(ch=config.norm_groups + 1)


# ---------------------------------------------------------------------------------------------------
# Loader


def _state(vae_dir: Path) -> dict:
    return torch.load(vae_dir / "3d-vae.pt", weights_only=True)["state_dict"]


def test_missing_file(tmp_path: Path, config: VAEConfig):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_vae(tmp_path / "nope.pt", config)


def test_truncated_file(tmp_path: Path, vae_dir: Path, config: VAEConfig):
    data = (vae_dir / "3d-vae.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VAECheckpointError, match="truncated.pt"):
        load_vae(path, config)


def test_missing_unexpected_and_misshapen_keys(tmp_path: Path, vae_dir: Path, config: VAEConfig):
    state = _state(vae_dir)
    dropped = sorted(state)[len(state) // 2]
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != dropped}}, path)
    with pytest.raises(VAECheckpointError, match=dropped):
        load_vae(path, config)

    torch.save({"state_dict": {**state, "decoder.extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(VAECheckpointError, match="decoder.extra.weight"):
        load_vae(path, config)

    key = "decoder.conv_out.conv.bias"
    torch.save({"state_dict": {**state, key: torch.zeros(state[key].numel() + 1)}}, path)
    with pytest.raises(VAECheckpointError, match=key):
        load_vae(path, config)


def test_loss_keys_are_dropped(tmp_path: Path, vae_dir: Path, config: VAEConfig, vae: CausalVideoVAE):
    path = tmp_path / "with_loss.pt"
    torch.save({"state_dict": {**_state(vae_dir), "loss.discriminator.weight": torch.ones(2)}}, path)
    loaded = load_vae(path, config)
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class _Payload:
    """Unpickling this writes a marker file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_code_running_pickle_is_refused(tmp_path: Path, config: VAEConfig):
    live_marker, marker = tmp_path / "live", tmp_path / "marker"
    torch.save({"state_dict": {"x": _Payload(live_marker)}}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert live_marker.exists()

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Payload(marker)}}, path)
    with pytest.raises(VAECheckpointError, match="evil.pt"):
        load_vae(path, config)
    assert not marker.exists()


def test_copy_of_the_fixture_loads_bit_exact(tmp_path: Path, vae_dir: Path, config: VAEConfig):
    path = tmp_path / "copy.pt"
    shutil.copy(vae_dir / "3d-vae.pt", path)
    loaded = load_vae(path, config)
    state = _state(vae_dir)
    assert set(loaded.state_dict()) == {k for k in state if not k.startswith("loss")}
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------------------------------------------
# Full-size schema


def test_full_size_schema(reference_dir: Path):
    schema = json.loads((reference_dir / "full_size_keys" / "vae_full.json").read_text())
    with torch.device("meta"):
        model = CausalVideoVAE(VAEConfig.cogvideox_2b())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {row["key"]: row["shape"] for row in schema["keys"]}
    assert sorted(set(ours) ^ set(theirs)) == []
    assert ours == theirs
    assert len(ours) == schema["n_keys"]
    assert sum(math.prod(s) for s in ours.values()) == schema["total_parameters"]
    assert sum(p.numel() for p in model.parameters()) == schema["total_parameters"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(vae_dir: Path, config: VAEConfig, sweep: dict, device: str):
    case = min(sweep.values(), key=lambda c: c["input_video"].shape[2])  # bf16 convs are slow on CPU
    vae_bf16 = load_vae(vae_dir / "3d-vae.pt", config, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        mean = vae_bf16.posterior(case["input_video"]).mean
        plain = vae_bf16.decode(case["posterior_mean"])
        chunked = vae_bf16.decode(case["posterior_mean"], temporal_chunk=2, spatial_tile=(1, 2))
    for out in (mean, plain, chunked):
        assert out.dtype == torch.bfloat16 and out.device.type == device
    # bf16 keeps about 3 significant digits; 20 layers deep that is a few percent of the range
    for ours, theirs in (
        (mean, case["posterior_mean"]),
        (plain, case["decoded_from_mean"]),
        (chunked, case["decoded_from_mean"]),
    ):
        assert (ours.float().cpu() - theirs).abs().max() < 0.05 * theirs.abs().max()
