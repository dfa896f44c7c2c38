"""One video on several processes (CPU, gloo, tiny model, float32): guidance pairs, Ulysses, split decode.

Each parallel run is compared with the same sampling in one process. The multi-process runs use
``torch.multiprocessing`` (spawn) with a file store, one thread per process.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO_ROOT

from layerflow.config import ConfigError, load_config
from layerflow.parallel.layout import GroupLayout, check_layout, token_chunks

CONFIGS = REPO_ROOT / "configs"
SEED = 11


def tiny_config(name: str, *overrides: str):
    variant = name.split("_")[1]
    return load_config([CONFIGS / f"model_{variant}.yaml", CONFIGS / "tasks" / f"{name}.yaml", CONFIGS / "tiny.yaml"],
                       ["sampling.num_steps=3", *overrides])


def inputs(config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text states (1, L, e) and clean given latents (1, T_cond, c, h, w), the same in every process."""
    generator = torch.Generator().manual_seed(5)
    net, layout = config.network, config.layout
    context = torch.randn(1, layout.text_length, net.text_hidden_size, generator=generator)
    if layout.condition is None:
        return context, None
    shape = (1, layout.condition_frames, net.in_channels, net.latent_height, net.latent_width)
    return context, torch.randn(shape, generator=generator)


def _worker(rank: int, world: int, store: str, name: str, overrides: tuple[str, ...], result: str) -> None:
    """One rank: sample the latents (and decode them) with ``overrides``; rank 0 saves both."""
    import torch.distributed as dist

    from layerflow import distributed, parallel
    from layerflow.pipeline import LayerFlowPipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    distributed.ensure_model_parallel()
    config = tiny_config(name, *overrides)
    parallel.setup(config.runtime.parallel)
    pipeline = LayerFlowPipeline(config)
    context, condition = inputs(config)
    latent = pipeline.sample_latents(context, condition, seed=SEED)
    layers = pipeline.decode_layers(latent, condition)
    if rank == 0:
        torch.save({"latent": latent, "layers": layers}, result)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, name: str, *overrides: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        store, result = os.path.join(folder, "store"), os.path.join(folder, "result.pt")
        mp.spawn(_worker, args=(world, store, name, overrides, result), nprocs=world, join=True)
        return torch.load(result, weights_only=True)


@pytest.fixture(scope="module")
def single():
    """One process, no parallelism, batched guidance (the default), decoded in two temporal chunks."""
    return run_ranks(1, "fg2bg_rgba", "runtime.vae_temporal_chunk=9")


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_guidance_pair_matches_one_process(single):
    """cfg=2: the two halves of the guidance batch run in two processes as batches of one. The tiny
    network's batch-of-1 and batch-of-2 matmuls may round differently, so the bound is float32
    reassociation over 3 steps: 1e-5 (|latent| is about 1)."""
    pair = run_ranks(2, "fg2bg_rgba", "runtime.parallel.cfg=2", "runtime.vae_temporal_chunk=9")
    assert pair["latent"].shape == single["latent"].shape
    assert max_difference(pair["latent"], single["latent"]) <= 1e-5
    for name, video in single["layers"].items():
        assert max_difference(pair["layers"][name], video) <= 1e-4, name


@pytest.mark.slow
def test_ulysses_matches_one_process(single):
    """ulysses=2 (slices of 543 tokens: rank 0 all text, rank 1 text and video) and ulysses=4 (uneven
    slices of 272, 272, 271, 271 tokens) against one process, within 1e-5 in float32."""
    for degree in (2, 4):
        split = run_ranks(degree, "fg2bg_rgba", f"runtime.parallel.ulysses={degree}", "runtime.vae_temporal_chunk=9")
        assert max_difference(split["latent"], single["latent"]) <= 1e-5, degree


@pytest.mark.slow
def test_guidance_pair_times_ulysses_matches_one_process(single):
    both = run_ranks(4, "fg2bg_rgba", "runtime.parallel.cfg=2", "runtime.parallel.ulysses=2",
                     "runtime.vae_temporal_chunk=9")
    assert max_difference(both["latent"], single["latent"]) <= 1e-5


def test_split_decode_equals_one_rank_decode():
    """The VAE decode dealt out over 2 ranks equals the one-rank decode with the same regions exactly,
    and the default split (one temporal chunk per rank) is the one-call decode up to float rounding."""
    from layerflow.pipeline import LayerFlowPipeline

    config = tiny_config("fg2bg_rgba", "runtime.vae_temporal_chunk=5")
    pipeline = LayerFlowPipeline(config)
    latent = torch.randn(1, config.layout.generated_frames, 16, 8, 12, generator=torch.Generator().manual_seed(2))
    condition = inputs(config)[1]
    one_rank = pipeline.decode_layers(latent, condition)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "latent.pt"
        torch.save({"latent": latent, "condition": condition}, path)
        store, result = os.path.join(folder, "store"), os.path.join(folder, "result.pt")
        mp.spawn(_decode_worker, args=(2, store, str(path), result), nprocs=2, join=True)
        split = torch.load(result, weights_only=True)
    for name, video in one_rank.items():
        assert torch.equal(split["chunked"][name], video), name
    one_call = LayerFlowPipeline(tiny_config("fg2bg_rgba")).decode_layers(latent, condition)
    for name, video in one_call.items():
        assert max_difference(split["default"][name], video) <= 1e-5, name


def _decode_worker(rank: int, world: int, store: str, latent_path: str, result: str) -> None:
    import torch.distributed as dist

    from layerflow import distributed, parallel
    from layerflow.pipeline import LayerFlowPipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    distributed.ensure_model_parallel()
    saved = torch.load(latent_path, weights_only=True)
    decoded = {}
    for key, overrides in (("chunked", ["runtime.vae_temporal_chunk=5"]), ("default", [])):
        config = tiny_config("fg2bg_rgba", "runtime.parallel.cfg=2", *overrides)
        parallel.setup(config.runtime.parallel)
        decoded[key] = LayerFlowPipeline(config).decode_layers(saved["latent"], saved["condition"])
    if rank == 0:
        torch.save(decoded, result)
    dist.barrier()
    dist.destroy_process_group()


# -- layouts and their errors --------------------------------------------------------------------


def test_groups_of_eight_ranks():
    layout = GroupLayout(8, cfg=2, ulysses=2)
    assert layout.num_groups == 2
    assert layout.group_ranks(1) == (4, 5, 6, 7)
    assert layout.ulysses_groups() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert layout.cfg_groups() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert [layout.cfg_index(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [r for r in range(8) if layout.is_leader(r)] == [0, 4]
    every = sorted(r for group in layout.ulysses_groups() for r in group)
    assert every == list(range(8))


def test_token_chunks_cover_the_sequence():
    assert token_chunks(1086, 4) == (272, 272, 271, 271)
    assert token_chunks(16878, 5) == (3376, 3376, 3376, 3375, 3375)
    assert sum(token_chunks(23628, 30)) == 23628


@pytest.mark.parametrize(("overrides", "world", "message"), [
    (["runtime.parallel.ulysses=3"], 3,
     r"^runtime\.parallel\.ulysses=3 must divide the 4 attention heads \(model\.network\.num_attention_heads\); "
     r"possible: 1, 2, 4$"),
    (["runtime.parallel.cfg=2", "runtime.parallel.ulysses=2"], 6,
     r"^runtime\.parallel\.cfg x ulysses = 2 x 2 = 4 ranks per video must divide the 6 processes"),
    (["runtime.parallel.cfg=2"], 1, r"2 ranks per video must divide the 1 processes"),
])
def test_impossible_layouts_are_refused(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(tiny_config("gen_rgb", *overrides), world)


def test_full_size_heads_allow_the_divisors_of_30():
    config = load_config([CONFIGS / "model_rgb.yaml", CONFIGS / "tasks" / "gen_rgb.yaml"],
                         ["runtime.parallel.ulysses=4"])
    with pytest.raises(ConfigError, match=r"the 30 attention heads .* possible: 1, 2, 3, 5, 6, 10, 15, 30$"):
        check_layout(config, 8)
    ok = load_config([CONFIGS / "model_rgb.yaml", CONFIGS / "tasks" / "gen_rgb.yaml"],
                     ["runtime.parallel.ulysses=5", "runtime.parallel.cfg=2"])
    assert check_layout(ok, 10).num_groups == 1


def test_parallel_degrees_are_checked_when_read():
    with pytest.raises(ConfigError, match=r"runtime\.parallel\.cfg must be 1 or 2"):
        tiny_config("gen_rgb", "runtime.parallel.cfg=3")
    with pytest.raises(ConfigError, match=r"unknown key runtime\.parallel\.ulyses .*runtime\.parallel\.ulysses\?"):
        tiny_config("gen_rgb", "runtime.parallel.ulyses=2")


def test_a_pipeline_refuses_groups_it_was_not_set_up_for():
    from layerflow.pipeline import LayerFlowPipeline

    with pytest.raises(ConfigError, match=r"process groups were formed for cfg=1, ulysses=1"):
        LayerFlowPipeline(tiny_config("gen_rgb", "runtime.parallel.cfg=2"))


def test_bad_layout_stops_the_cli_before_loading(capsys, tmp_path):
    from layerflow.cli import main

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"prompts": {"fg": "a", "bg": "b", "blend": "c"}}) + "\n", encoding="utf-8")
    code = main(["--base", str(CONFIGS / "model_rgb.yaml"), str(CONFIGS / "tasks" / "gen_rgb.yaml"),
                 str(CONFIGS / "tiny.yaml"), "--set", "runtime.parallel.ulysses=3", "--manifest", str(manifest),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: runtime.parallel.ulysses=3 must divide the 4 attention heads "
                   "(model.network.num_attention_heads); possible: 1, 2, 4"]
    assert not (tmp_path / "out").exists()
