"""What a run prints when stderr is a log file, not a terminal: one line per sample and the summary."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT, tiny_config

CONFIGS = REPO_ROOT / "configs"


@pytest.mark.slow
def test_a_logged_run_prints_one_line_per_sample_and_no_library_noise(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    ids = ["first", "second"]
    broken = {"id": "broken", "prompts": {"fg": "a", "bg": "b", "blend": "c"}, "overrides": {}}
    manifest.write_text(
        "".join(json.dumps({"id": i, "prompts": {"fg": "a", "bg": "b", "blend": "c"}}) + "\n" for i in ids)
        + json.dumps(broken)
        + "\n"
    )
    (tmp_path / "out" / "broken").mkdir(parents=True)  # in the way: this sample fails before running
    env = {k: v for k, v in os.environ.items() if k not in ("SAT_LOGLEVEL", "DS_ACCELERATOR", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO_ROOT / "sat")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "sat" / "sample_video.py"),
            "--base",
            str(CONFIGS / "model.yaml"),
            str(CONFIGS / "tasks" / "gen_rgb.yaml"),
            str(CONFIGS / "tiny.yaml"),
            "--set",
            "sampling.num_steps=2",
            "--set",
            "output.preview=false",
            "--manifest",
            str(manifest),
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    err = result.stderr.splitlines()
    assert "\r" not in result.stderr, "progress bars in a log file"
    noise = [line for line in err if re.search(r"\[INFO\]|\[WARNING\]|DeepSpeed|LOCAL_WORLD_SIZE|accelerator", line)]
    assert not noise, noise
    progress = [line for line in err if re.match(r"^\[\d+/3\] ", line)]
    assert [line.split()[1] for line in progress] == ids, err
    assert all(re.match(r"^\[\d/3\] \w+ done in \d+\.\d s$", line) for line in progress), progress
    assert [line for line in err if line.startswith("failed: broken: ")], err
    assert len(err) == len(progress) + 1, err
    assert result.stdout.startswith("rank 0: 2 done, 0 skipped (already complete), 1 failed"), result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl", "out"], "no .cache/ in the current folder"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_per_sample_step_count_reaches_its_progress_bar(tmp_path, monkeypatch):
    """A manifest line's ``sampling.num_steps`` is the total of that sample's step bar, not the run's."""
    from layerflow.batch.manifest import Sample
    from layerflow.batch.progress import FINISHING_STAGES
    from layerflow.batch.runner import run_samples

    config = tiny_config("gen_rgb")
    prompts = {"fg": "a", "bg": "b", "blend": "c"}
    samples = [Sample("run-steps", prompts), Sample("own-steps", prompts, overrides={"sampling.num_steps": 3})]

    class CountingPipeline:
        speed = SimpleNamespace(passed_over=(), describe=dict)

        def generate(self, prompts, given, seed, sampling, on_step, on_stage=None):
            for step in range(sampling.num_steps):
                on_step(step, None)
            raise RuntimeError("stop before writing")  # the bars are what this test reads

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    summary = run_samples(config, samples, tmp_path / "out", lambda config: CountingPipeline())
    assert sorted(summary.failed) == ["own-steps", "run-steps"]
    assert config.sampling.num_steps == 4
    shown = terminal.getvalue()
    totals = dict(re.findall(r"  ([\w-]+):\s+0%\|[^|]*\| 0/(\d+) ", shown))  # each step bar as it opens
    finishing = len(FINISHING_STAGES)  # a sample's bar also counts its decode and writing
    assert totals == {"run-steps": str(4 + finishing), "own-steps": str(3 + finishing)}, shown
