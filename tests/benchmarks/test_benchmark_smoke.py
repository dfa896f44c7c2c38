"""Smoke run of benchmarks/benchmark.py on the tiny config: every stage is timed and the machine is
recorded. No timing is asserted (CI machines differ); only that the harness measures what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs benchmarks/benchmark.py in a subprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
NUM_STEPS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "benchmark.py"),
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "fg2bg_rgba.yaml"),
        str(CONFIGS / "tiny.yaml"),
        "--set",
        f"sampling.num_steps={NUM_STEPS}",
        "--set",
        "output.alpha_video=none",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
        "--output",
        str(folder / "samples"),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"json": json.loads(out.read_text()), "stdout": done.stdout, "samples": folder / "samples"}


def test_every_stage_has_a_positive_time(report):
    stages = report["json"]["summary"]["stages"]
    # fg2bg has a given layer, so the VAE encodes as well as decodes.
    for name in ("text_encoder", "vae_encode", "denoise", "vae_decode", "write_outputs", "total"):
        assert stages[name]["median"] > 0, name
        assert stages[name]["runs"] == [stages[name]["median"]]
    parts = sum(stages[name]["median"] for name in stages if name != "total")
    assert parts <= stages["total"]["median"] * 1.001


def test_one_time_per_denoising_step_within_the_denoise_stage(report):
    summary = report["json"]["summary"]
    assert report["json"]["num_steps"] == NUM_STEPS
    assert len(summary["steps"]) == NUM_STEPS
    assert all(step["median"] > 0 for step in summary["steps"])
    assert sum(step["median"] for step in summary["steps"]) <= summary["stages"]["denoise"]["median"] * 1.001


def test_machine_memory_and_config_are_recorded(report):
    data = report["json"]
    machine = data["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch"]
    assert machine["device"] == "cpu" and machine["gpu"] is None
    assert machine["torch_threads"] == data["config"]["runtime"]["cpu_threads"] == 1  # as sample_video.py runs
    assert data["peak_memory"]["bytes"] > 0
    assert data["config"]["task"] == {"name": "fg2bg", "variant": "rgba"}
    assert data["config"]["sampling"]["num_steps"] == NUM_STEPS
    assert data["weights"] == "random" and "random weights give valid timings" in data["note"]


def test_one_table_and_the_sample_folder_is_written(report):
    stdout = report["stdout"]
    assert stdout.count("median s") == 1
    assert "random weights give valid timings" in stdout
    assert (report["samples"] / "run_0" / "meta.json").is_file()


def test_without_ffmpeg_one_note_and_the_json_without_write_outputs(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "benchmark.py"),
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "gen_rgb.yaml"),
        str(CONFIGS / "tiny.yaml"),
        "--set",
        f"sampling.num_steps={NUM_STEPS}",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--json",
        str(out),
        "--output",
        str(tmp_path / "samples"),
    ]
    environment = {**os.environ, "IMAGEIO_FFMPEG_EXE": str(tmp_path / "no-ffmpeg")}
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: the outputs could not be written")]
    assert len(notes) == 1 and "no-ffmpeg" in notes[0]
    data = json.loads(out.read_text())
    stages = data["summary"]["stages"]
    assert "write_outputs" not in stages and data["write_outputs"].startswith("not measured")
    assert (
        sum(stages[name]["median"] for name in ("text_encoder", "denoise", "vae_decode"))
        <= stages["total"]["median"] * 1.001
    )
    assert not any((tmp_path / "samples").iterdir())


def test_a_kernel_this_machine_lacks_is_one_line_before_any_model_loads(tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "benchmark.py"),
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "gen_rgb.yaml"),
        str(CONFIGS / "tiny.yaml"),
        "--set",
        "runtime.attention=efficient",
        "--no-write",
        "--json",
        str(tmp_path / "bench.json"),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: runtime.attention = efficient: needs a CUDA GPU (this run is on the CPU); "
        "usable here: auto, sdpa, flash, math"
    ]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bench.json").exists()
