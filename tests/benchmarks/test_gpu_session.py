"""``benchmarks/gpu_session.sh``: what it does before and around the measurements (no GPU here).

The measurements themselves need a GPU; ``SIZE=tiny`` runs their command lines on the CPU (about
three minutes for the four parts, done by hand, not here). These tests check the parts that decide
what runs: the refusal without CUDA, the per-part time budget and the ``prepare`` step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_session.sh"


def run(*args: str, cwd: Path = REPO_ROOT, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(cwd / "benchmarks" / "gpu_session.sh"), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_full_size_part_stops_with_one_line(tmp_path):
    done = run("default", OUT=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no CUDA device (SIZE=tiny checks the commands on the CPU)"
    assert not any(tmp_path.iterdir())


def test_a_spent_budget_skips_every_measurement_of_the_part(tmp_path):
    done = run("presets", OUT=str(tmp_path), SIZE="tiny", PART_BUDGET_S="20")
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    names = [line.split("\t")[0] for line in lines]
    assert names == ["fg2bg_rgba_memory_24gb_10", "fg2bg_rgba_memory_12gb_10"]
    assert lines[0].split("\t")[1:] == ["skipped", "0", "part budget spent"]
    assert not list(tmp_path.glob("*.json"))  # nothing ran
    assert (tmp_path / "machine_presets.txt").is_file()


def test_unknown_part_prints_the_usage(tmp_path):
    done = run("everything", OUT=str(tmp_path))
    assert done.returncode == 2 and "one part per call" in done.stdout


def test_prepare_copies_the_original_sat_folder_and_refuses_anything_else(tmp_path):
    project = tmp_path / "project"
    (project / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, project / "benchmarks" / "gpu_session.sh")
    checkout = tmp_path / "LayerFlow"
    (checkout / "sat" / "sgm").mkdir(parents=True)
    (checkout / "sat" / "diffusion_video.py").write_text("# engine\n")
    (checkout / "sat" / "sgm" / "util.py").write_text("# util\n")
    (checkout / "sat" / "__pycache__").mkdir()
    (checkout / "sat" / "__pycache__" / "x.pyc").write_bytes(b"\0")

    done = run("prepare", str(checkout), cwd=project)
    assert done.returncode == 0, done.stderr
    copied = project / ".device" / "original" / "sat"
    assert (copied / "diffusion_video.py").read_text() == "# engine\n"
    assert (copied / "sgm" / "util.py").read_text() == "# util\n"
    assert not (copied / "__pycache__").exists()

    refused = run("prepare", str(tmp_path / "elsewhere"), cwd=project)
    assert refused.returncode == 2 and "no sat/diffusion_video.py" in refused.stderr
    assert (copied / "diffusion_video.py").is_file()  # the earlier copy stays
    assert sorted(path.name for path in (project / ".device").iterdir()) == ["original"]
