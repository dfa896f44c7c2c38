"""LayerFlow never writes, appends, truncates or deletes through a link it did not make.

Each test puts real symbolic (or hard) links where a run keeps its own files, runs the tool as a
user would, and checks the one-line refusal (exit 2), and that what the link points to is byte for
byte as it was. The links point into a folder of "user files" outside the output folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_reliability import FAST, cli, entry, manifest, one_error, tiny, tree
from test_training import PROMPTS, write_manifest, write_still

from layerflow.cli.train import main as train_main
from layerflow.io.atomic import TargetInTheWayError, write_text_atomic
from layerflow.io.links import LinkInTheWayError
from layerflow.io.output_folder import LOCK_FILE, SAMPLE_MARKER, OutputFolder, OutputFolderError, write_marker
from layerflow.training.checkpointing import TRAINING_STATE_FILE, latest_step, save_checkpoint
from layerflow.weights.checkpoint import SAT_MODEL_FILE, CheckpointError

REFUSAL = "is a symbolic link; LayerFlow does not write through links it did not make"


@pytest.fixture
def user_files(tmp_path) -> Path:
    """A folder of someone's files, as a link target: a document, hidden temp-like files, a log."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / ".x.tmp-0123abcd").write_text("named like a LayerFlow leftover, but mine")
    (folder / "failures.rank0.jsonl").write_text("my own failures\n")
    (folder / "rank0.log").write_text("my own log\n")
    return folder


def used_output(tmp_path: Path) -> Path:
    """An output folder that LayerFlow has used before (it holds the lock file)."""
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).write_text("pid 1 on elsewhere since long ago\n")
    return output


def run_one(capsys, tmp_path: Path, output: Path) -> tuple[int, list[str]]:
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"))
    return cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))


# -- the run's own files: the lock, logs/, the failures files ----------------------------------------


def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys, user_files):
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).symlink_to(user_files / "thesis.tex")
    before = tree(user_files)
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert one_error(lines) == (
        f"error: {output / LOCK_FILE} is a symbolic link; LayerFlow does not write through links it did not "
        f"make (remove it or use another --output)"
    )
    assert tree(user_files) == before
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE], "nothing was written beside the link"


def test_a_hard_linked_lock_file_is_refused(tmp_path, capsys, user_files):
    output = tmp_path / "out"
    output.mkdir()
    os.link(user_files / "thesis.tex", output / LOCK_FILE)  # the same file under two names
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert "has other hard links" in one_error(lines)
    assert (user_files / "thesis.tex").read_text() == "years of work"


def test_a_linked_logs_folder_is_refused_and_nothing_in_it_is_touched(tmp_path, capsys, user_files):
    output = used_output(tmp_path)
    (output / "logs").symlink_to(user_files, target_is_directory=True)
    before = tree(user_files)
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert one_error(lines) == (
        f"error: {output / 'logs'} is a symbolic link; LayerFlow does not write through links it did not make "
        f"(remove it or use another --output)"
    )
    assert tree(user_files) == before, "no leftover deleted, no failures file emptied, no log appended"


@pytest.mark.parametrize("name", ["rank0.log", "failures.rank0.jsonl"])
def test_a_linked_file_inside_logs_is_refused(tmp_path, capsys, user_files, name):
    output = used_output(tmp_path)
    (output / "logs").mkdir()
    (output / "logs" / name).symlink_to(user_files / name)
    before = tree(user_files)
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert f"{output / 'logs' / name} {REFUSAL}" in one_error(lines)
    assert tree(user_files) == before


def test_a_hard_linked_rank_log_is_refused(tmp_path, capsys, user_files):
    output = used_output(tmp_path)
    (output / "logs").mkdir()
    os.link(user_files / "rank0.log", output / "logs" / "rank0.log")
    with pytest.raises(OutputFolderError, match="has other hard links"):  # rank 0 refuses it for every rank
        OutputFolder(output).acquire()
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert f"{output / 'logs' / 'rank0.log'} has other hard links" in one_error(lines)
    assert (user_files / "rank0.log").read_text() == "my own log\n"


def test_a_linked_failures_file_is_refused(tmp_path, capsys, user_files):
    output = used_output(tmp_path)
    (output / "failures.jsonl").symlink_to(user_files / "failures.rank0.jsonl")
    before = tree(user_files)
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 2
    assert f"{output / 'failures.jsonl'} {REFUSAL}" in one_error(lines)
    assert tree(user_files) == before


def test_the_failures_file_is_never_written_through_a_linked_logs_folder(tmp_path, user_files):
    """The run's text files are written relative to folders opened without following links."""
    output = tmp_path / "out"
    (output / "logs").mkdir(parents=True)
    (output / "logs").rename(tmp_path / "old_logs")
    (output / "logs").symlink_to(user_files, target_is_directory=True)
    before = tree(user_files)
    with pytest.raises(LinkInTheWayError, match=REFUSAL):
        write_text_atomic(output / "logs" / "failures.rank0.jsonl", "x\n", within=output, where="--output")
    assert tree(user_files) == before


def test_leftovers_are_cleaned_only_when_they_are_layerflows(tmp_path, user_files):
    output = used_output(tmp_path)
    (output / "logs").mkdir()
    (output / "logs" / ".failures.rank0.tmp-0123abcd.jsonl").write_text("a killed run's temporary")
    (output / "logs" / ".notes.tmp-0123abcd.txt").write_text("the user's, named alike")
    leftover = output / ".a.tmp-89abcdef"  # a killed run's sample folder, into which the user saved a file
    leftover.mkdir()
    write_marker(leftover, "a")
    (leftover / "foreground.mp4").write_bytes(b"half a video")
    (leftover / "mine.txt").write_text("saved here by mistake")
    linked = output / ".b.tmp-deadbeef"
    linked.symlink_to(user_files, target_is_directory=True)
    before = tree(user_files)
    folder = OutputFolder(output).acquire()
    try:
        handled = folder.clean_stale()
    finally:
        folder.release()
    assert handled == ["logs/.failures.rank0.tmp-0123abcd.jsonl"]
    assert (output / "logs" / ".notes.tmp-0123abcd.txt").read_text() == "the user's, named alike"
    assert sorted(p.name for p in leftover.iterdir()) == ["mine.txt"], "LayerFlow's files went, the user's stayed"
    assert linked.is_symlink() and tree(user_files) == before


# -- sample folders: the marker, linked folders, redoing an unfinished sample --------------------------


def test_a_linked_marker_or_a_linked_sample_folder_is_not_layerflows(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "b").mkdir(parents=True)
    write_marker(elsewhere / "b", "b")  # a real LayerFlow marker, outside the output folder
    (elsewhere / "b" / "meta.json").write_text("{}")
    output = tmp_path / "out"
    (output / "a").mkdir(parents=True)
    (output / "a" / "notes.txt").write_text("the user's")
    (output / "a" / SAMPLE_MARKER).symlink_to(elsewhere / "b" / SAMPLE_MARKER)
    (output / "b").symlink_to(elsewhere / "b", target_is_directory=True)
    before_out, before_elsewhere = tree(output), tree(elsewhere)
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    code, _ = cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))
    assert code == 1
    failures = {f["id"]: f["error"] for f in map(json.loads, (output / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == ["a", "b"], "a linked folder is neither complete (skipped) nor replaced"
    assert all("LayerFlow did not make" in error for error in failures.values())
    assert {k: v for k, v in tree(output).items() if k in before_out} == before_out
    assert tree(elsewhere) == before_elsewhere


def unfinished_sample(output: Path, name: str) -> Path:
    """A sample folder of ours that a killed run left without its meta.json."""
    folder = output / name
    folder.mkdir(parents=True)
    write_marker(folder, name)
    (folder / "foreground.mp4").write_bytes(b"an old, half-written video")
    return folder


def test_redoing_an_unfinished_sample_keeps_the_users_files_in_it(tmp_path, capsys):
    output = tmp_path / "out"
    folder = unfinished_sample(output, "a")
    (folder / "notes.txt").write_text("what I think of this sample")
    (folder / "edits").mkdir()
    (folder / "edits" / "cut.txt").write_text("my edit list")
    code, lines = run_one(capsys, tmp_path, output)
    assert code == 0, lines
    meta = json.loads((folder / "meta.json").read_text())
    assert (folder / "notes.txt").read_text() == "what I think of this sample"
    assert (folder / "edits" / "cut.txt").read_text() == "my edit list"
    assert (folder / "foreground.mp4").read_bytes() != b"an old, half-written video", "LayerFlow's old file was redone"
    assert SAMPLE_MARKER in meta["files"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*meta["files"], "edits", "notes.txt"])
    assert not [p for p in output.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_link_in_an_unfinished_sample_in_the_way_of_a_new_file_is_named(tmp_path, capsys, user_files):
    output = tmp_path / "out"
    folder = unfinished_sample(output, "a")
    (folder / "foreground.mp4").unlink()
    (folder / "foreground.mp4").symlink_to(user_files / "thesis.tex")
    before, before_user = tree(output), tree(user_files)
    code, _ = run_one(capsys, tmp_path, output)
    assert code == 1
    (failure,) = map(json.loads, (output / "failures.jsonl").read_text().splitlines())
    assert f"{folder}: foreground.mp4 in this unfinished sample folder is not LayerFlow's" in failure["error"]
    assert {k: v for k, v in tree(output).items() if k in before} == before
    assert tree(user_files) == before_user


# -- training: checkpoints, latest, prune ---------------------------------------------------------------


def tiny_training():
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return network, optimizer, scheduler


def test_a_linked_latest_is_refused_before_training_and_when_saving(tmp_path, user_files):
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest").symlink_to(user_files / "thesis.tex")
    with pytest.raises(CheckpointError, match=f"latest {REFUSAL}"):
        latest_step(save)
    with pytest.raises(LinkInTheWayError, match=REFUSAL):
        save_checkpoint(save, 1, *tiny_training(), {})
    assert (user_files / "thesis.tex").read_text() == "years of work"


def test_a_linked_iteration_folder_is_never_replaced(tmp_path, user_files):
    save = tmp_path / "save"
    save.mkdir()
    (save / "2").symlink_to(user_files, target_is_directory=True)
    (user_files / TRAINING_STATE_FILE).write_bytes(b"looks like a checkpoint")
    before = tree(user_files)
    with pytest.raises((LinkInTheWayError, TargetInTheWayError)):
        save_checkpoint(save, 2, *tiny_training(), {})
    assert tree(user_files) == before and (save / "2").is_symlink()


def test_pruning_and_rewriting_keep_the_users_files_in_iteration_folders(tmp_path):
    save = tmp_path / "save"
    parts = tiny_training()
    save_checkpoint(save, 1, *parts, {})
    (save / "1" / "model.safetensors").write_bytes(b"the user's export of iteration 1")
    save_checkpoint(save, 2, *parts, {})
    (save / "2" / "notes.txt").write_text("a good one")
    save_checkpoint(save, 3, *parts, {}, keep=1)
    assert sorted(p.name for p in (save / "1").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in (save / "2").iterdir()) == ["notes.txt"]
    save_checkpoint(save, 3, *parts, {})  # rewriting an iteration folder keeps what else is in it
    (save / "3" / "mine.txt").write_text("mine")
    save_checkpoint(save, 3, *parts, {})
    assert sorted(p.name for p in (save / "3").iterdir()) == ["mine.txt", SAT_MODEL_FILE, TRAINING_STATE_FILE]
    assert torch.load(save / "3" / TRAINING_STATE_FILE, weights_only=True)["step"] == 3


def test_output_folder_errors_are_output_folder_errors(tmp_path, user_files):
    """Under torchrun rank 0 shares the lock's refusal with every rank, which needs an OutputFolderError."""
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).symlink_to(user_files / "thesis.tex")
    with pytest.raises(OutputFolderError, match=REFUSAL):
        OutputFolder(output).acquire()


def train(capsys, save: Path, manifest_path: Path, *overrides: str) -> tuple[int, list[str]]:
    configs = REPO_ROOT / "configs"
    settings = [
        "model.network.latent_height=4",
        "model.network.latent_width=6",
        "training.layers=[]",
        "training.gradient_checkpointing=false",
        "training.steps=1",
        f"training.manifest={manifest_path}",
        f"training.save={save}",
        *overrides,
    ]
    base = [
        "--base",
        *(str(configs / name) for name in ("model.yaml", "tasks/gen_rgb.yaml", "train/content_lora.yaml")),
    ]
    argv = [*base, str(configs / "tiny.yaml"), *(arg for s in settings for arg in ("--set", s)), "--no-progress"]
    code = train_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("linked", "overrides"),
    [
        ("logs", ()),
        ("cache/samples", ()),
        ("train_log.jsonl", ("training.tensorboard=false",)),
        ("tensorboard", ("training.tensorboard=true",)),
    ],
)
def test_training_refuses_links_in_its_save_folder(tmp_path, capsys, user_files, linked, overrides):
    write_still(tmp_path / "data" / "a")
    jobs = write_manifest(
        tmp_path / "data" / "train.jsonl",
        [{"id": "a", "prompts": PROMPTS, "inputs": {"fg": "a/fg.png", "bg": "a/bg.png"}}],
    )
    save = tmp_path / "save"
    (save / linked).parent.mkdir(parents=True, exist_ok=True)
    target = user_files / "rank0.log" if linked.endswith(".jsonl") else user_files
    (save / linked).symlink_to(target, target_is_directory=target.is_dir())
    before = tree(user_files)
    code, lines = train(capsys, save, jobs, *overrides)
    assert code == 2
    assert f"{save / linked} {REFUSAL}" in one_error(lines)
    assert tree(user_files) == before
