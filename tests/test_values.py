"""Values that used to pass validation and then failed late (or silently): each is refused up front.

Most checks call the validator directly; the few that must show the command's behaviour (exit
status, one line on stderr, nothing written) run the sample script in this process and stop it
before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from layerflow.batch.manifest import ManifestError, check_sample_id, samples_from_manifest
from layerflow.cli.command import main as layerflow
from layerflow.cli.generate import main
from layerflow.config import (
    MAX_GUIDANCE_EXPONENT,
    ConfigError,
    LayerFlowConfig,
    SamplingSection,
    apply_sampling_overrides,
    load_config,
)
from layerflow.io.pixels import LayerSourceError
from layerflow.io.reader import read_layer_video
from layerflow.io.synthetic import layered_clip
from layerflow.io.writer import write_mp4
from layerflow.sampling import DynamicCFG, ZeroSNRSchedule
from layerflow.tasks import get_layout
from layerflow.training.config import TrainConfig, load_train_config
from layerflow.weights.checkpoint import CheckpointError, load_pickled_tensors, save_sat_checkpoint
from layerflow.weights.resolve import MissingWeightsError, resolve_weights

CONFIGS = REPO_ROOT / "configs"
TINY = [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml", CONFIGS / "tiny.yaml"]
PROMPTS = {"fg": "a ball", "bg": "a field", "blend": "a ball on a field"}
FAST = ["--set", "sampling.num_steps=2", "--set", "output.preview=false", "--no-progress"]


def tiny_args(task: str = "gen", variant: str = "rgb") -> list[str]:
    return ["--base", str(CONFIGS / "model.yaml"), str(CONFIGS / "tasks" / f"{task}_{variant}.yaml"), str(TINY[2])]


def manifest(path: Path, *entries: dict) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return path


def error_lines(capsys) -> list[str]:
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    return [line for line in lines if "error:" in line]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import layerflow.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was refused")

    monkeypatch.setattr(layerflow.pipeline.LayerFlowPipeline, "__init__", refuse)


# -- every float key refuses .nan and .inf ------------------------------------------------------------


def float_keys(cls, prefix: str = "") -> list[tuple[str, bool]]:
    """Every float key of a config schema, found from its type hints: (dotted key, is a list of floats)."""
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "sources":
            continue
        hint = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float:
            keys.append((f"{prefix}{f.name}", False))
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is float:
            keys.append((f"{prefix}{f.name}", True))
    return keys


SAMPLING_FLOATS = float_keys(LayerFlowConfig)
TRAINING_FLOATS = [key for key in float_keys(TrainConfig) if key not in SAMPLING_FLOATS]


def test_the_schemas_have_the_float_keys_the_issue_names():
    names = [key for key, _ in SAMPLING_FLOATS]
    assert {"sampling.guidance_scale", "sampling.guidance_exponent", "sampling.lora_scale"} <= set(names)
    assert ("training.learning_rate", False) in TRAINING_FLOATS and ("training.betas", True) in TRAINING_FLOATS


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(("key", "is_list"), SAMPLING_FLOATS + TRAINING_FLOATS)
def test_every_float_key_refuses_non_finite_values(key, is_list, bad):
    override = f"{key}=[{bad}, 0.5]" if is_list else f"{key}={bad}"
    shown = repr(float(bad.replace(".", "")))  # YAML's .nan / -.inf are Python's nan / -inf
    path = f"{key}[0]" if is_list else key
    with pytest.raises(ConfigError) as error:
        load_train_config(TINY, [override])
    assert str(error.value) == f"{path} = {shown} (from --set {override}): expected a finite number"


def test_a_non_finite_value_in_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  guidance_scale: .inf\n")
    with pytest.raises(ConfigError) as error:
        load_config([*TINY, bad])
    assert str(error.value) == f"sampling.guidance_scale = inf (from {bad}): expected a finite number"
    huge = tmp_path / "huge.yaml"
    huge.write_text("sampling:\n  lora_scale: 1e999\n")  # YAML reads it as a string, which overflows to inf
    with pytest.raises(ConfigError, match=rf"^sampling.lora_scale = inf \(from {huge}\): expected a finite number$"):
        load_config([*TINY, huge])


@pytest.mark.parametrize("override", ["sampling.guidance_exponent=.nan", "sampling.guidance_exponent=-.inf"])
def test_a_non_finite_exponent_stops_the_command_before_any_model_loads(tmp_path, capsys, no_model_loading, override):
    jobs = manifest(tmp_path / "jobs.jsonl", {"id": "a", "prompts": PROMPTS})
    code = main([*tiny_args(), *FAST, "--set", override, "--manifest", str(jobs), "--output", str(tmp_path / "o")])
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: sampling.guidance_exponent = ") and f"(from --set {override})" in line
    assert not (tmp_path / "o").exists()


def test_a_non_finite_per_sample_override_names_the_manifest_line(tmp_path):
    jobs = manifest(
        tmp_path / "jobs.jsonl",
        {"id": "a", "prompts": PROMPTS},
        {"id": "b", "prompts": PROMPTS, "overrides": {"sampling.guidance_scale": math.inf}},  # JSON: Infinity
    )
    with pytest.raises(ManifestError) as error:
        samples_from_manifest(jobs, get_layout("gen", "rgb"), SamplingSection())
    assert str(error.value) == f"sampling.guidance_scale = inf (from {jobs}:2): expected a finite number"


# -- the other numeric keys: ranges named in the error ------------------------------------------------


@pytest.mark.parametrize("exponent", [2.5, -1, MAX_GUIDANCE_EXPONENT + 1])
def test_guidance_exponents_the_sampler_cannot_use_are_refused(exponent):
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [f"sampling.guidance_exponent={exponent}"])
    assert str(error.value).startswith(
        f"sampling.guidance_exponent = {float(exponent)!r} (from --set sampling.guidance_exponent={exponent}): "
        f"expected a whole number from 0 to {MAX_GUIDANCE_EXPONENT}"
    )


@pytest.mark.parametrize("exponent", [0, MAX_GUIDANCE_EXPONENT])
def test_the_allowed_exponents_give_finite_guidance_weights_at_the_fewest_steps(exponent):
    sampling = load_config(TINY, [f"sampling.guidance_exponent={exponent}", "sampling.num_steps=2"]).sampling
    guidance = DynamicCFG(scale=sampling.guidance_scale, exponent=sampling.guidance_exponent)
    weights = guidance.weights(ZeroSNRSchedule(sampling.num_steps))
    assert all(math.isfinite(w) for w in weights), weights


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.network.num_attention_heads=0", "an integer >= 1"),  # was a ZeroDivisionError
        ("model.network.patch_size=0", "an integer >= 1"),
        ("model.network.num_layers=0", "an integer >= 1"),
        ("model.network.num_frames=-3", "an integer >= 1"),
        ("model.network.width_interpolation=0", "a number > 0"),
        ("model.vae.ch=0", "an integer >= 1"),
        ("model.vae.ch_mult=[]", "a non-empty list of integers >= 1"),
        ("model.vae.scale_factor=0", "a number > 0"),
    ],
)
def test_sizes_out_of_range_name_the_key(override, expected):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [override])
    assert str(error.value).startswith(f"{key} = ") and str(error.value).endswith(
        f"(from --set {override}): expected {expected}"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.eps=0", r"training\.eps = 0\.0 .*expected a number > 0"),
        ("training.seed=-1", r"training\.seed = -1 .*expected an integer from 0"),
    ],
)
def test_training_ranges(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_train_config(TINY, [override])


# -- per-sample seeds ---------------------------------------------------------------------------------


def test_a_per_sample_sampling_seed_is_refused_and_points_to_the_seed_field(tmp_path):
    jobs = manifest(tmp_path / "jobs.jsonl", {"id": "a", "prompts": PROMPTS, "overrides": {"sampling.seed": 7}})
    with pytest.raises(ManifestError) as error:
        samples_from_manifest(jobs, get_layout("gen", "rgb"), SamplingSection())
    message = str(error.value)
    assert message.startswith(f"{jobs}:1: override 'sampling.seed': not allowed per sample")
    assert 'give the sample its own "seed" field' in message
    with pytest.raises(ConfigError, match="did you mean sampling.num_steps"):  # other keys still pass through
        apply_sampling_overrides(SamplingSection(), {"sampling.num_step": 3}, "here")
    assert apply_sampling_overrides(SamplingSection(), {"sampling.num_steps": 3}, "here").num_steps == 3


# -- ids, output folder, demo, --base ---------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["a\n", "a\nb", "a\tb", "a\x1b[31m", "a\r"])
def test_ids_with_control_characters_are_refused(tmp_path, bad_id):
    with pytest.raises(ManifestError, match="control characters"):
        check_sample_id(bad_id, "here")
    jobs = manifest(tmp_path / "jobs.jsonl", {"id": bad_id, "prompts": PROMPTS})
    with pytest.raises(ManifestError) as error:
        samples_from_manifest(jobs, get_layout("gen", "rgb"))
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{jobs}:1: id {bad_id!r}")


def test_an_empty_output_is_refused_not_taken_as_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = manifest(tmp_path / "jobs.jsonl", {"id": "a", "prompts": PROMPTS})
    with pytest.raises(SystemExit) as stop:
        main([*tiny_args(), "--manifest", str(jobs), "--output", ""])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sample_video.py: error: argument --output: empty path; give a folder ('.' for the current folder) "
        "(see sample_video.py --help)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl"]
    assert layerflow(["demo", ""]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl"]


def test_demo_with_a_misspelt_config_names_the_valid_ones(tmp_path, capsys):
    assert layerflow(["demo", str(tmp_path / "demo"), "gen_rgba", "gen_rbga"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("layerflow demo: error: unknown config 'gen_rbga'; the demo configs are gen_rgb, ")
    assert "gen_rgba" in line and "bg2fg_rgba" in line
    assert not (tmp_path / "demo").exists()


def test_demo_into_a_file_and_base_of_a_folder_are_one_line(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert layerflow(["demo", str(target)]) == 2
    assert error_lines(capsys) == [
        f"layerflow demo: error: {target}: is a file, expected a folder for the demo's outputs"
    ]
    assert target.read_text() == "mine"
    jobs = manifest(tmp_path / "jobs.jsonl", {"id": "a", "prompts": PROMPTS})
    assert main(["--base", f"{CONFIGS}/", "--manifest", str(jobs), "--output", str(tmp_path / "o")]) == 2
    assert error_lines(capsys) == [f"error: {CONFIGS}: is a folder, expected a YAML config file"]


# -- given-layer frame folders ---------------------------------------------------------------------


def rgba_folder(folder: Path, rgb_frame: int | None = None) -> Path:
    """16 RGBA PNG frames of the synthetic clip; frame ``rgb_frame`` saved without its alpha."""
    clip = layered_clip(16, 64, 96)
    folder.mkdir()
    for i in range(16):
        rgba = np.concatenate([clip["fg"][i], clip["alpha"][i][..., None]], axis=-1)
        image = Image.fromarray(rgba[..., :3] if i == rgb_frame else rgba)
        image.save(folder / f"{i:04d}.png")
    return folder


def test_an_rgb_frame_in_an_rgba_sequence_is_refused_naming_the_file(tmp_path):
    folder = rgba_folder(tmp_path / "fg", rgb_frame=5)
    with pytest.raises(LayerSourceError) as error:
        read_layer_video(folder, num_frames=16, size=(64, 96))
    assert str(error.value).startswith(f"{folder / '0005.png'}: an RGB frame (no alpha) in a sequence of RGBA frames")
    assert read_layer_video(rgba_folder(tmp_path / "good"), 16, (64, 96)).shape == (16, 4, 64, 96)


def test_bad_input_frame_folders_stop_the_run_before_anything_is_written(tmp_path, capsys, no_model_loading):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for layer in ("fg", "bg", "blend"):
        (prompts / f"{layer}.txt").write_text(f"{PROMPTS[layer]}\n")
    fg = rgba_folder(tmp_path / "fg", rgb_frame=3)
    bg = tmp_path / "bg"
    bg.mkdir()
    for i, frame in enumerate(layered_clip(16, 64, 96)["bg"]):
        Image.fromarray(frame).save(bg / f"{i:04d}.png")
    (bg / "0009.png").write_bytes((bg / "0009.png").read_bytes()[:200])  # a truncated frame
    for task, given, bad_file in [("fg2bg", f"fg={fg}", fg / "0003.png"), ("bg2fg", f"bg={bg}", bg / "0009.png")]:
        output = tmp_path / f"out_{task}"
        code = main(
            [*tiny_args(task, "rgba"), *FAST, "--prompt-dir", str(prompts), "--input", given, "--output", str(output)]
        )
        assert code == 2
        (line,) = error_lines(capsys)
        assert line.startswith(f"error: {bad_file}: "), line
        assert not output.exists()


def test_clip_warnings_print_once_for_an_input_every_sample_shares(tmp_path, capsys, monkeypatch):
    import layerflow.pipeline

    def interrupt(*args, **kwargs):  # stop the run where the model would load: every check has run by then
        raise KeyboardInterrupt

    monkeypatch.setattr(layerflow.pipeline.LayerFlowPipeline, "__init__", interrupt)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for layer in ("fg", "bg", "blend"):
        (prompts / f"{layer}.txt").write_text("".join(f"{PROMPTS[layer]} {i}\n" for i in range(3)))
    small = write_mp4(tmp_path / "small.mp4", layered_clip(16, 16, 32)["bg"])  # enlarged 4x, then 25% cropped away
    argv = [*tiny_args("bg2fg"), *FAST, "--prompt-dir", str(prompts), "--input", f"bg={small}"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 130
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert sum("are enlarged 4.0x" in w for w in warnings) == 1, warnings
    assert sum("the centre crop cuts away" in w for w in warnings) == 1, warnings


# -- messages that point the right way -------------------------------------------------------------


def test_compose_names_its_own_mask_option(tmp_path, capsys):
    fg = write_mp4(tmp_path / "fg.mp4", layered_clip(16, 64, 96)["fg"])
    code = layerflow(["compose", "--fg", str(fg), "--bg", "white", "--output", str(tmp_path / "c"), "--size", "96x64"])
    assert code == 2
    (line,) = error_lines(capsys)
    assert "--mask PATH" in line and "--input" not in line and "inputs.mask" not in line
    assert not (tmp_path / "c").exists()


def test_random_bytes_are_not_a_checkpoint_not_a_pickle_that_could_run_code(tmp_path):
    generator = np.random.default_rng(0)
    for i in range(20):
        file = tmp_path / f"random{i}.pt"
        file.write_bytes(generator.integers(0, 256, int(generator.integers(1, 400)), dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError) as error:
            load_pickled_tensors(file, CheckpointError)
        message = str(error.value)
        assert message.startswith(f"{file}: not a checkpoint (not a valid torch file"), message
        assert "could run code" not in message
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file, not a torch checkpoint"):
        load_pickled_tensors(empty, CheckpointError)


def test_a_corrupt_latest_file_is_called_corrupt_not_missing_weights(tmp_path):
    folder = tmp_path / "multi-layer-generation-rgb"
    save_sat_checkpoint({"model.diffusion_model.x": torch.zeros(1)}, folder, iteration=3)
    (folder / "latest").write_bytes(b"\x00\x00garbage")
    config = load_config(TINY, ["model.weights=checkpoint", f"model.checkpoint={folder}"])
    with pytest.raises(CheckpointError) as error:
        resolve_weights(config)
    assert not isinstance(error.value, MissingWeightsError)
    message = str(error.value)
    assert message.startswith(f"{folder / 'latest'}: corrupt 'latest' file: it should hold only the iteration number")
    assert message.endswith("this folder has iteration 3")
