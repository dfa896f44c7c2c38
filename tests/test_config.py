"""Config merging, overrides and validation errors."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT

from layerflow.config import ConfigError, load_config
from layerflow.tasks import Task, Variant

CONFIGS = REPO_ROOT / "configs"


def base(task: str = "gen", variant: str = "rgba") -> list:
    return [CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{task}_{variant}.yaml"]


def test_later_files_and_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("sampling:\n  num_steps: 20\n  seed: 3\n")
    config = load_config([*base(), extra], ["sampling.seed=11", "runtime.merge_lora=true"])
    assert config.task.name is Task.GENERATION and config.task.variant is Variant.RGBA
    assert config.sampling.num_steps == 20
    assert config.sampling.seed == 11
    assert config.runtime.merge_lora is True
    assert config.sampling.guidance_scale == 6.0  # untouched keys keep the earlier file's value
    assert config.network.text_length == 678


def test_task_file_overrides_model_num_frames():
    assert load_config(base("fg2bg", "rgba")).network.num_frames == 65
    assert load_config(base("gen", "rgba")).network.num_frames == 64


def test_tiny_config_is_small_and_random():
    config = load_config([*base("seg", "rgb"), CONFIGS / "tiny.yaml"])
    assert config.model.weights == "random"
    assert config.network.hidden_size == 64 and config.network.text_length == 452
    assert config.video_size == (64, 96)


def test_unknown_key_names_file_and_nearest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  num_step: 20\n")
    with pytest.raises(ConfigError) as error:
        load_config([*base(), bad])
    message = str(error.value)
    assert "sampling.num_step" in message and str(bad) in message and "sampling.num_steps" in message


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  network:\n    hidden_size: large\n")
    with pytest.raises(ConfigError, match=r"model\.network\.hidden_size .*bad\.yaml.*expected an integer"):
        load_config([*base(), bad])


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown key runtime\.devcie in --set runtime\.devcie=cpu.*runtime\.device"):
        load_config(base(), ["runtime.devcie=cpu"])


def test_bad_enum_value_lists_choices():
    with pytest.raises(ConfigError, match="'segment' is not one of gen, seg, fg2bg, bg2fg"):
        load_config(base(), ["task.name=segment"])


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("sampling:\n  num_steps: 4\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line 4, column 1: invalid YAML"):
        load_config([*base(), broken])


def test_value_check_in_a_section_names_the_override_that_set_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(base(), ["sampling.num_steps=1"])
    assert str(error.value) == (
        "sampling.num_steps = 1 (from --set sampling.num_steps=1): expected an integer from 2 to 1000"
    )
    low_fps = tmp_path / "low_fps.yaml"
    low_fps.write_text("output:\n  fps: 0\n")
    with pytest.raises(ConfigError, match=r"output.fps = 0 \(from .*low_fps.yaml\): expected frames per second"):
        load_config([*base(), low_fps])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("runtime.device=gpu", "runtime.device"),
        ("runtime.vae_spatial_tile=-1", "runtime.vae_spatial_tile"),
        ("sampling.guidance_scale=-2", "sampling.guidance_scale"),
    ],
)
def test_range_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} = .* \(from --set {override}\): expected "):
        load_config(base(), [override])


def test_memory_preset_turns_on_every_memory_option():
    config = load_config([*base("fg2bg", "rgba"), CONFIGS / "memory_24gb.yaml"])
    runtime = config.runtime
    assert runtime.model_cpu_offload and not runtime.keep_text_encoder
    assert runtime.vae_spatial_tile > 0  # the VAE encodes and decodes region by region
    assert config.network.num_frames == 65  # the preset leaves the model alone


def test_text_length_comes_from_the_task():
    assert load_config(base("seg", "rgba")).to_dict()["model"]["network"]["text_length"] == 452
    with pytest.raises(ConfigError, match="seg_rgba has 452 text tokens"):
        load_config(base("seg", "rgba"), ["model.network.text_length=678"])


def test_exponent_numbers_without_a_dot_are_numbers():
    assert load_config(base(), ["sampling.guidance_scale=5e0"]).sampling.guidance_scale == 5.0
    with pytest.raises(ConfigError, match="sampling.guidance_scale .*expected a number, got 'five'"):
        load_config(base(), ["sampling.guidance_scale=five"])


def test_the_old_twin_model_files_point_to_the_merged_one(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model_rgba.yaml: config file not found \(model_rgba.yaml and its twin "
        r"became configs/model.yaml",
    ):
        load_config([tmp_path / "model_rgba.yaml", CONFIGS / "tasks" / "gen_rgba.yaml"])


@pytest.mark.parametrize(("name", "frames"), [("gen_rgb", 49), ("gen_rgba", 64), ("fg2bg_rgba", 65)])
def test_the_task_file_gives_the_position_table_length(name, frames):
    task, variant = name.split("_")
    assert load_config(base(task, variant)).network.num_frames == frames


# Keys every task file sets (they have no default or differ per task); model.yaml leaves them out.
TASK_FILE_KEYS = {
    "task.name",
    "task.variant",
    "model.checkpoint",
    "model.network.num_frames",
    "model.network.text_length",  # follows from the task's prompts; setting another value is an error
    "model.network.learnable_txt_embed",
    "model.network.learnable_pos_embed",
}


def config_fields(cls, prefix: str = ""):
    """(dotted key, default or MISSING) of every leaf field of a config dataclass, nested sections walked."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "sources":
            continue
        hint = hints[f.name]
        section = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if dataclasses.is_dataclass(section):
            yield from config_fields(section, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", default


def test_model_yaml_lists_every_key_with_its_default():
    import dataclasses

    import yaml

    from layerflow.config import LayerFlowConfig

    raw = yaml.safe_load((CONFIGS / "model.yaml").read_text())
    config = load_config(base("gen", "rgb"))
    fields = dict(config_fields(LayerFlowConfig))
    assert TASK_FILE_KEYS <= set(fields)
    missing, wrong = [], []
    for key, default in fields.items():
        if key in TASK_FILE_KEYS:
            continue
        section, value = raw, config
        for part in key.split("."):
            section = section.get(part, {}) if isinstance(section, dict) else {}
            value = getattr(value, part)
        if section == {}:
            missing.append(key)
        elif default is dataclasses.MISSING or value != default:
            wrong.append(f"{key}: model.yaml gives {value!r}, the dataclass default is {default!r}")
    assert missing == [] and wrong == []
