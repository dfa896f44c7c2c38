"""``benchmarks/compare_original.py --size``: both implementations get the same random weights.

The original code is not part of this repository. What can be checked without it: the weights
handed to the original carry exactly the key names and shapes of the original engine's own
checkpoint (the reference fixtures hold one, written by the original at the tiny sizes) and equal
the weights our pipeline builds for itself; the ratios; the one-line errors. With a checkout of
SihuiJi/LayerFlow named by ``LAYERFLOW_ORIGINAL`` the tiny comparison itself runs and must agree
bit for bit on the CPU in float32.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from reference import case_config

from layerflow.pipeline import LayerFlowPipeline
from layerflow.weights.checkpoint import NETWORK_PREFIX
from layerflow.weights.resolve import Weights

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import compare_original  # noqa: E402

pytestmark = pytest.mark.usefixtures("model_parallel")


@pytest.mark.parametrize("case", ["gen_rgba", "fg2bg_rgb"])
def test_random_weights_fit_the_original_checkpoint_keys_and_equal_ours(reference_dir, case):
    """At the fixture set's own sizes (read from its config.json), whichever set the original made."""
    sizes = compare_original.network_overrides(case_config(reference_dir / case))
    config = compare_original.random_config(case, "tiny", "cpu", num_steps=2, seed=5, extra=sizes)
    state = compare_original.random_network_state(config)
    recorded = torch.load(
        reference_dir / case / "ckpt" / "1" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )["module"]
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        key: tuple(value.shape) for key, value in recorded.items()
    }

    weights = Weights(random=True, checkpoint="", vae="", text_encoder=Path("unused"))
    ours = LayerFlowPipeline(config, weights=weights).network.state_dict()
    assert all(torch.equal(ours[key.removeprefix(NETWORK_PREFIX)], value) for key, value in state.items())
    other_seed = compare_original.random_network_state(compare_original.random_config(case, "tiny", "cpu", 2, 6, sizes))
    assert not all(torch.equal(other_seed[key], value) for key, value in state.items())


def test_timing_summary_ratios_and_per_step_seconds():
    times = {"original": [3.0, 2.0, 4.0], "ours": [1.0, 1.5, 2.0]}
    latents = {"original": torch.tensor([1.0, -3.0]), "ours": torch.tensor([1.25, -3.0])}
    summary = compare_original.timing_summary(times, latents, num_steps=4)
    assert summary["median_s"] == {"original": 3.0, "ours": 1.5}
    assert summary["seconds_per_step"] == {"original": 0.75, "ours": 0.375}
    assert summary["ratio_ours_over_original"] == 0.5 and summary["speedup_original_over_ours"] == 2.0
    assert summary["ratio_of_minima"] == 0.5  # 1.0 / 2.0
    assert summary["median_of_paired_ratios"] == 0.5  # median of 1/3, 0.75, 0.5
    assert summary["max_abs_diff_final_latent"] == 0.25 and summary["max_abs_final_latent"] == 3.0


def test_unknown_case_is_one_line_naming_the_task_files(capsys):
    code = compare_original.main(["--original", "/nonexistent", "--case", "gen_rgbx", "--size", "tiny"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith("error: --case gen_rgbx: no configs/tasks/gen_rgbx.yaml") and "'gen_rgba'" in error


def test_a_folder_that_is_not_the_original_is_one_line(tmp_path, capsys):
    code = compare_original.main(
        ["--original", str(tmp_path), "--case", "gen_rgb", "--size", "tiny", "--device", "cpu"]
    )
    error = capsys.readouterr().err.strip()
    assert (
        code == 2
        and error == f"error: --original {tmp_path}: no sat/diffusion_video.py (expected a SihuiJi/LayerFlow checkout)"
    )


def test_device_and_seed_need_the_random_weights_mode():
    with pytest.raises(SystemExit):
        compare_original.parse_args(["--original", "x", "--device", "cuda"])


@pytest.mark.skipif(
    not os.environ.get("LAYERFLOW_ORIGINAL"),
    reason="set LAYERFLOW_ORIGINAL to a checkout of SihuiJi/LayerFlow to run the original",
)
@pytest.mark.slow
@pytest.mark.parametrize("case", ["gen_rgb", "fg2bg_rgba"])
def test_tiny_random_comparison_agrees_bit_for_bit(case):
    result = compare_original.compare_random(
        Path(os.environ["LAYERFLOW_ORIGINAL"]), case, "tiny", "cpu", num_steps=3, repeats=1, warmup=0, seed=2
    )
    assert result["weights_not_equal_after_loading"] == []
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["max_abs_diff_final_latent"] == 0 and result["max_abs_final_latent"] > 0
