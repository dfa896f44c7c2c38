"""The ``layerflow`` command: every subcommand, compose numbers on a known clip, reusing a layer,
inspect's reproduce command, and one-line errors that leave nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny, tiny_config
from PIL import Image

from layerflow.batch.given import read_given_layers
from layerflow.batch.manifest import Sample
from layerflow.cli.command import SUBCOMMANDS, main
from layerflow.io.pixels import LayerSourceError
from layerflow.io.reader import layer_provenance, read_clip_frames, resolve_layer_source
from layerflow.io.synthetic import layered_clip, write_layered_clip

CONFIGS = REPO_ROOT / "configs"
PICKED = np.arange(16)  # compose takes a 16-frame clip one for one
SIZE = ["--size", "96x64"]  # WIDTHxHEIGHT


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, argv, pattern):
    code, _, err = run(capsys, argv)
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("layerflow "), err
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_layered_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def composite(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("composite") / "comp"
    assert main(["compose", "--fg", str(clip["fg_rgba"]), "--bg", "#204080", "--output", str(folder), *SIZE]) == 0
    return folder


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_shows_an_example(capsys, name):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    examples = {
        "generate": "\n    layerflow generate --base configs/",
        "convert": "example:\n    layerflow convert SRC",
    }
    assert examples.get(name, f"example:\n  layerflow {name} ") in out
    assert out.startswith(f"usage: layerflow {name} "), "help names the command that was typed"


def test_help_and_version_name_the_command_typed(capsys):
    from layerflow import __version__
    from layerflow.cli.convert import main as convert
    from layerflow.cli.generate import main as sample_video

    for command in (["--version"], ["generate", "--version"], ["compose", "--version"]):
        code, out, _ = run(capsys, command)
        assert code == 0 and out == f"layerflow {__version__}\n", command
    for entry, prog in ((sample_video, "sample_video.py"), (convert, "layerflow convert")):
        with pytest.raises(SystemExit):
            entry(["--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {prog} ") and "layerflow generate" not in out
        with pytest.raises(SystemExit) as stop:
            entry(["--version"])
        assert stop.value.code == 0 and capsys.readouterr().out == f"layerflow {__version__}\n"


def test_usage_errors_are_one_line(capsys):
    for argv, pattern in (
        (["compose", "--bg", "white"], "--fg"),
        (["score"], "SAMPLE_DIR"),
        (["compose", "--fg", "a", "--bg", "b", "--output", "c", "--size", "big"], "WIDTHxHEIGHT"),
    ):
        code, out, err = run(capsys, argv)
        assert code == 2 and not out
        assert len(err.strip().splitlines()) == 1 and pattern in err, err
    code, _, err = run(capsys, ["render"])
    assert code == 2 and "unknown subcommand 'render'" in err and len(err.strip().splitlines()) == 1


def test_compose_over_a_colour_gives_the_known_blend(composite, clip):
    truth = layered_clip(16, 64, 96)
    alpha = truth["alpha"][PICKED]  # (16, 64, 96) bytes
    unit = alpha[..., None] / 255.0
    expected = truth["fg"][PICKED] * unit + np.array([0x20, 0x40, 0x80]) * (1 - unit)
    blend = read_clip_frames(composite / "blend.mp4")
    assert blend.shape == (16, 64, 96, 3)
    assert np.abs(blend - expected).mean() < 3  # H.264 at crf 25
    pngs = read_clip_frames(composite / "foreground_rgba")
    assert np.abs(pngs[..., 3].astype(int) - alpha).max() <= 1
    inside = alpha == 255
    assert np.abs(pngs[inside][:, :3].astype(int) - truth["fg"][PICKED][inside]).max() <= 1
    meta = json.loads((composite / "meta.json").read_text())
    assert meta["given_sources"]["bg"] == {"colour": "#204080"}
    assert meta["given_sources"]["fg"]["path"] == str(clip["fg_rgba"].resolve())
    assert meta["given_sources"]["fg"]["frames"] == PICKED.tolist()
    assert meta["command"][:2] == ["layerflow", "compose"]
    change = np.abs(np.diff(alpha.astype(float), axis=0)).mean() / 255
    assert meta["scores"]["alpha_temporal_change"] == pytest.approx(change, abs=2e-3)
    assert meta["scores"]["psnr_db"] > 30 and meta["scores"]["ssim"] > 0.9


def layerflow_shim(folder):
    """A ``layerflow`` command on PATH that runs this checkout, for running printed commands."""
    shim = folder / "bin"
    shim.mkdir()
    (shim / "layerflow").write_text(f'#!/bin/sh\nexec {sys.executable} -m layerflow.cli "$@"\n')
    (shim / "layerflow").chmod(0o755)
    return {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT / "sat")}


def test_inspect_a_composite_prints_a_compose_command_that_runs(capsys, tmp_path, clip):
    inputs = clip["fg_rgba"].parent
    made = tmp_path / "made"
    env = layerflow_shim(tmp_path)
    command = ["layerflow", "compose", "--fg", clip["fg_rgba"].name, "--bg=bg.mp4", "--output", str(made), *SIZE]
    done = subprocess.run(command, cwd=inputs, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # relative paths, as a user types them
    code, out, _ = run(capsys, ["inspect", str(made), "--output", str(tmp_path / "again")])
    assert code == 0 and "made by     layerflow compose" in out
    printed = out.split("\nreproduce\n", 1)[1].strip()
    assert printed == (
        f"layerflow compose --fg {clip['fg_rgba'].resolve()} --bg={clip['bg'].resolve()} "
        f"--output {tmp_path / 'again' / 'made'} --size 96x64"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = subprocess.run(["sh", "-c", printed], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("blend.mp4", "alpha.mp4", "background.mp4", "foreground.mov"):
        assert (tmp_path / "again" / "made" / name).read_bytes() == (made / name).read_bytes(), name


def test_compose_over_a_still_image(tmp_path, clip):
    still = tmp_path / "still.png"
    Image.fromarray(np.full((32, 48, 3), (10, 200, 30), np.uint8)).save(still)
    assert (
        main(
            [
                "compose",
                "--fg",
                str(clip["fg"]),
                "--mask",
                str(clip["mask"]),
                "--bg",
                str(still),
                "--output",
                str(tmp_path / "out"),
                *SIZE,
                "--frames",
                "8",
            ]
        )
        == 0
    )
    background = read_clip_frames(tmp_path / "out" / "background.mp4")
    assert background.shape == (8, 64, 96, 3)
    assert np.abs(background.astype(int) - np.array([10, 200, 30])).mean() < 3


def test_compose_bad_inputs_write_nothing(capsys, tmp_path, clip, composite):
    out = tmp_path / "out"
    cases = [
        (["--fg", str(tmp_path / "missing"), "--bg", "white"], "does not exist"),
        (["--fg", str(clip["fg_rgba"]), "--bg", "not-a-colour"], "--bg 'not-a-colour': no such file"),
        (["--fg", str(clip["fg"]), "--bg", "white"], "frames have no alpha channel"),
        (["--fg", str(clip["fg_rgba"]), "--bg", "white", "--size", "96x63"], "even width and height"),
        (["--fg", str(clip["fg_rgba"]), "--bg", str(clip["bg"]), "--frames", "0"], "--frames must be at least 1"),
    ]
    for argv, pattern in cases:
        one_line_error(
            capsys, ["compose", *argv, "--output", str(out), *(SIZE if "--size" not in argv else [])], pattern
        )
        assert not out.exists()
    before = sorted(p.name for p in composite.iterdir())
    one_line_error(
        capsys, ["compose", "--fg", str(clip["fg_rgba"]), "--bg", "white", "--output", str(composite)], "already exists"
    )
    assert sorted(p.name for p in composite.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_score_writes_scores_and_a_table(capsys, composite):
    code, out, _ = run(capsys, ["score", str(composite)])
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["sample", "psnr_db", "ssim"] and row.startswith(str(composite))
    scores = json.loads((composite / "scores.json").read_text())
    assert scores == json.loads((composite / "meta.json").read_text())["scores"]
    assert float(row.split()[1]) == pytest.approx(scores["psnr_db"], abs=1e-4)


def test_score_bad_folders_write_nothing(capsys, tmp_path, composite):
    (composite / "scores.json").unlink(missing_ok=True)
    one_line_error(capsys, ["score", str(composite), str(tmp_path)], "no meta.json")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    (rgb / "meta.json").write_text("{}")
    one_line_error(capsys, ["score", str(composite), str(rgb)], "an RGB sample has no matte")
    assert not (composite / "scores.json").exists()
    (rgb / "meta.json").write_text("{broken")
    one_line_error(capsys, ["inspect", str(rgb)], "cannot read it as JSON")


def test_reuse_a_layer_from_a_sample_folder(composite):
    fg2bg = tiny_config("fg2bg_rgba")
    direct = read_given_layers(Sample("x", {}, {"fg": str(composite / "foreground_rgba")}), fg2bg)
    reused = read_given_layers(Sample("x", {}, {"fg": str(composite)}), fg2bg)
    assert set(reused) == {"fg", "alpha"} and all(torch.equal(reused[k], direct[k]) for k in direct)
    rgb = read_given_layers(Sample("x", {}, {"fg": str(composite)}), tiny_config("fg2bg_rgb"))["fg"]
    from_mp4 = read_given_layers(Sample("x", {}, {"fg": str(composite / "foreground.mp4")}), tiny_config("fg2bg_rgb"))
    assert torch.equal(rgb, from_mp4["fg"])
    assert resolve_layer_source(composite, "bg") == composite / "background.mp4"
    assert resolve_layer_source(composite, "blend") == composite / "blend.mp4"
    assert resolve_layer_source(composite, "mask") == composite / "alpha.mp4"
    record = layer_provenance(composite, "fg", with_alpha=True)
    assert record["path"] == str(composite.resolve()) and record["file"] == "foreground_rgba"
    assert record["sample"]["id"] == "comp"


def test_reuse_needs_the_straight_export(tmp_path, clip):
    folder = tmp_path / "premultiplied"
    assert (
        main(
            [
                "compose",
                "--fg",
                str(clip["fg_rgba"]),
                "--bg",
                "black",
                "--output",
                str(folder),
                *SIZE,
                "--alpha-mode",
                "premultiplied",
            ]
        )
        == 0
    )
    assert (folder / "foreground_rgba_premultiplied").is_dir() and not (folder / "foreground_rgba").exists()
    with pytest.raises(LayerSourceError, match="straight export"):
        resolve_layer_source(folder, "fg", with_alpha=True)


@pytest.mark.slow
def test_convert_and_no_traceback(tmp_path, capsys):
    state = {"model.diffusion_model.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"module": state}, tmp_path / "ckpt.pt")
    target = tmp_path / "model.safetensors"
    code, out, _ = run(capsys, ["convert", str(tmp_path / "ckpt.pt"), str(target), "--task", "gen", "--variant", "rgb"])
    assert code == 0 and target.is_file() and "1 tensors" in out
    result = subprocess.run(
        [sys.executable, "-m", "layerflow.cli", "score", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat")},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"layerflow score: error: {tmp_path}: no meta.json" in result.stderr


@pytest.mark.slow
def test_every_subcommand_on_the_demo_outputs(tmp_path, capsys):
    """Demo -> score, compose and generate reuse its foreground -> inspect's command regenerates identically."""
    demo = tmp_path / "demo"
    assert main(["demo", str(demo), "gen_rgba"]) == 0
    sample = demo / "gen_rgba"
    capsys.readouterr()
    code, out, _ = run(capsys, ["score", str(sample)])
    assert code == 0 and str(sample) in out
    assert json.loads((sample / "scores.json").read_text()) == json.loads((sample / "meta.json").read_text())["scores"]
    assert (
        main(["compose", "--fg", str(sample), "--bg", str(sample), "--output", str(tmp_path / "recomposed"), *SIZE])
        == 0
    )
    # the recomposed blend is the demo's foreground over the demo's background
    recomposed = json.loads((tmp_path / "recomposed" / "meta.json").read_text())
    assert recomposed["given_sources"]["bg"]["file"] == "background.mp4"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for layer in ("fg", "bg", "blend"):
        (prompts / f"{layer}.txt").write_text(f"the {layer}\n")
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "generate",
                *tiny("fg2bg", "rgba"),
                "--prompt-dir",
                str(prompts),
                "--input",
                f"fg={sample}",
                "--set",
                "sampling.num_steps=2",
                "--output",
                str(runs),
                "--no-progress",
            ]
        )
        == 0
    )
    (folder,) = [p for p in runs.iterdir() if (p / "meta.json").is_file()]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["given_sources"]["fg"]["file"] == "foreground_rgba"
    assert meta["given_sources"]["fg"]["sample"] == {
        "id": "gen_rgba",
        "task": "gen",
        "variant": "rgba",
        "seed": 0,
        "checkpoint": "random weights",
    }
    code, out, _ = run(capsys, ["inspect", str(folder), "--output", str(tmp_path / "again")])
    assert code == 0 and "fg2bg (rgba)" in out and f"seed        {meta['seed']}" in out
    command = out.split("\nreproduce\n", 1)[1]
    assert "--set sampling.num_steps=2" in command
    env = layerflow_shim(tmp_path)
    result = subprocess.run(["sh", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    again = tmp_path / "again" / folder.name
    for png in sorted((folder / "foreground_rgba").glob("*.png")):
        assert (again / "foreground_rgba" / png.name).read_bytes() == png.read_bytes()
    for video in ("foreground.mp4", "background.mp4", "blend.mp4", "alpha.mp4"):
        assert np.array_equal(read_clip_frames(again / video), read_clip_frames(folder / video)), video


def test_convert_keeps_existing_files_records_the_task_both_ways_and_writes_normal_modes(tmp_path, capsys):
    from layerflow.weights.checkpoint import read_checkpoint

    state = {"model.diffusion_model.weight": torch.arange(6.0).reshape(2, 3)}
    release = tmp_path / "multi-layer-decomposition-rgba"  # a release folder: its name says seg_rgba
    release.mkdir()
    (release / "latest").write_text("1")
    (release / "1").mkdir()
    torch.save({"module": state}, release / "1" / "mp_rank_00_model_states.pt")
    target = tmp_path / "model.safetensors"
    code, out, _ = run(capsys, ["convert", str(release), str(target)])
    assert code == 0 and "seg_rgba" in out
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask, "the mode a new file gets, not a temp file's 0600"
    assert read_checkpoint(target)[1] == {"layerflow_task": "seg", "layerflow_variant": "rgba"}
    back = tmp_path / "back"
    assert run(capsys, ["convert", str(target), "--to-sat", str(back)])[0] == 0
    tensors, recorded = read_checkpoint(back)
    assert recorded == {"layerflow_task": "seg", "layerflow_variant": "rgba"}, "the SAT file records them too"
    assert torch.equal(tensors["model.diffusion_model.weight"], state["model.diffusion_model.weight"])
    assert (back / "1" / "mp_rank_00_model_states.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    before = target.read_bytes()
    for argv in ([str(back), str(target)], [str(target), "--to-sat", str(back)]):
        line = one_line_error(capsys, ["convert", *argv], "already exists (add --force to replace it)")
        assert line.startswith("layerflow convert: error: ")
    assert target.read_bytes() == before
    one_line_error(
        capsys, ["convert", str(back), str(target), "--force", "--task", "gen", "--variant", "rgb"], "records seg_rgba"
    )
    code, out, _ = run(capsys, ["convert", str(back), str(target), "--force"])
    assert code == 0 and read_checkpoint(target)[1]["layerflow_task"] == "seg"
