"""Built files (the tiny T5 stand-in) go to the user's cache folder, never into the current folder."""

from __future__ import annotations

from conftest import REPO_ROOT

from layerflow.config import load_config
from layerflow.weights.resolve import cache_dir, resolve_weights

CONFIGS = REPO_ROOT / "configs"


def test_the_cache_folder_follows_layerflow_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFLOW_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LAYERFLOW_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "layerflow"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says to ignore a relative one
    assert cache_dir() == tmp_path / "home" / ".cache" / "layerflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "layerflow"


def test_the_tiny_model_builds_its_t5_in_the_cache_not_the_current_folder(tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LAYERFLOW_CACHE", str(tmp_path / "cache"))
    config = load_config([CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml", CONFIGS / "tiny.yaml"])
    weights = resolve_weights(config)
    assert weights.stand_in_t5 and weights.text_encoder == tmp_path / "cache" / "tiny-t5-d32"
    assert (weights.text_encoder / "model.safetensors").is_file()
    assert list(work.iterdir()) == [], "nothing is written into the current folder"
