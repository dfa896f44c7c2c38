"""The sample script driven as a user would, one test per class of fault.

Each test asserts the exit status, the one-line message on stderr and the state of the output
folder afterwards: the tool never deletes or replaces what it did not make, never shows a
traceback for a user error, and leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny

from layerflow.cli.generate import main
from layerflow.config import load_config
from layerflow.io.output_folder import LOCK_FILE, SAMPLE_MARKER, OutputFolder, write_marker
from layerflow.io.synthetic import layered_clip
from layerflow.io.writer import write_mp4
from layerflow.models.dit import LayerFlowDiT
from layerflow.weights.checkpoint import save_sat_checkpoint
from layerflow.weights.resolve import resolve_weights

CONFIGS = REPO_ROOT / "configs"
FAST = ["--set", "sampling.num_steps=2", "--set", "output.preview=false", "--no-progress"]
PROMPTS = {"fg": "a ball", "bg": "a field", "blend": "a ball on a field"}


def manifest(path: Path, *entries: dict) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return path


def entry(sample_id: str, **extra) -> dict:
    return {"id": sample_id, "prompts": dict(PROMPTS), **extra}


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run the script in this process; its exit status and the lines it wrote to stderr."""
    code = main([*argv])
    return code, capsys.readouterr().err.strip().splitlines()


def one_error(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with the bytes of its files (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "sat") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- 1. never destroy what the tool did not make ---------------------------------------------------


@pytest.mark.slow
def test_paths_in_the_way_are_left_untouched_and_only_those_samples_fail(tmp_path, capsys):
    output = tmp_path / "project"
    (output / "notes").mkdir(parents=True)
    (output / "notes" / "thesis.tex").write_text("years of work")
    (output / "draft").write_text("a file, not a folder")
    (output / "elsewhere").symlink_to(tmp_path)
    (output / "empty").mkdir()
    before = tree(output)
    jobs = manifest(
        tmp_path / "jobs.jsonl", *(entry(name) for name in ("notes", "draft", "elsewhere", "empty", "fresh"))
    )
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 1
    failures = [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == ["draft", "elsewhere", "empty", "notes"]
    assert all("LayerFlow did not make" in f["error"] for f in failures)
    for name in ("notes", "draft", "elsewhere", "empty"):
        assert tree(output).get(name, "missing") == before.get(name, "missing")
    assert {k: v for k, v in tree(output).items() if k in before} == before
    assert (output / "fresh" / "meta.json").is_file() and (output / "fresh" / SAMPLE_MARKER).is_file()
    assert not any("Traceback" in line for line in lines)


@pytest.mark.slow
def test_a_finished_sample_of_ours_is_kept_and_one_missing_its_meta_is_redone(tmp_path, capsys):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    assert cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))[0] == 0
    kept = tree(output / "a")
    (output / "b" / "meta.json").unlink()  # ours (it has the marker) but incomplete
    assert cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))[0] == 0
    assert tree(output / "a") == kept
    assert (output / "b" / "meta.json").is_file()


# -- 2. names the run itself uses ------------------------------------------------------------------


@pytest.mark.parametrize("reserved", ["logs", "failures.jsonl", "LOGS"])
def test_reserved_ids_are_refused_before_anything_runs(tmp_path, capsys, reserved):
    jobs = manifest(tmp_path / "jobs.jsonl", entry("fine"), entry(reserved))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(tmp_path / "out"))
    assert code == 2
    assert f"{jobs}:2: id {reserved!r} is reserved" in one_error(lines)
    assert not (tmp_path / "out").exists()


def test_run_files_of_someone_else_are_not_taken_over(tmp_path, capsys):
    output = tmp_path / "out"
    (output / "logs").mkdir(parents=True)
    (output / "logs" / "server.log").write_text("someone else's log")
    before = tree(output)
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 2
    assert "already holds 'logs', which LayerFlow did not make" in one_error(lines)
    assert tree(output) == before


# -- 3. per-sample overrides are checked before any model loads -------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sampling.num_steps": "abc"}, "sampling.num_steps (from {jobs}:2): expected an integer, got 'abc'"),
        ({"sampling.num_steps": 1}, "sampling.num_steps = 1 (from {jobs}:2): expected an integer from 2 to 1000"),
        ({"sampling.num_step": 4}, "did you mean sampling.num_steps?"),
        ({"runtime.device": "cpu"}, "only sampling.<key> overrides are allowed per sample"),
    ],
)
def test_bad_overrides_stop_the_run_before_loading(tmp_path, capsys, monkeypatch, overrides, expected):
    import layerflow.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the overrides were checked")

    monkeypatch.setattr(layerflow.pipeline.LayerFlowPipeline, "__init__", no_loading)
    jobs = manifest(tmp_path / "jobs.jsonl", entry("good"), entry("bad", overrides=overrides))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(tmp_path / "out"))
    assert code == 2
    assert expected.format(jobs=jobs) in one_error(lines)
    assert not (tmp_path / "out").exists()


# -- 4 and 5. configuration and checkpoint errors ----------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_a_gpu(tmp_path, capsys):
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(
        capsys,
        *tiny(),
        *FAST,
        "--set",
        "runtime.device=cuda",
        "--manifest",
        str(jobs),
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert "runtime.device is 'cuda' but no CUDA device is available" in one_error(lines)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, model_parallel) -> dict[str, Path]:
    """A tiny gen_rgb task checkpoint in the release layout, a tiny T5 folder, and a good VAE path."""
    folder = tmp_path_factory.mktemp("weights")
    config = load_config(tiny()[1:])
    t5 = resolve_weights(config, cache=folder / "cache").text_encoder
    network = LayerFlowDiT(config.network)
    save_sat_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in network.state_dict().items()},
        folder / "multi-layer-generation-rgb",
    )
    return {"checkpoint": folder / "multi-layer-generation-rgb", "t5": t5}


def with_weights(release: dict[str, Path], vae: Path, checkpoint: Path | None = None) -> list[str]:
    return [
        "--set",
        "model.weights=checkpoint",
        "--set",
        f"model.checkpoint={checkpoint or release['checkpoint']}",
        "--set",
        f"model.vae.path={vae}",
        "--set",
        f"model.text_encoder.path={release['t5']}",
    ]


def test_corrupt_vae_file_is_one_line_and_leaves_no_folder(tmp_path, capsys, tiny_release):
    vae = tmp_path / "3d-vae.pt"
    vae.write_bytes(b"PK\x03\x04 this is not a torch archive")
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(
        capsys,
        *tiny(),
        *FAST,
        *with_weights(tiny_release, vae),
        "--manifest",
        str(jobs),
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert f"{vae}: corrupt or truncated file" in one_error(lines)
    assert not (tmp_path / "out").exists(), "a run that stops with exit 2 leaves no output folder or logs"


def test_unsafe_checkpoint_is_refused_without_advice_to_disable_the_check(tmp_path, capsys, tiny_release):
    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "code_ran",))

    evil = tmp_path / "evil"
    (evil / "1").mkdir(parents=True)
    (evil / "latest").write_text("1")
    torch.save({"module": {"x": torch.zeros(1)}, "extra": RunsCode()}, evil / "1" / "mp_rank_00_model_states.pt")
    vae = tmp_path / "3d-vae.pt"
    vae.write_bytes(b"unused")
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(
        capsys,
        *tiny(),
        *FAST,
        *with_weights(tiny_release, vae, evil),
        "--manifest",
        str(jobs),
        "--output",
        str(tmp_path / "out"),
    )
    line = one_error(lines)
    assert code == 2 and "could run code" in line
    assert "weights_only" not in line and "trust" not in line
    assert not (tmp_path / "code_ran").exists()


# -- 6. values that used to pass validation ----------------------------------------------------------


@pytest.mark.parametrize(("prompt", "found"), [(None, "null"), (123, "a number"), (["a", "b"], "a list")])
def test_prompts_must_be_strings(tmp_path, capsys, prompt, found):
    bad = {"id": "a", "prompts": {**PROMPTS, "bg": prompt}}
    jobs = manifest(tmp_path / "jobs.jsonl", bad)
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(tmp_path / "out"))
    assert code == 2
    assert f"{jobs}:1: prompts.bg must be a string, got {found}" in one_error(lines)


def test_zero_fps_is_refused_before_loading(tmp_path, capsys):
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(
        capsys, *tiny(), *FAST, "--set", "output.fps=0", "--manifest", str(jobs), "--output", str(tmp_path / "out")
    )
    assert code == 2
    expected = "error: output.fps = 0 (from --set output.fps=0): expected frames per second from 1 to 240"
    assert one_error(lines) == expected
    assert not (tmp_path / "out").exists()


# -- 7. interrupted and concurrent runs --------------------------------------------------------------


@pytest.mark.slow
def test_leftovers_of_killed_runs_are_cleaned_and_foreign_lookalikes_kept(tmp_path, capsys):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    assert (
        cli(
            capsys,
            *tiny(),
            *FAST,
            "--manifest",
            str(manifest(tmp_path / "b.jsonl", entry("b"))),
            "--output",
            str(output),
        )[0]
        == 0
    )
    finished = tree(output / "b")
    swapped = output / ".b.old-89abcdef"  # killed between moving the old sample aside and the new one in
    (output / "b").rename(swapped)
    ours = output / ".a.tmp-0123abcd"
    ours.mkdir()
    write_marker(ours, "a")
    (ours / "foreground.mp4").write_bytes(b"half")
    foreign = output / ".c.tmp-deadbeef"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not layerflow's")
    code, _ = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 0
    assert not ours.exists() and not swapped.exists()
    assert tree(output / "b") == finished, "the finished sample was put back, not redone"
    assert (foreign / "mine.txt").read_text() == "not layerflow's"
    assert (output / "a" / "meta.json").is_file()


def test_a_second_run_into_a_busy_folder_stops_at_once(tmp_path, capsys):
    output = tmp_path / "out"
    holder = OutputFolder(output).acquire()  # another run is using the folder
    try:
        jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
        code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    finally:
        holder.release()
    assert code == 2
    line = one_error(lines)
    assert "in use by another run" in line and f"pid {os.getpid()}" in line
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE]


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_a_run_stops_cleanly(tmp_path, stop, status):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", *(entry(f"s{i}") for i in range(8)))
    command = [
        sys.executable,
        str(REPO_ROOT / "sat" / "sample_video.py"),
        *tiny(),
        "--set",
        "sampling.num_steps=6",
        "--set",
        "output.preview=false",
        "--no-progress",
        "--manifest",
        str(jobs),
        "--output",
        str(output),
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (output / "s0" / "meta.json").is_file():
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the next sample
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped cleanly")
    leftovers = [p.name for p in output.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers
    for folder in output.iterdir():
        if folder.is_dir() and folder.name != "logs":
            assert (folder / "meta.json").is_file(), f"{folder.name} is visible but incomplete"


def test_the_sample_discarded_by_ctrl_c_is_not_counted_as_done(tmp_path, capsys, monkeypatch):
    import layerflow.pipeline

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layerflow.pipeline.LayerFlowPipeline, "generate", ctrl_c)
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    progress_on = ["--set", "sampling.num_steps=2", "--set", "output.preview=false"]  # stderr is no terminal: lines
    code, lines = cli(capsys, *tiny(), *progress_on, "--manifest", str(jobs), "--output", str(tmp_path / "out"))
    assert code == 130
    assert lines[-1].startswith("interrupted: stopped cleanly")
    assert not any(line.startswith("[") for line in lines), lines  # no "[1/2] a done in 0.0 s"
    assert not (tmp_path / "out" / "a").exists()


# -- 8. messages that name what is wrong --------------------------------------------------------------


def test_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "out.mp4"
    target.write_text("x")
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(target))
    assert code == 2
    assert one_error(lines) == f"error: --output {target}: exists and is not a folder; give a folder path"
    assert target.read_text() == "x"


def test_missing_manifest_is_called_a_manifest(tmp_path, capsys):
    code, lines = cli(capsys, *tiny(), "--manifest", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"))
    assert code == 2
    assert one_error(lines) == f"error: {tmp_path / 'nope.jsonl'}: manifest not found"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    layers = layered_clip(16, 64, 96)
    return {
        "rgb": write_mp4(folder / "fg.mp4", layers["fg"]),
        "short": write_mp4(folder / "short.mp4", layers["fg"][:5]),
        "tiny": write_mp4(folder / "tiny.mp4", layered_clip(16, 8, 8)["bg"]),
        "portrait": write_mp4(folder / "portrait.mp4", layered_clip(16, 160, 64)["bg"]),
    }


def prompt_dir(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for layer, text in PROMPTS.items():
        (folder / f"{layer}.txt").write_text(text + "\n")
    return folder


def test_rgba_foreground_without_alpha_names_the_mask_option(tmp_path, capsys, clips):
    code, lines = cli(
        capsys,
        *tiny("fg2bg", "rgba"),
        *FAST,
        "--prompt-dir",
        str(prompt_dir(tmp_path / "p")),
        "--input",
        f"fg={clips['rgb']}",
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 2
    line = one_error(lines)
    assert str(clips["rgb"]) in line and "--input mask=PATH" in line and "mask_source" not in line
    assert not (tmp_path / "out").exists()


def test_too_short_clip_names_the_file(tmp_path, capsys, clips):
    code, lines = cli(
        capsys,
        *tiny("bg2fg"),
        *FAST,
        "--prompt-dir",
        str(prompt_dir(tmp_path / "p")),
        "--input",
        f"bg={clips['short']}",
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert one_error(lines).startswith(f"error: {clips['short']}: clip has 5 frames")


@pytest.mark.slow
def test_warnings_for_upscaling_cropping_and_long_prompts(tmp_path, capsys, clips):
    long_prompt = " ".join(f"word{i}" for i in range(400))
    jobs = manifest(
        tmp_path / "jobs.jsonl",
        {"id": "small", "prompts": {**PROMPTS, "fg": long_prompt}, "inputs": {"bg": str(clips["tiny"])}},
        {"id": "tall", "prompts": PROMPTS, "inputs": {"bg": str(clips["portrait"])}},
    )
    code, lines = cli(capsys, *tiny("bg2fg"), *FAST, "--manifest", str(jobs), "--output", str(tmp_path / "out"))
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert any(str(clips["tiny"]) in w and "8x8 frames are enlarged 12.0x" in w for w in warnings), warnings
    assert any(str(clips["portrait"]) in w and "centre crop cuts away 73%" in w for w in warnings), warnings
    assert any("the fg prompt has" in w and "only the first 225 are used" in w for w in warnings), warnings
    assert sum("the fg prompt" in w for w in warnings) == 1, "one warning line per truncated prompt"


@pytest.mark.slow
def test_no_progress_means_no_progress_output(tmp_path, capsys):
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    code = main([*tiny(), *FAST, "--manifest", str(jobs), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert "\r" not in captured.err and "it/s" not in captured.err and "Loading" not in captured.err, captured.err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--base", str(CONFIGS / "model.yaml"), "--no-such-flag"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["sample_video.py: error: unrecognized arguments: --no-such-flag (see sample_video.py --help)"]
