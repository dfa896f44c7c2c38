"""Progress on a terminal: a sample's bar runs through the VAE decode and the writing; compose and score have bars."""

from __future__ import annotations

import io
import re

import torch
from conftest import REPO_ROOT

from layerflow.batch.progress import FINISHING_STAGES, RunProgress
from layerflow.cli.command import main
from layerflow.config import load_config
from layerflow.io.synthetic import write_layered_clip

CONFIGS = REPO_ROOT / "configs"


class Terminal(io.StringIO):
    """A stream that says it is a terminal, recording what the bars draw."""

    def isatty(self) -> bool:
        return True

    def states(self) -> list[str]:
        """Each redraw of a bar, control sequences removed."""
        parts = re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.getvalue()))
        return [part.strip() for part in parts if part.strip()]


def test_a_samples_bar_counts_its_steps_then_the_decode_and_the_writing():
    terminal = Terminal()
    progress = RunProgress(total=1, finished=0, num_steps=3, stream=terminal)
    on_step = progress.start_sample("s1")
    progress.stage("text_encoder")
    progress.stage("denoise")
    for step in range(3):
        on_step(step, None)
    progress.stage("vae_decode")
    decoding = terminal.states()[-1]
    progress.stage("write")
    writing = terminal.states()[-1]
    bar = progress.steps_bar.bar
    assert bar.n == 4 and bar.total == 3 + len(FINISHING_STAGES)
    progress.end_sample("s1", finished=1, seconds=1.0)
    progress.close()
    assert bar.n == bar.total, "full once the files are written"
    assert decoding.startswith("s1:") and "3/5" in decoding and decoding.endswith("decoding (VAE)]")
    assert "4/5" in writing and writing.endswith("writing files]")


def test_the_pipeline_names_each_stage_as_it_starts(model_parallel):
    from layerflow.pipeline import LayerFlowPipeline

    config = load_config(
        [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml", CONFIGS / "tiny.yaml"], ["sampling.num_steps=2"]
    )
    events = []
    result = LayerFlowPipeline(config).generate(
        {"fg": "a", "bg": "b", "blend": "c"},
        seed=1,
        on_step=lambda step, x: events.append("step"),
        on_stage=events.append,
    )
    assert events == ["text_encoder", "denoise", "step", "step", "vae_decode"]
    assert list(result.timings) == ["text_encoder", "denoise", "vae_decode"]
    assert all(isinstance(video, torch.Tensor) for video in result.layers.values())


def test_compose_and_score_show_bars_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    clip = write_layered_clip(tmp_path / "clip")
    compose = ["compose", "--fg", str(clip["fg_rgba"]), "--bg", "white", "--size", "96x64"]
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*compose, "--output", str(tmp_path / "a")]) == 0
    states = terminal.states()
    for stage, count in (("reading layers", "0/3"), ("writing files", "1/3"), ("scoring", "2/3")):
        assert any(state.startswith("compose:") and count in state and state.endswith(f"{stage}]") for state in states)
    assert states[-1].startswith("compose: 100%") and "3/3" in states[-1]
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["score", str(tmp_path / "a")]) == 0
    assert terminal.states()[-1].startswith("score: 100%") and "1/1" in terminal.states()[-1]
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert main(["score", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main([*compose, "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert quiet.getvalue() == ""
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["score", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err == "", "no bar when stderr is not a terminal"
