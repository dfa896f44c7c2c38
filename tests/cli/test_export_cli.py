"""``layerflow export --to diffusers`` end to end on a tiny checkpoint, and its one-line errors (exit 2)."""

import sys

import pytest
import torch
from conftest import CONFIGS, tiny_config

from layerflow.cli.command import main
from layerflow.cli.export import MISSING_EXTRA
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.weights.build import build_network
from layerflow.weights.checkpoint import NETWORK_PREFIX, save_safetensors

TINY = ["--base", str(CONFIGS / "tiny.yaml")]


def export(checkpoint, folder, task, variant, *extra):
    return main(
        ["export", "--to", "diffusers", str(checkpoint), str(folder), "--task", task, "--variant", variant, *extra]
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny seg_rgb networks as safetensors: one recording its task and variant, one recording nothing."""
    folder = tmp_path_factory.mktemp("checkpoints")
    config = tiny_config("seg_rgb")
    ensure_model_parallel()
    state = {NETWORK_PREFIX + key: value for key, value in build_network(config).state_dict().items()}
    save_safetensors(state, folder / "seg_rgb.safetensors", config.layout)
    save_safetensors(state, folder / "bare.safetensors")
    return {"recorded": folder / "seg_rgb.safetensors", "bare": folder / "bare.safetensors", "state": state}


def test_export_writes_a_folder_diffusers_loads(checkpoints, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from layerflow.for_diffusers import sat_state_from_transformer
    from layerflow.for_diffusers.pipeline import LayerFlowPipeline
    from layerflow.for_diffusers.scheduler import LayerFlowDPMScheduler

    out = tmp_path / "seg_rgb"
    assert export(checkpoints["recorded"], out, "seg", "rgb", *TINY) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "model_index.json",
        "transformer",
        "vae",
        "scheduler",
        "text_encoder",
        "tokenizer",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"
    pipe = LayerFlowPipeline.from_pretrained(out)
    assert (pipe.config.task, pipe.config.variant) == ("seg", "rgb")
    assert isinstance(pipe.scheduler, LayerFlowDPMScheduler)
    state = sat_state_from_transformer(pipe.transformer)
    expected = {key[len(NETWORK_PREFIX) :]: value for key, value in checkpoints["state"].items()}
    assert set(state) == set(expected)
    assert all(torch.equal(state[key], value) for key, value in expected.items())


@pytest.mark.parametrize(
    "which, task, variant, message",
    [
        ("recorded", "gen", "rgb", "this is the seg_rgb checkpoint, but the config is for gen_rgb"),
        ("bare", "fg2bg", "rgba", "does not fit fg2bg_rgba"),
    ],
)
def test_a_checkpoint_of_another_task_is_one_line(checkpoints, tmp_path, capsys, which, task, variant, message):
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    assert export(checkpoints[which], out, task, variant, *TINY) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("layerflow export: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_empty_is_refused(checkpoints, tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(checkpoints["recorded"], out, "seg", "rgb", *TINY) == 2
    err = capsys.readouterr().err
    assert err == f"layerflow export: error: {out}: folder is not empty; give a new or empty folder\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_without_the_extra_the_error_says_how_to_install_it(checkpoints, tmp_path, capsys, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("layerflow.for_diffusers")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, and restored afterwards
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert export(checkpoints["recorded"], tmp_path / "out", "seg", "rgb", *TINY) == 2
    assert capsys.readouterr().err == f"layerflow export: error: {MISSING_EXTRA}\n"
    assert not (tmp_path / "out").exists()
