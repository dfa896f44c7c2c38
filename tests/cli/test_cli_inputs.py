"""Bad inputs to the sample script: one clear line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, tiny

from layerflow.cli.generate import main

CONFIGS = REPO_ROOT / "configs"


def prompt_files(folder, layers=("fg", "bg", "blend"), text="a thing\n"):
    folder.mkdir(exist_ok=True)
    for layer in layers:
        (folder / f"{layer}.txt").write_text(text, encoding="utf-8")
    return folder


def run_failing(capsys, argv, output, pattern):
    code = main([*argv, "--output", str(output), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    assert not output.exists(), "nothing may be written for a bad input"
    return lines[0]


def test_missing_prompt_file(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p", layers=("fg", "bg"))
    run_failing(
        capsys,
        [*tiny("gen"), "--prompt-dir", str(prompts)],
        tmp_path / "out",
        f"{prompts / 'blend.txt'}: prompt file not found",
    )


def test_wrong_number_of_prompts_for_the_task(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    argv = [
        *tiny("seg"),
        *[f"--prompt={layer}={prompts / (layer + '.txt')}" for layer in ("fg", "bg", "blend")],
        "--input",
        f"blend={tmp_path / 'blend.mp4'}",
    ]
    run_failing(capsys, argv, tmp_path / "out", "seg_rgb takes prompts for ['fg', 'bg']")


def test_empty_prompt(tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"prompts": {"fg": "a", "bg": "  ", "blend": "c"}}) + "\n")
    run_failing(capsys, [*tiny("gen"), "--manifest", str(manifest)], tmp_path / "out", "empty prompt for ['bg']")


def test_empty_prompt_file(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    (prompts / "bg.txt").write_text("\n\n")
    run_failing(capsys, [*tiny("gen"), "--prompt-dir", str(prompts)], tmp_path / "out", "empty prompt file")


def test_non_utf8_prompt(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    (prompts / "fg.txt").write_bytes(b"caf\xe9 au lait\n")
    run_failing(capsys, [*tiny("gen"), "--prompt-dir", str(prompts)], tmp_path / "out", "not UTF-8 text")


def test_prompt_files_of_different_lengths(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    (prompts / "fg.txt").write_text("one\ntwo\n")
    run_failing(capsys, [*tiny("gen"), "--prompt-dir", str(prompts)], tmp_path / "out", "different numbers of prompts")


def test_conditional_task_without_its_input(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    run_failing(
        capsys,
        [*tiny("fg2bg"), "--prompt-dir", str(prompts)],
        tmp_path / "out",
        "fg2bg_rgb takes input videos for ['fg']",
    )


def test_unknown_config_key(tmp_path, capsys):
    prompts = prompt_files(tmp_path / "p")
    run_failing(
        capsys,
        [*tiny("gen"), "--prompt-dir", str(prompts), "--set", "sampling.guidance=3"],
        tmp_path / "out",
        "unknown key sampling.guidance",
    )


def test_manifest_errors_name_the_line(tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    good = {"id": "a", "prompts": {"fg": "a", "bg": "b", "blend": "c"}}
    manifest.write_text(json.dumps(good) + "\n{not json\n")
    run_failing(capsys, [*tiny("gen"), "--manifest", str(manifest)], tmp_path / "out", f"{manifest}:2: invalid JSON")


@pytest.mark.parametrize("bad_id", ["../escape", "a b", ""])
def test_manifest_ids_must_be_safe_folder_names(tmp_path, capsys, bad_id):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": bad_id or " ", "prompts": {"fg": "a", "bg": "b", "blend": "c"}}) + "\n")
    run_failing(capsys, [*tiny("gen"), "--manifest", str(manifest)], tmp_path / "out", "must be letters, digits")


def test_missing_real_weights_name_every_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = prompt_files(tmp_path / "p")
    argv = [
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "gen_rgba.yaml"),
        "--prompt-dir",
        str(prompts),
    ]
    line = run_failing(capsys, argv, tmp_path / "out", "missing weights")
    assert "ckpts_2b_lora/multi-layer-generation-rgba" in line
    assert "huggingface.co/zjuJish/LayerFlow" in line
    assert "CogVideoX-2b-sat/vae/3d-vae.pt" in line and "t5-v1_1-xxl" in line


def inline_samples(tmp_path, *argv):
    """The samples that ``argv`` (prompt options) makes for gen_rgb, from ``tmp_path`` as the current folder."""
    from layerflow.cli.generate import collect_samples, parse_args
    from layerflow.config import load_config

    base = tiny("gen")
    args = parse_args([*base, *argv])
    return collect_samples(args, load_config(base[1:]))


def test_a_prompt_is_a_file_when_it_exists_and_text_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bg.txt").write_text("a calm lake\na stormy sea\n")
    samples = inline_samples(
        tmp_path, "--prompt", "fg=a red balloon", "--prompt", "bg=bg.txt", "--prompt-text", "blend=bg.txt"
    )
    assert [s.prompts for s in samples] == [
        {"fg": "a red balloon", "bg": "a calm lake", "blend": "bg.txt"},  # --prompt-text is text, file or not
        {"fg": "a red balloon", "bg": "a stormy sea", "blend": "bg.txt"},  # inline text goes with every line
    ]
    long = "a balloon " * 40  # longer than a file name may be: still text, not an error
    (only,) = inline_samples(
        tmp_path, "--prompt", f"fg={long}", "--prompt", "bg=a cat/dog hybrid", "--prompt", "blend=x"
    )
    assert only.prompts == {"fg": long.strip(), "bg": "a cat/dog hybrid", "blend": "x"}


@pytest.mark.parametrize("typo", ["promtps/fg.txt", "fg.txt", "prompts/fg", "my prompts/fg.TXT"])
def test_a_prompt_file_name_that_does_not_exist_is_refused(tmp_path, capsys, typo):
    argv = [*tiny("gen"), "--prompt", f"fg={typo}", "--prompt", "bg=a lake", "--prompt", "blend=a balloon"]
    line = run_failing(capsys, argv, tmp_path / "out", f"--prompt fg={typo}: no such prompt file")
    assert "--prompt-text fg=TEXT" in line


def test_inline_prompts_run_end_to_end_and_help_says_how_they_are_read(tmp_path, capsys):
    argv = [*tiny("gen"), "--prompt", "fg=a red balloon", "--prompt", "bg=a calm lake", "--prompt", "blend=both"]
    fast = ["--set", "sampling.num_steps=2", "--set", "output.preview=false"]
    assert main([*argv, *fast, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/meta.json")]
    assert meta["prompts"] == {"fg": "a red balloon", "bg": "a calm lake", "blend": "both"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a file when that path exists" in text and "else the prompt text itself" in text
    assert "--prompt-text LAYER=TEXT" in text and "is refused" in text
