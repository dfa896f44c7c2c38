"""The CPU thread count of a run: set from runtime.cpu_threads in one place, recorded in meta.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT

from layerflow.cli.exits import EXIT_USAGE
from layerflow.cli.generate import main
from layerflow.config import ConfigError, load_config
from layerflow.runtime.devices import Placement, cpu_threads

CONFIGS = REPO_ROOT / "configs"
GEN_RGB = [str(CONFIGS / "model.yaml"), str(CONFIGS / "tasks" / "gen_rgb.yaml")]


def test_cpu_threads_holds_the_count_for_the_block_and_restores_it():
    before = torch.get_num_threads()
    wanted = before + 1  # differs from the current count on any machine
    with cpu_threads(wanted) as used:
        assert used == wanted and torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before


def test_cpu_threads_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), cpu_threads(before + 1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_zero_keeps_torchs_choice():
    before = torch.get_num_threads()
    with cpu_threads(0) as used:
        assert used == before == torch.get_num_threads()


def test_default_is_one_thread_and_a_negative_count_is_refused():
    assert load_config(GEN_RGB).runtime.cpu_threads == 1
    with pytest.raises(ConfigError, match=r"runtime\.cpu_threads = -2 .*expected a thread count"):
        load_config(GEN_RGB, ["runtime.cpu_threads=-2"])
    with pytest.raises(ConfigError, match=r"runtime\.cpu_threads .*expected an integer"):
        load_config(GEN_RGB, ["runtime.cpu_threads=auto"])


def test_device_kind_names_no_rank():
    assert Placement(compute_device=torch.device("cpu"), dtype=torch.float32).device_kind == "cpu"


def test_negative_count_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a ball\n", encoding="utf-8")
    code = main(
        [
            "--base",
            *GEN_RGB,
            str(CONFIGS / "tiny.yaml"),
            "--set",
            "runtime.cpu_threads=-1",
            "--prompt",
            f"fg={prompts}",
            "--prompt",
            f"bg={prompts}",
            "--prompt",
            f"blend={prompts}",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE
    assert len(error.splitlines()) == 1 and "runtime.cpu_threads" in error and "-1" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_uses_the_configured_count_and_records_it(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "one", "prompts": {"fg": "a", "bg": "b", "blend": "c"}}) + "\n")
    before = torch.get_num_threads()
    wanted = before + 1
    code = main(
        [
            "--base",
            *GEN_RGB,
            str(CONFIGS / "tiny.yaml"),
            "--set",
            f"runtime.cpu_threads={wanted}",
            "--set",
            "sampling.num_steps=2",
            "--set",
            "output.preview=false",
            "--manifest",
            str(manifest),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    meta = json.loads((tmp_path / "out" / "one" / "meta.json").read_text())
    assert meta["cpu_threads"] == wanted and meta["config"]["runtime"]["cpu_threads"] == wanted
    assert meta["device"] == "cpu"
    assert torch.get_num_threads() == before
