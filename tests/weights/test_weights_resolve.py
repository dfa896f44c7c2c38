"""weights.resolve: one decision on where the weights come from, the config never rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerflow.config import ConfigError, load_config
from layerflow.weights.resolve import MissingWeightsError, resolve_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
MODEL = [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml"]


def test_random_weights_build_a_tiny_t5_and_leave_the_config_alone(tmp_path):
    config = load_config([*MODEL, CONFIGS / "tiny.yaml"], [f"model.text_encoder.path={tmp_path / 'absent'}"])
    before = config.to_dict()
    weights = resolve_weights(config, cache=tmp_path / "cache")
    assert config.to_dict() == before and config.model.text_encoder.path == str(tmp_path / "absent")
    assert weights.random and weights.stand_in_t5 and weights.description == "random weights"
    assert weights.text_encoder == tmp_path / "cache" / "tiny-t5-d32"
    assert json.loads((weights.text_encoder / "config.json").read_text())["d_model"] == 32
    built = (weights.text_encoder / "model.safetensors").stat().st_mtime_ns
    again = resolve_weights(config, cache=tmp_path / "cache")
    assert again == weights and (again.text_encoder / "model.safetensors").stat().st_mtime_ns == built


def test_random_weights_use_an_existing_configured_t5(tmp_path):
    config = load_config([*MODEL, CONFIGS / "tiny.yaml"], [f"model.text_encoder.path={tmp_path / 'absent'}"])
    folder = resolve_weights(config, cache=tmp_path / "cache").text_encoder
    configured = load_config([*MODEL, CONFIGS / "tiny.yaml"], [f"model.text_encoder.path={folder}"])
    weights = resolve_weights(configured, cache=tmp_path / "elsewhere")
    assert weights.text_encoder == folder and not weights.stand_in_t5
    assert not (tmp_path / "elsewhere").exists()


def test_release_weights_are_checked_unless_told_not_to(tmp_path):
    paths = {
        "model.checkpoint": tmp_path / "ckpt",
        "model.vae.path": tmp_path / "vae.pt",
        "model.text_encoder.path": tmp_path / "t5",
    }
    config = load_config(MODEL, [f"{key}={value}" for key, value in paths.items()])
    with pytest.raises(MissingWeightsError) as caught:
        resolve_weights(config)
    message = str(caught.value)
    assert "\n" not in message and all(str(path) in message for path in paths.values())
    unchecked = resolve_weights(config, check=False)
    assert not unchecked.random and unchecked.description == str(tmp_path / "ckpt")
    assert (unchecked.checkpoint, unchecked.vae, unchecked.text_encoder) == (
        str(tmp_path / "ckpt"),
        str(tmp_path / "vae.pt"),
        tmp_path / "t5",
    )


def test_vae_keys_build_the_vae_config_and_bad_sizes_name_the_section():
    config = load_config([*MODEL, CONFIGS / "tiny.yaml"], ["model.vae.scale_factor=0.5"])
    sizes = config.model.vae.sizes
    assert (sizes.ch, sizes.ch_mult, sizes.num_res_blocks, sizes.scale_factor) == (32, (1, 2, 2, 4), 1, 0.5)
    with pytest.raises(ConfigError, match=r"^model\.vae .*width 40 is not divisible by 32 norm groups"):
        load_config([*MODEL, CONFIGS / "tiny.yaml"], ["model.vae.ch=40"])
