"""Training inputs are checked as strictly as sampling's: manifest fields, config ranges, stopping and restarting.

The runs go through ``train_video.py``'s ``main`` in this process (tiny model, CPU, a few steps),
with Ctrl-C and SIGTERM sent to the process itself at a chosen point.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_training import PROMPTS, write_manifest, write_still

from layerflow.cli.train import main
from layerflow.config import ConfigError
from layerflow.io import atomic
from layerflow.tasks import get_layout
from layerflow.training import checkpointing
from layerflow.training.checkpointing import TRAINING_STATE_FILE, remove_stale_staging, save_checkpoint
from layerflow.training.config import load_train_config
from layerflow.training.dataset import SampleError, read_manifest
from layerflow.training.trainer import Trainer

CONFIGS = REPO_ROOT / "configs"
STAGE = CONFIGS / "train" / "content_lora.yaml"
FILES = [CONFIGS / "model.yaml", CONFIGS / "tasks" / "gen_rgb.yaml", STAGE, CONFIGS / "tiny.yaml"]
SMALL = [
    "model.network.latent_height=4",
    "model.network.latent_width=6",
    "training.layers=[]",
    "training.gradient_checkpointing=false",
]
GOOD = {"id": "good", "prompts": PROMPTS, "inputs": {"fg": "fg.png", "bg": "bg.png"}}


# -- the manifest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": {"fg": 5, "bg": "bg.png"}}, "inputs.fg must be a string path, got a number"),
        ({"inputs": {"fg": "fg.png", "bg": None}}, "inputs.bg must be a string path, got null"),
        ({"inputs": {"fg": "fg.png", "bg": " "}}, "inputs.bg must be a path, got an empty string"),
        ({"inputs": ["fg.png", "bg.png"]}, "inputs must be an object of layer: path, got a list"),
        ({"prompts": {**PROMPTS, "bg": None}}, "prompts.bg must be a string, got null"),
        ({"prompts": {**PROMPTS, "fg": 3}}, "prompts.fg must be a string, got a number"),
        ({"prompts": "a bear"}, "prompts must be an object of layer: text, got a string"),
        ({"id": 7}, "id must be a string, got a number"),
        ({"id": ""}, "id '' must be"),
        ({"still": "yes"}, "still must be true or false, got a string"),
        ({"still": None}, "still must be true or false, got null"),
    ],
)
def test_every_manifest_field_is_type_checked(tmp_path, change, message):
    manifest = write_manifest(tmp_path / "train.jsonl", [GOOD, {**GOOD, "id": "second", **change}])
    with pytest.raises(SampleError) as error:
        read_manifest(manifest, get_layout("gen", "rgb"))
    assert str(error.value).startswith(f"{manifest}:2")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_number_as_input_path_is_one_line_and_exit_2(tmp_path, capsys, clean_logging):
    manifest = write_manifest(
        tmp_path / "train.jsonl", [GOOD, {**GOOD, "id": "b"}, {**GOOD, "id": "c", "inputs": {"fg": 5, "bg": "x"}}]
    )
    code = main(arguments(manifest, tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"error: {manifest}:3: inputs.fg must be a string path, got a number"]


# -- the config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.steps=0", "expected an integer >= 1"),
        ("training.keep_checkpoints=-1", "expected an integer >= 0"),
        ("training.learning_rate=.nan", "expected a finite number"),
        ("training.learning_rate=-.inf", "expected a finite number"),
        ("training.betas=[0.9,.inf]", "expected a finite number"),
        ("training.text_dropout=.nan", "expected a finite number"),
        ("training.eps=0", "expected a number > 0"),
        ("training.init=scratch", "expected one of ['release', 'cogvideox']"),
    ],
)
def test_range_errors_name_the_set_that_gave_the_value(override, expected):
    with pytest.raises(ConfigError) as error:
        load_train_config(FILES, ["training.layers=[]", override])
    text = str(error.value)
    assert f"(from --set {override})" in text and expected in text
    assert str(STAGE) not in text and "\n" not in text


def test_range_errors_name_the_yaml_that_gave_the_value(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text("training:\n  learning_rate: .nan\n")
    with pytest.raises(ConfigError, match=rf"training.learning_rate = nan \(from {stage}\)"):
        load_train_config([*FILES, stage], ["training.layers=[]"])


# -- leftovers of a run killed while saving --------------------------------------------------------------


class Killed(BaseException):
    """A kill -9 stand-in: raised from inside a write that nothing cleans up after."""


def leave_a_killed_staging_folder(folder: Path, step: int, monkeypatch) -> Path:
    """What ``kill -9`` while saving iteration ``step`` leaves: the trainer's real staging folder, half written."""
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    real_save = torch.save

    def save_model_then_die(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise Killed

    before = set(folder.iterdir()) if folder.exists() else set()
    with monkeypatch.context() as patch:
        patch.setattr(atomic, "_remove", lambda path: None)  # a killed process cleans nothing up
        patch.setattr(checkpointing.torch, "save", save_model_then_die)
        with pytest.raises(Killed):
            save_checkpoint(folder, step, network, optimizer, scheduler, {})
    (staging,) = set(folder.iterdir()) - before
    return staging


def test_only_the_trainers_own_staging_leftovers_are_removed(tmp_path, monkeypatch):
    save = tmp_path / "run"
    ours = leave_a_killed_staging_folder(save, 4, monkeypatch)
    assert ours.is_dir() and ours.name.startswith(".4.")
    lookalikes = {
        ".5.tmp-0123abcd": "notes.txt",  # the trainer's name, but a user's content
        ".6.tmp-0123abc": TRAINING_STATE_FILE,  # 7 hex digits: not a name the trainer makes
        ".x.tmp-0123abcd": TRAINING_STATE_FILE,
        "7.tmp-0123abcd": TRAINING_STATE_FILE,
    }
    for name, file in lookalikes.items():
        (save / name).mkdir()
        (save / name / file).write_text("the user's")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / TRAINING_STATE_FILE).write_text("the user's")
    (save / ".8.tmp-0123abcd").symlink_to(tmp_path / "elsewhere")
    assert remove_stale_staging(save) == [ours.name]
    assert not ours.exists()
    assert sorted(p.name for p in save.iterdir()) == sorted([*lookalikes, ".8.tmp-0123abcd"])
    assert all((save / name / file).read_text() == "the user's" for name, file in lookalikes.items())
    assert (tmp_path / "elsewhere" / TRAINING_STATE_FILE).read_text() == "the user's"


# -- Ctrl-C, SIGTERM and the resume after them -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_stills(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stills")
    write_still(root / "a")
    write_still(root / "b")
    return write_manifest(
        root / "train.jsonl",
        [
            {"id": "a", "prompts": PROMPTS, "inputs": {"fg": "a/fg.png", "bg": "a/bg.png"}},
            {"id": "b", "prompts": PROMPTS, "inputs": {"fg": "b/fg.png", "bg": "b/bg.png"}},
        ],
    )


def arguments(manifest: Path, save: Path, *overrides: str) -> list[str]:
    settings = [
        *SMALL,
        f"training.manifest={manifest}",
        f"training.save={save}",
        f"training.cache={manifest.parent / 'cache'}",
        "training.steps=4",
        "training.save_interval=2",
        *overrides,
    ]
    return ["--base", *map(str, FILES), *[arg for s in settings for arg in ("--set", s)], "--no-progress"]


@pytest.fixture
def clean_logging():
    """``main`` sets up the logging of a process; undo it, so that the next test starts as it would."""
    package, root = logging.getLogger("layerflow"), logging.getLogger()
    handlers, level = list(package.handlers), package.level
    root_levels = {handler: handler.level for handler in root.handlers}
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt
    yield
    for handler in set(package.handlers) - set(handlers):
        package.removeHandler(handler)
        handler.close()
    package.setLevel(level)
    for handler, handler_level in root_levels.items():
        handler.setLevel(handler_level)
    signal.signal(signal.SIGINT, previous_sigint)


def logged_steps(save: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (save / "train_log.jsonl").read_text().splitlines()]


def tensorboard_steps(save: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


@pytest.mark.slow
def test_ctrl_c_during_a_step_is_one_line_exit_130_and_keeps_the_checkpoint(
    two_stills, tmp_path, capsys, monkeypatch, clean_logging
):
    real_step = Trainer.train_step

    def step_then_ctrl_c(self, step):
        record = real_step(self, step)
        if step == 2:  # the third step, after iteration 2 was saved
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    save = tmp_path / "run"
    assert main(arguments(two_stills, save, "training.tensorboard=false")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: stopped cleanly; the last checkpoint, iteration 2 in {save}, is intact; "
        f"rerun the same command to resume from it"
    ]
    assert (save / "latest").read_text() == "2" and not (save / "4").exists()
    assert not [p.name for p in save.iterdir() if p.name.startswith(".")]
    checkpointing.load_resume_state(save, torch.load(save / "2" / TRAINING_STATE_FILE, weights_only=True)["identity"])


@pytest.mark.slow
def test_sigterm_while_saving_exits_143_and_the_resume_logs_every_step_once(
    two_stills, tmp_path, capsys, monkeypatch, clean_logging
):
    real_save = torch.save

    def sigterm_while_saving_iteration_4(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    save = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.torch, "save", sigterm_while_saving_iteration_4)
        assert main(arguments(two_stills, save)) == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: stopped cleanly; the last checkpoint, iteration 2 in {save}, is intact; "
        f"rerun the same command to resume from it"
    ]
    assert (save / "latest").read_text() == "2" and not (save / "4").exists()
    assert not [p.name for p in save.iterdir() if p.name.startswith(".")]  # the staging folder went with it
    assert logged_steps(save) == [1, 2, 3, 4] and tensorboard_steps(save) == [1, 2, 3, 4]

    killed_later = leave_a_killed_staging_folder(save, 6, monkeypatch)  # as if a later run died saving
    user_folder = save / ".6.tmp-notmine"
    user_folder.mkdir()
    with open(save / "train_log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # the line a kill tore in half
    assert main(arguments(two_stills, save)) == 0
    assert "from step 2 to 4" in capsys.readouterr().out
    assert not killed_later.exists() and user_folder.is_dir()
    assert logged_steps(save) == [1, 2, 3, 4]
    assert tensorboard_steps(save) == [1, 2, 3, 4]  # not 1, 2, 3, 4, 3, 4
    assert (save / "latest").read_text() == "4"
