"""Training on CPU with the tiny model: data, loss fidelity, parameter groups, learning, resume, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from layerflow.config import ConfigError, load_config
from layerflow.io.synthetic import layered_clip, write_layered_clip
from layerflow.models.dit import LayerFlowDiT
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.tasks import get_layout
from layerflow.training.cache import CacheError, LatentCache, prepare_cache
from layerflow.training.checkpointing import SAMPLE_CONFIG_FILE, write_sample_config
from layerflow.training.config import load_train_config
from layerflow.training.dataset import SampleError, read_layers, read_manifest
from layerflow.training.loss import NoisedBatch, alpha_table, diffusion_loss
from layerflow.training.params import parameter_group, select_trainable
from layerflow.training.trainer import Trainer, build_network, epoch_order, lr_factor
from layerflow.weights.checkpoint import NETWORK_PREFIX, SAT_MODEL_FILE, load_network
from layerflow.weights.resolve import resolve_weights

CONFIGS = REPO_ROOT / "configs"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"
FILES = [
    CONFIGS / "model.yaml",
    CONFIGS / "tasks" / "seg_rgb.yaml",
    CONFIGS / "train" / "content_lora.yaml",
    CONFIGS / "tiny.yaml",
]
HEIGHT, WIDTH = 32, 48  # pixels of the small test geometry: a 4x6 latent
SMALL = [
    "model.network.latent_height=4",
    "model.network.latent_width=6",
    "training.layers=[]",
    "training.tensorboard=false",
    "training.gradient_checkpointing=false",
]

pytestmark = pytest.mark.usefixtures("model_parallel")


def write_still(folder: Path, with_alpha: bool = True) -> dict[str, Path]:
    """A still layered sample at exactly the model's pixel size: RGBA (or RGB + mask) foreground and a background."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = layered_clip(1, HEIGHT, WIDTH)
    rgb, matte = layers["fg"][0], layers["alpha"][0]
    paths = {"bg": folder / "bg.png"}
    Image.fromarray(layers["bg"][0]).save(paths["bg"])
    if with_alpha:
        paths["fg"] = folder / "fg.png"
        Image.fromarray(np.concatenate([rgb, matte[..., None]], axis=-1), "RGBA").save(paths["fg"])
    else:
        paths["fg"], paths["mask"] = folder / "fg_rgb.png", folder / "mask.png"
        Image.fromarray(rgb).save(paths["fg"])
        Image.fromarray(matte).save(paths["mask"])
    return paths


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return path


PROMPTS = {"fg": "a red disc", "bg": "a textured wall", "blend": "a red disc over a textured wall"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two layered samples: a 16-frame video clip with its blend, and a still image without blend."""
    root = tmp_path_factory.mktemp("layered")
    clip = write_layered_clip(root / "clip", frames=16, height=64, width=96)
    write_still(root / "still")
    return write_manifest(
        root / "train.jsonl",
        [
            {
                "id": "clip",
                "prompts": PROMPTS,
                "inputs": {
                    "fg": str(clip["fg_rgba"].relative_to(root)),
                    "bg": "clip/bg.mp4",
                    "blend": "clip/blend.mp4",
                },
            },
            {"id": "still", "prompts": PROMPTS, "inputs": {"fg": "still/fg.png", "bg": "still/bg.png"}},
        ],
    )


def train_config(manifest: Path, save: Path, *overrides: str):
    cache = manifest.parent / "cache"
    config = load_train_config(
        FILES, [*SMALL, f"training.manifest={manifest}", f"training.cache={cache}", f"training.save={save}", *overrides]
    )
    resolve_weights(config)  # builds the tiny T5 once
    return config


@pytest.fixture(scope="module")
def prepared(dataset) -> Path:
    ensure_model_parallel()
    config = train_config(dataset, dataset.parent / "unused")
    prepare_cache(config, read_manifest(dataset, config.layout))
    return dataset


def trainer(manifest: Path, save: Path, *overrides: str) -> Trainer:
    config = train_config(manifest, save, *overrides)
    return Trainer(config, read_manifest(manifest, config.layout), show_progress=False)


# -- data -----------------------------------------------------------------------------------------------


def test_still_sample_without_blend_is_composited_and_frozen(tmp_path):
    paths = write_still(tmp_path / "still", with_alpha=False)
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {
                "id": "s",
                "prompts": PROMPTS,
                "inputs": {"fg": "still/fg_rgb.png", "mask": "still/mask.png", "bg": "still/bg.png"},
            }
        ],
    )
    (sample,) = read_manifest(manifest, get_layout("gen", "rgba"))
    assert sample.still
    layers = read_layers(sample, (HEIGHT, WIDTH))
    rgb = np.asarray(Image.open(paths["fg"]), dtype=np.float64) / 127.5 - 1
    alpha = np.asarray(Image.open(paths["mask"]), dtype=np.float64)[..., None] / 255
    bg = np.asarray(Image.open(paths["bg"]), dtype=np.float64) / 127.5 - 1
    expected = torch.from_numpy(alpha * rgb + (1 - alpha) * bg).permute(2, 0, 1).float()  # (3, H, W)
    for name in ("fg", "alpha", "bg", "blend"):
        assert layers[name].shape == (16, 3, HEIGHT, WIDTH)
        assert torch.equal(layers[name], layers[name][:1].expand_as(layers[name])), f"{name} is not frozen"
    assert torch.allclose(layers["blend"][0], expected, atol=1e-5)
    alpha_layer = torch.from_numpy(alpha * 2 - 1).permute(2, 0, 1).float().expand(3, -1, -1)  # (3, H, W)
    assert torch.allclose(layers["alpha"][0], alpha_layer, atol=1e-6)


def test_a_video_foreground_is_decoded_once_and_read_as_the_sampling_readers_read_it(dataset, monkeypatch):
    """fg.mp4 + mask.mp4 + bg.mp4 (blend composited): each file decoded once; layers as the two public readers give."""
    from layerflow.io import reader

    clip = dataset.parent / "clip"
    manifest = write_manifest(
        dataset.parent / "video_fg.jsonl",
        [
            {
                "id": "v",
                "prompts": PROMPTS,
                "inputs": {"fg": "clip/fg.mp4", "mask": "clip/mask.mp4", "bg": "clip/bg.mp4"},
            }
        ],
    )
    (sample,) = read_manifest(manifest, get_layout("gen", "rgba"))
    decoded = []
    decode = reader._decode_video
    monkeypatch.setattr(reader, "_decode_video", lambda path: decoded.append(path.name) or decode(path))
    layers = read_layers(sample, (HEIGHT, WIDTH))
    assert sorted(decoded) == ["bg.mp4", "fg.mp4", "mask.mp4"]
    fg, alpha_layer = reader.read_foreground_layers(clip / "fg.mp4", clip / "mask.mp4", size=(HEIGHT, WIDTH))
    _, matte = reader.read_layer_with_alpha(clip / "fg.mp4", clip / "mask.mp4", size=(HEIGHT, WIDTH))
    bg = reader.read_layer_video(clip / "bg.mp4", size=(HEIGHT, WIDTH))[:, :3]
    assert torch.equal(layers["fg"], fg) and torch.equal(layers["alpha"], alpha_layer)
    assert torch.equal(layers["blend"], fg + (1 - matte) * bg)


def test_video_sample_is_not_still_unless_marked(dataset):
    samples = {s.id: s for s in read_manifest(dataset, get_layout("seg", "rgb"))}
    assert not samples["clip"].still and samples["still"].still
    marked = write_manifest(
        dataset.parent / "marked.jsonl",
        [{"id": "clip", "prompts": PROMPTS, "still": True, "inputs": {"fg": "clip/fg_rgba", "bg": "clip/bg.mp4"}}],
    )
    assert read_manifest(marked, get_layout("seg", "rgb"))[0].still


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": "a", "prompts": PROMPTS, "inputs": {"fg": "f.png"}}, "sample a): inputs need fg and bg"),
        (
            {"id": "a", "prompts": {"fg": "x"}, "inputs": {"fg": "f.png", "bg": "b.png"}},
            "missing or empty ['bg', 'blend']",
        ),
        ({"id": "a b", "prompts": PROMPTS, "inputs": {}}, "id 'a b'"),
        ({"id": "a", "prompts": PROMPTS, "inputs": {"fg": "f", "bg": "b"}, "weight": 2}, "unknown fields ['weight']"),
    ],
)
def test_bad_manifest_line_names_line_and_problem(tmp_path, entry, message):
    manifest = write_manifest(tmp_path / "m.jsonl", [entry])
    with pytest.raises(SampleError) as error:
        read_manifest(manifest, get_layout("gen", "rgb"))
    assert f"{manifest}:1" in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_sample_stops_preparation_naming_id_and_file(dataset, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {
                "id": "good",
                "prompts": PROMPTS,
                "inputs": {"fg": str(dataset.parent / "still/fg.png"), "bg": str(dataset.parent / "still/bg.png")},
            },
            {"id": "broken", "prompts": PROMPTS, "inputs": {"fg": "missing.png", "bg": "missing_bg.mp4"}},
        ],
    )
    config = train_config(manifest, tmp_path / "run", f"training.cache={tmp_path / 'cache'}")
    ensure_model_parallel()
    with pytest.raises(SampleError) as error:
        prepare_cache(config, read_manifest(manifest, config.layout))
    text = str(error.value)
    assert "sample broken" in text and "missing" in text and f"{manifest}:2" in text
    assert not (tmp_path / "cache" / "index.json").exists()
    with pytest.raises(CacheError, match="run the prepare step"):
        LatentCache(config, read_manifest(manifest, config.layout))


def test_cache_holds_posterior_and_text_and_refuses_another_task(prepared):
    config = train_config(prepared, prepared.parent / "unused")
    samples = read_manifest(prepared, config.layout)
    cache = LatentCache(config, samples)
    clip, still = cache.load(0), cache.load(1)
    layout = config.layout
    assert clip.mean.shape == (layout.latent_frames, 16, 4, 6) and clip.std.shape == clip.mean.shape
    assert clip.context.shape == (layout.text_length, 32) and (clip.std > 0).all()
    assert still.still and not clip.still
    other = load_train_config(
        [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml", *FILES[2:]],
        [*SMALL, f"training.cache={prepared.parent / 'cache'}"],
    )
    with pytest.raises(CacheError, match="made for another config"):
        LatentCache(other, samples)
    edited = [dataclasses.replace(samples[0], prompts={**samples[0].prompts, "fg": "a blue disc"}), samples[1]]
    with pytest.raises(CacheError, match=r"\['clip'\] of the manifest are not cached \(or changed since\)"):
        LatentCache(config, edited)


# -- loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gen_rgba", "fg2bg_rgba", "bg2fg_rgba"])
def test_loss_equals_the_original_on_the_recorded_batch(shared_reference_dir, case):
    """The batches were recorded on the shared reference set's networks, so they pair with that set only."""
    reference_dir = shared_reference_dir
    record = torch.load(FIXTURES / f"loss_{case}.pt", weights_only=True)
    sizes = json.loads((reference_dir / case / "config.json").read_text())["sizes"]
    task, variant = case.split("_")
    config = load_config(
        [CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{case}.yaml", CONFIGS / "tiny.yaml"],
        [f"model.network.num_frames={sizes['num_frames']}"],
    )
    network = LayerFlowDiT(config.network)
    load_network(network, reference_dir / case / "ckpt", config.layout)
    batch = NoisedBatch(
        record["latents"], record["context"], record["timesteps"], record["noise"], record["lora_scale"]
    )
    assert torch.equal(alpha_table()[record["timesteps"]], record["alphas"])
    with torch.no_grad():
        ours = diffusion_loss(network, batch, config.layout)
        switched = diffusion_loss(
            network,
            NoisedBatch(batch.latents, batch.context, batch.timesteps, batch.noise, 1 - batch.lora_scale),
            config.layout,
        )
    assert torch.allclose(ours, record["loss"], rtol=0, atol=1e-5), (ours, record["loss"])
    assert (switched - record["loss"]).abs().min() > 1e-4  # the recorded batch exercises the motion switch


def test_perfect_v_prediction_has_zero_loss():
    layout = get_layout("fg2bg", "rgba")
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((3, layout.latent_frames, 16, 2, 2), generator=generator)
    target = torch.cat([latents[:, : layout.condition[0]], latents[:, layout.condition[1] :]], dim=1)
    timesteps = torch.tensor([0, 500, 999])
    noise = torch.randn(target.shape, generator=generator)
    a = alpha_table()[timesteps].reshape(-1, 1, 1, 1, 1)

    def oracle(x, t, context, lora_scale):
        """The whole stack comes in, given frames clean; v = (a x_t - x0) / sqrt(1 - a^2) on every frame."""
        assert x.shape == latents.shape and torch.equal(x[:, :9], latents[:, :9]) and torch.equal(t, timesteps)
        return (a * x - latents) / (1 - a**2) ** 0.5

    loss = diffusion_loss(oracle, NoisedBatch(latents, torch.zeros(3, 1, 1), timesteps, noise, torch.zeros(3)), layout)
    assert loss.shape == (3,) and loss.abs().max() < 1e-8
    zero = diffusion_loss(
        lambda x, *args, **kw: torch.zeros_like(x),
        NoisedBatch(latents, torch.zeros(3, 1, 1), timesteps, noise, torch.zeros(3)),
        layout,
    )
    # with v = 0 the estimate is a x_t, so the loss is mean((a x_t - x0)^2) / (1 - a^2)
    expected = ((a * (a * target + (1 - a**2) ** 0.5 * noise) - target) ** 2 / (1 - a**2)).flatten(1).mean(1)
    assert torch.allclose(zero, expected, rtol=1e-5)


# -- parameter groups and schedule --------------------------------------------------------------------------


def test_parameter_groups_and_layer_selection():
    config = load_train_config(
        [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgba.yaml", *FILES[2:]], ["training.layers=[1]"]
    )
    network = LayerFlowDiT(config.network)
    names = select_trainable(network, ["content_lora", "layer_embedding"], [1])
    lora = [n for n in names if not n.startswith("mixins.pos_embed.txt_embedder.")]
    assert all(n.startswith("transformer.layers.1.") and (".matrix_C." in n or ".matrix_D." in n) for n in lora)
    assert sum(".matrix_C." in n for n in names) == 4 and sum("txt_embedder" in n for n in names) == 4
    frozen = [n for n, p in network.named_parameters() if not p.requires_grad]
    assert "transformer.layers.0.attention.dense.matrix_C.0" in frozen
    assert parameter_group("mixins.pos_embed.pos_embedding") is None
    assert parameter_group("transformer.layers.0.attention.query_key_value.matrix_A.2") == "motion_lora"
    assert parameter_group("mixins.adaln_layer.adaLN_modulations.0.1.weight") == "transformer"
    full = select_trainable(network, ["transformer"], [1])
    assert "mixins.adaln_layer.adaLN_modulations.1.1.weight" in full and "time_embed.0.weight" not in full
    assert not any("matrix_" in n for n in full)


def test_unknown_group_and_layer_are_config_errors():
    with pytest.raises(ConfigError, match="choose from"):
        load_train_config(FILES, ["training.trainable=[lora]"])
    with pytest.raises(ConfigError, match=r"training.layers \[7\]"):
        load_train_config(FILES, ["training.layers=[7]"])
    seg_rgb = load_train_config(FILES, ["training.layers=[]"])  # seg_rgb has no layer embedding
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_trainable(LayerFlowDiT(seg_rgb.network), ["layer_embedding"])


def test_learning_rate_schedule():
    assert lr_factor(0, 4, 20, "cosine", 0.1) == 0.25 and lr_factor(3, 4, 20, "cosine", 0.1) == 1.0
    assert lr_factor(4, 4, 20, "cosine", 0.1) == 1.0 and lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "linear", 0.0) == pytest.approx(0.5) and lr_factor(99, 0, 20, "constant", 0) == 1.0


# -- training runs ------------------------------------------------------------------------------------------


def fixed_eval_loss(run: Trainer) -> float:
    """Mean loss of both samples at four fixed timesteps with fixed noise, posterior means, full prompts."""
    generator = torch.Generator().manual_seed(0)
    losses = []
    for position in range(len(run.cache)):
        sample = run.cache.load(position)
        for timestep in (50, 300, 600, 900):
            noise = torch.randn((1, run.layout.generated_frames, *sample.mean.shape[1:]), generator=generator)
            batch = NoisedBatch(
                sample.mean[None], sample.context[None], torch.tensor([timestep]), noise, torch.zeros(1)
            )
            with torch.no_grad():
                losses.append(float(diffusion_loss(run.network, batch, run.layout)))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_training_halves_the_loss_on_two_clips(prepared, tmp_path):
    run = trainer(
        prepared,
        tmp_path / "run",
        "training.trainable=[transformer]",
        "training.learning_rate=0.003",
        "training.batch_size=2",
        "training.text_dropout=0.0",
        "training.steps=15",
        "training.save_interval=100",
    )
    before = fixed_eval_loss(run)
    history = run.run()
    assert len(history) == 15 and all(np.isfinite(r["loss"]) for r in history)
    assert fixed_eval_loss(run) <= before / 2


@pytest.mark.slow
def test_still_clips_switch_the_motion_lora_on(prepared, tmp_path):
    run = trainer(prepared, tmp_path / "run", "training.batch_size=2", "training.still_lora_scale=0.75")
    batch = run.micro_batch(0, 0)
    ids = [run.cache.ids[int(i)] for i in epoch_order(run.training.seed, 0, 2)]  # step 0 takes the first epoch
    assert batch.lora_scale.tolist() == [0.75 if i == "still" else 0.0 for i in ids]
    assert batch.latents.shape == (2, run.layout.latent_frames, 16, 4, 6)
    assert batch.noise.shape == (2, run.layout.generated_frames, 16, 4, 6)
    assert ((batch.timesteps >= 0) & (batch.timesteps < 1000)).all()
    again = run.micro_batch(0, 0)
    assert torch.equal(again.noise, batch.noise) and torch.equal(again.latents, batch.latents)
    assert not torch.equal(run.micro_batch(1, 0).noise, batch.noise)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(prepared, tmp_path):
    grads = []
    for checkpointing in ("false", "true"):
        run = trainer(
            prepared,
            tmp_path / checkpointing,
            f"training.gradient_checkpointing={checkpointing}",
            "training.trainable=[content_lora,transformer]",
        )
        run.network.train()
        diffusion_loss(run.network, run.micro_batch(0, 0), run.layout).mean().backward()
        grads.append([p.grad.clone() for p in run.params])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads, strict=True))


class Killed(Exception):
    pass


@pytest.mark.slow
def test_frozen_bit_identical_resume_exact_and_checkpoint_loads_for_sampling(prepared, tmp_path):
    settings = (
        "training.steps=4",
        "training.save_interval=2",
        "training.learning_rate=0.01",
        "training.trainable=[content_lora,motion_lora]",
    )
    initial = {
        n: p.detach().clone() for n, p in build_network(train_config(prepared, tmp_path / "x"))[0].named_parameters()
    }
    straight = trainer(prepared, tmp_path / "straight", *settings)
    straight.run()
    trained = dict(straight.network.named_parameters())
    for name, value in initial.items():
        if trained[name].requires_grad:
            assert not torch.equal(trained[name].detach(), value), f"{name} did not train"
        else:
            assert torch.equal(trained[name].detach(), value), f"frozen {name} changed"

    def kill_after_step_3(record: dict) -> None:
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        trainer(prepared, tmp_path / "killed", *settings).run(on_step=kill_after_step_3)
    assert (tmp_path / "killed" / "latest").read_text() == "2" and not (tmp_path / "killed" / "4").exists()
    resumed = trainer(prepared, tmp_path / "killed", *settings)
    assert resumed.start_step == 2
    assert [r["step"] for r in resumed.run()] == [3, 4]
    for (name, a), b in zip(straight.network.state_dict().items(), resumed.network.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    moments = [s["exp_avg"] for s in straight.optimizer.state_dict()["state"].values()]
    assert all(
        torch.equal(a, s["exp_avg"])
        for a, s in zip(moments, resumed.optimizer.state_dict()["state"].values(), strict=True)
    )

    save = tmp_path / "straight"
    assert (save / "latest").read_text() == "4" and (save / "2").is_dir()
    module = torch.load(save / "4" / SAT_MODEL_FILE, weights_only=True)["module"]
    assert all(key.startswith(NETWORK_PREFIX) for key in module)
    sample_yaml = write_sample_config(straight.config, save)
    assert sample_yaml.name == SAMPLE_CONFIG_FILE
    sampling = load_config([sample_yaml])
    assert sampling.model.checkpoint == str(save.resolve()) and sampling.layout == straight.layout
    fresh = LayerFlowDiT(sampling.network)
    load_network(fresh, sampling.model.checkpoint, sampling.layout)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), straight.network.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe(prepared, tmp_path):
    trainer(prepared, tmp_path / "run", "training.steps=1").run()
    with pytest.raises(Exception, match="cannot resume iteration 1 with changed settings.*global_batch"):
        trainer(prepared, tmp_path / "run", "training.steps=2", "training.batch_size=2")
    shutil.rmtree(tmp_path / "run")


def test_start_from_cogvideox_weights(tmp_path):
    from layerflow.training.params import load_checkpoint_weights
    from layerflow.weights.checkpoint import CheckpointError, save_sat_checkpoint
    from layerflow.weights.random import randomize_

    config = load_train_config(
        [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgba.yaml", *FILES[2:]],
        ["training.layers=[]", "training.init=cogvideox"],
    )
    source = randomize_(LayerFlowDiT(config.network), 5)
    cogvideox = {}
    for name, value in source.state_dict().items():
        if ".matrix_" in name or "txt_embedder" in name:
            continue  # CogVideoX-2B has neither LoRA nor a layer embedding
        name = name.replace(".original.", ".")
        if name.endswith("pos_embedding"):
            value = torch.zeros(1, 226 + 13 * 24, value.shape[-1])  # its own 49-frame, one-prompt table
        cogvideox[NETWORK_PREFIX + name] = value
    save_sat_checkpoint(cogvideox, tmp_path / "transformer", iteration=1000)
    network = LayerFlowDiT(config.network)
    table = network.mixins.pos_embed.pos_embedding.detach().clone()
    load_checkpoint_weights(network, str(tmp_path / "transformer"), "cogvideox", config.layout)
    state, original = network.state_dict(), source.state_dict()
    for name, value in state.items():
        if ".matrix_B." in name or ".matrix_D." in name:
            assert not value.any(), name
        elif ".matrix_A." in name or ".matrix_C." in name:
            assert value.abs().max() > 0 and not torch.equal(value, original[name]), name
        elif name.endswith("pos_embedding"):
            assert torch.equal(value, table)
        elif "txt_embedder" not in name:
            assert torch.equal(value, original[name]), name
    del cogvideox[NETWORK_PREFIX + "time_embed.0.weight"]
    save_sat_checkpoint(cogvideox, tmp_path / "broken", iteration=1)
    with pytest.raises(CheckpointError, match="time_embed.0.weight"):
        load_checkpoint_weights(LayerFlowDiT(config.network), str(tmp_path / "broken"), "cogvideox", config.layout)


@pytest.mark.slow
def test_bfloat16_keeps_trainable_weights_in_float32(prepared, tmp_path):
    full = trainer(prepared, tmp_path / "fp32", "training.text_dropout=0.0")
    half = trainer(prepared, tmp_path / "bf16", "training.text_dropout=0.0", "runtime.dtype=bfloat16")
    assert {p.dtype for p in half.params} == {torch.float32}
    assert {p.dtype for p in half.network.parameters() if not p.requires_grad} == {torch.bfloat16}
    losses = [run.train_step(0)["loss"] for run in (full, half)]
    assert losses[1] == pytest.approx(losses[0], rel=0.05) and losses[0] != losses[1]
    assert all(p.grad is None for p in half.params)  # gradients were applied and released


LORA_RANK_CONTENT, HIDDEN = 256, 1920
# content LoRA of one full-size layer: qkv has 3 partitions of C (256 x 1920) and D (1920 x 256), dense one
CONTENT_PER_LAYER = 3 * 2 * LORA_RANK_CONTENT * HIDDEN + 2 * LORA_RANK_CONTENT * HIDDEN
LAYER_EMBEDDING = 2 * HIDDEN + 2 * HIDDEN  # Linear(1, 1920) and LayerNorm(1920)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gen", "seg", "fg2bg", "bg2fg"])
@pytest.mark.parametrize("variant", ["rgb", "rgba"])
def test_stage_files_fit_every_full_size_layout(task, variant):
    files = [CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{task}_{variant}.yaml"]
    for stage in ("base", "motion_lora", "content_lora"):
        load_train_config([*files, CONFIGS / "train" / f"{stage}.yaml"])
    config = load_train_config([*files, CONFIGS / "train" / "content_lora.yaml"])
    network = LayerFlowDiT(config.network, device="meta")
    names = select_trainable(network, config.training.trainable, config.training.layers)
    count = sum(p.numel() for n, p in network.named_parameters() if n in set(names))
    embedding = LAYER_EMBEDDING if config.network.learnable_txt_embed else 0
    assert count == 5 * CONTENT_PER_LAYER + embedding


def test_keep_checkpoints_prunes_old_iterations_only(tmp_path):
    from layerflow.training.checkpointing import TRAINING_STATE_FILE, _prune

    for name in ("1", "2", "10", "11", "cache", "tensorboard"):
        (tmp_path / name).mkdir()
        if name.isdigit():
            (tmp_path / name / TRAINING_STATE_FILE).write_bytes(b"state")  # iterations the trainer wrote
    (tmp_path / "latest").write_text("11")
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "11", "cache", "latest", "tensorboard"]


def test_checkpoints_never_replace_or_prune_folders_the_trainer_did_not_write(tmp_path):
    from layerflow.io.atomic import TargetInTheWayError
    from layerflow.training.checkpointing import save_checkpoint

    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    (tmp_path / "2024").mkdir()
    (tmp_path / "2024" / "photos.txt").write_text("the user's")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "notes.txt").write_text("also the user's")
    for step in (1, 2, 4):
        save_checkpoint(tmp_path, step, network, optimizer, scheduler, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["2024", "3", "4"]
    assert (tmp_path / "2024" / "photos.txt").read_text() == "the user's"
    with pytest.raises(TargetInTheWayError):
        save_checkpoint(tmp_path, 3, network, optimizer, scheduler, {})
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["notes.txt"]
    save_checkpoint(tmp_path, 4, network, optimizer, scheduler, {})  # its own iteration may be rewritten
