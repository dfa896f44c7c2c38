"""benchmarks/memory_estimate.py: live-byte accounting under fake tensors, and the memory presets."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_config, tiny_files

from layerflow.config import ConfigError, load_config

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import memory_estimate  # noqa: E402
from memory_estimate import COMPUTE, HOST, Estimator, LiveBytes  # noqa: E402

CONFIGS = REPO_ROOT / "configs"
PRESETS = ("memory_24gb.yaml", "memory_12gb.yaml")
FLOAT = 4  # bytes


def test_live_bytes_of_a_known_op_sequence():
    """Peak, live and copied bytes follow storages: views share, frees count, host memory does not."""
    fake = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveBytes()
    with fake, tracker:
        a = torch.empty(1000, device=COMPUTE)  # 4000
        b = a * 2  # 8000 live
        del a  # 4000
        view = b.view(10, 100)  # same storage: still 4000
        both = torch.cat([b, view.flatten()])  # 2000 floats more: 12000, the peak
        del both  # 4000
        parked = b.to(HOST)  # CPU memory: not counted, 4000 bytes copied out
        back = parked.to(COMPUTE)  # 4000 copied in: 8000 live
        assert tracker.live == 2000 * FLOAT
        del back, parked, view, b
    assert tracker.peak == 3000 * FLOAT
    assert tracker.live == 0
    assert (tracker.to_device, tracker.from_device) == (1000 * FLOAT, 1000 * FLOAT)


@pytest.fixture(scope="module")
def tiny_fg2bg():
    return tiny_config("fg2bg_rgba", "runtime.dtype=bfloat16")


def test_decode_stage_counts_the_resident_weights(tiny_fg2bg):
    """Without offload the transformer and the VAE sit on the device during the decode; with it, the VAE."""
    for offload in (False, True):
        config = load_config(
            list(tiny_fg2bg.sources), ["runtime.dtype=bfloat16", f"runtime.model_cpu_offload={str(offload).lower()}"]
        )
        estimator = Estimator(config)
        models = [estimator.vae] if offload else [estimator.vae, estimator.network]
        expected = sum(t.numel() * 2 for m in models for t in (*m.parameters(), *m.buffers()))
        (decode,) = estimator.run(("vae_decode",))
        assert decode.weights_bytes == expected
        assert decode.peak_bytes > expected  # the activations come on top


def test_streamed_decode_peaks_lower_than_one_call(tiny_fg2bg):
    plain = Estimator(tiny_fg2bg).run(("vae_decode",))[0]
    config = load_config(list(tiny_fg2bg.sources), ["runtime.dtype=bfloat16", "runtime.vae_spatial_tile=4"])
    streamed = Estimator(config).run(("vae_decode",))[0]
    assert streamed.peak_bytes < plain.peak_bytes
    assert streamed.to_device_bytes == 0  # no budget: every activation stays on the device


def test_a_budget_parks_activations_in_cpu_memory(tiny_fg2bg):
    config = load_config(
        list(tiny_fg2bg.sources),
        ["runtime.dtype=bfloat16", "runtime.vae_spatial_tile=4", "runtime.vae_device_budget_gib=0.0001"],
    )
    streamed = Estimator(config).run(("vae_decode",))[0]
    assert streamed.to_device_bytes > 0 and streamed.from_device_bytes > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_stream_the_vae(preset):
    config = load_config([CONFIGS / "model.yaml", CONFIGS / "tasks" / "fg2bg_rgba.yaml", CONFIGS / preset])
    runtime = config.runtime
    assert runtime.model_cpu_offload and not runtime.keep_text_encoder
    streaming = runtime.vae_streaming
    assert streaming["spatial_tile"] == (runtime.vae_spatial_tile, runtime.vae_spatial_tile)
    assert ("device_budget" in streaming) == (runtime.vae_device_budget_gib > 0)
    assert config.network.num_frames == 65  # the preset leaves the model alone


def test_bad_budget_is_one_line():
    with pytest.raises(ConfigError) as error:
        load_config([CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgba.yaml"], ["runtime.vae_device_budget_gib=-2"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("runtime.vae_device_budget_gib = -2.0 (from --set runtime.vae_device_budget_gib=-2)")


def test_table_names_every_stage():
    stage = memory_estimate.StageEstimate("vae_decode", 3 * 2**30, 2**30, 2**31, 0, 10**12)
    text = memory_estimate.table([("fg2bg_rgba", [stage])])
    assert "| fg2bg_rgba | - | - | - | 3.0 | 3.0 | vae_decode 2.0/0.0 |" in text


@pytest.mark.slow
def test_pipeline_streams_the_encode_and_decode_it_is_configured_for():
    """The runtime keys reach both VAE stages of the pipeline; results equal the one-call VAE (float32)."""
    import dataclasses

    from layerflow.pipeline import LayerFlowPipeline

    files = tiny_files("fg2bg_rgba")
    pipeline = LayerFlowPipeline(load_config(files))
    layout, config = pipeline.layout, pipeline.config
    height, width = config.video_size
    noise = torch.Generator().manual_seed(0)
    given = {
        name: torch.rand(layout.span(name).pixel_frames, 3, height, width, generator=noise) * 2 - 1
        for name in layout.given_layers
    }
    generated = torch.randn(1, layout.generated_frames, 16, 8, 12, generator=noise)
    plain_latent = pipeline.encode_given_layers(given, seed=5)
    plain_video = pipeline.decode_layers(generated, plain_latent)
    streamed_runtime = dataclasses.replace(config.runtime, vae_spatial_tile=6, vae_device_budget_gib=1e-6)
    pipeline.config = dataclasses.replace(config, runtime=streamed_runtime)
    streamed_latent = pipeline.encode_given_layers(given, seed=5)
    streamed_video = pipeline.decode_layers(generated, plain_latent)
    torch.testing.assert_close(streamed_latent, plain_latent, atol=1e-4, rtol=1e-4)
    for name in plain_video:
        torch.testing.assert_close(streamed_video[name], plain_video[name], atol=1e-4, rtol=1e-4)
