"""The network against the reference fixtures, and checkpoint loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import reference_cases
from reference import batch_major_context, case_dit_config, case_layout, load_pt

from layerflow.models.dit import LayerFlowDiT
from layerflow.pipeline import conditioned_denoiser
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.weights.checkpoint import CheckpointError, load_network, read_checkpoint, save_safetensors

CASES = reference_cases()


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def build(case_dir: Path) -> LayerFlowDiT:
    ensure_model_parallel()
    return LayerFlowDiT(case_dit_config(case_dir))


def run_forward(model: LayerFlowDiT, case_dir: Path, lora_scale) -> torch.Tensor:
    """The generated frames' v, with the recorded clean latents put in place as the pipeline does."""
    recorded = load_pt(case_dir / "forward.pt")
    context = batch_major_context(recorded["context"], recorded["x"].shape[0])
    denoise = conditioned_denoiser(model, case_layout(case_dir), recorded.get("cond_input"), lora_scale=lora_scale)
    with torch.no_grad():
        return denoise(recorded["x"], recorded["timesteps"], context)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(reference_dir, case):
    case_dir = reference_dir / case
    model = build(case_dir)
    load_network(model, case_dir / "ckpt", case_layout(case_dir))
    recorded = load_pt(case_dir / "forward.pt")
    output = run_forward(model, case_dir, recorded["scale"])
    assert output.shape == recorded["output"].shape
    assert relative_l2(output, recorded["output"]) <= 1e-5
    with_motion = run_forward(model, case_dir, 1)
    assert relative_l2(with_motion, recorded["output_scale1"]) <= 1e-5
    assert relative_l2(with_motion, output) > 1e-4, "the motion LoRA switch must change the output"


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_tensors_load_exactly(reference_dir, case):
    case_dir = reference_dir / case
    model = build(case_dir)
    load_network(model, case_dir / "ckpt", case_layout(case_dir))
    state, _ = read_checkpoint(case_dir / "ckpt")
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("model.diffusion_model.")], value), key


def test_generated_text_rows_follow_layer_embedding(reference_dir):
    """Cases with a layer embedding: segment k's text rows differ by txt_embedder(k)."""
    cases = [c for c in CASES if case_dit_config(reference_dir / c).learnable_txt_embed]
    if not cases:
        pytest.skip("no fixture case with learnable_txt_embed")
    case_dir = reference_dir / cases[0]
    model = build(case_dir)
    load_network(model, case_dir / "ckpt", case_layout(case_dir))
    mixin = model.mixins.pos_embed
    table = mixin.position_embedding_forward(None, seq_length=4)
    embedder = mixin.txt_embedder
    for k in range(mixin.text_length // 226):
        expected = mixin.pos_embedding[0, 226 * k] + embedder(torch.tensor([[float(k)]]))[0]
        torch.testing.assert_close(table[0, 226 * k], expected)


def test_safetensors_round_trip(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    layout = case_layout(case_dir)
    state, _ = read_checkpoint(case_dir / "ckpt")
    target = tmp_path / "model.safetensors"
    save_safetensors(state, target, layout)
    model = build(case_dir)
    load_network(model, target, layout)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key.removeprefix("model.diffusion_model.")], value)


def _copy_ckpt(case_dir: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    target = tmp_path / name
    shutil.copytree(case_dir / "ckpt", target)
    return target


def test_missing_latest_is_one_clear_error(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    ckpt = _copy_ckpt(case_dir, tmp_path)
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        load_network(build(case_dir), ckpt, case_layout(case_dir))


def test_latest_names_missing_iteration(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    ckpt = _copy_ckpt(case_dir, tmp_path)
    (ckpt / "latest").write_text("7")
    with pytest.raises(CheckpointError, match=r"7/mp_rank_00_model_states.pt: missing"):
        load_network(build(case_dir), ckpt, case_layout(case_dir))


def test_truncated_checkpoint(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    ckpt = _copy_ckpt(case_dir, tmp_path)
    weights = ckpt / "1" / "mp_rank_00_model_states.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_network(build(case_dir), ckpt, case_layout(case_dir))


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_refused(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "evil"
    (ckpt / "1").mkdir(parents=True)
    (ckpt / "latest").write_text("1")
    payload = {"module": {"x": torch.zeros(1)}, "payload": _RunsCode(str(marker))}
    torch.save(payload, ckpt / "1" / "mp_rank_00_model_states.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused: loading it would call") as refusal:
        load_network(build(case_dir), ckpt, case_layout(case_dir))
    assert not marker.exists(), "unpickling ran code"
    message = str(refusal.value)
    assert "\n" not in message and "could run code" in message, message
    assert "weights_only" not in message and "safe_globals" not in message and "trust" not in message, message


def test_legacy_non_zip_checkpoint_loads(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    ckpt = _copy_ckpt(case_dir, tmp_path)
    weights = ckpt / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(weights, weights_only=True)
    torch.save(state, weights, _use_new_zipfile_serialization=False)
    model, reference = build(case_dir), build(case_dir)
    load_network(model, ckpt, case_layout(case_dir))
    load_network(reference, _copy_ckpt(case_dir, tmp_path / "zip"), case_layout(case_dir))
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name


def _case_pair_with_different_schema(reference_dir):
    for a in CASES:
        for b in CASES:
            config_a, config_b = case_dit_config(reference_dir / a), case_dit_config(reference_dir / b)
            if config_a.learnable_txt_embed != config_b.learnable_txt_embed:
                return a, b
    pytest.skip("no two fixture cases differ in their keys")


def test_checkpoint_of_another_variant_is_refused(reference_dir):
    a, b = _case_pair_with_different_schema(reference_dir)
    with pytest.raises(CheckpointError, match="another task or variant"):
        load_network(build(reference_dir / a), reference_dir / b / "ckpt", case_layout(reference_dir / a))


def test_release_folder_of_another_task_is_refused(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    layout = case_layout(case_dir)
    other = "multi-layer-decomposition" if layout.task.value != "seg" else "multi-layer-generation"
    ckpt = _copy_ckpt(case_dir, tmp_path, f"{other}-{layout.variant.value}")
    with pytest.raises(CheckpointError, match=f"but the config is for {layout.name}"):
        load_network(build(case_dir), ckpt, layout)


def test_safetensors_of_another_task_is_refused(reference_dir, tmp_path):
    from layerflow.tasks import Task, get_layout

    case_dir = reference_dir / CASES[0]
    layout = case_layout(case_dir)
    other_task = Task.DECOMPOSITION if layout.task is not Task.DECOMPOSITION else Task.GENERATION
    state, _ = read_checkpoint(case_dir / "ckpt")
    target = tmp_path / "model.safetensors"
    save_safetensors(state, target, get_layout(other_task, layout.variant))
    with pytest.raises(CheckpointError, match="checkpoint, but the config is for"):
        load_network(build(case_dir), target, layout)


def test_full_engine_file_reports_ignored_components(reference_dir, tmp_path, caplog):
    """A file that also holds VAE and T5 keys loads the network and says what it ignored."""
    case_dir = reference_dir / CASES[0]
    state, _ = read_checkpoint(case_dir / "ckpt")
    state = dict(state)
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    state["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(1)
    target = tmp_path / "engine.pt"
    torch.save({"module": state}, target)
    with caplog.at_level("INFO", logger="layerflow.weights.checkpoint"):
        load_network(build(case_dir), target, case_layout(case_dir))
    assert "ignoring 1 VAE keys" in caplog.text and "ignoring 1 T5 text encoder keys" in caplog.text


def test_unknown_extra_keys_are_refused(reference_dir, tmp_path):
    case_dir = reference_dir / CASES[0]
    state, _ = read_checkpoint(case_dir / "ckpt")
    state = {**state, "optimizer.step": torch.zeros(1)}
    target = tmp_path / "extra.pt"
    torch.save({"module": state}, target)
    with pytest.raises(CheckpointError, match="unexpected keys outside the network: optimizer.step"):
        load_network(build(case_dir), target, case_layout(case_dir))


def test_convert_command_round_trip(reference_dir, tmp_path):
    from layerflow.cli.convert import main as convert

    case_dir = reference_dir / CASES[0]
    layout = case_layout(case_dir)
    safetensors = tmp_path / "model.safetensors"
    assert (
        convert(
            [str(case_dir / "ckpt"), str(safetensors), "--task", layout.task.value, "--variant", layout.variant.value]
        )
        == 0
    )
    assert convert([str(safetensors), "--to-sat", str(tmp_path / "sat_ckpt")]) == 0
    original, _ = read_checkpoint(case_dir / "ckpt")
    back, _ = read_checkpoint(tmp_path / "sat_ckpt")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[key], back[key]) for key in original)
    _, metadata = read_checkpoint(safetensors)
    assert metadata == {"layerflow_task": layout.task.value, "layerflow_variant": layout.variant.value}
