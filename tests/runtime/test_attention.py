"""``runtime.attention``, the faithful switch and the fast path (merged LoRA, compiled blocks).

The fast path must equal the faithful one within float32 rounding on the fixture networks; a kernel
that cannot run here must say why in one line; ``auto`` must say which kernels it passed over.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases, tiny, tiny_config
from reference import batch_major_context, case_dit_config, case_layout, load_pt
from test_reliability import FAST, cli, one_error, prompt_dir

from layerflow.config import ConfigError
from layerflow.models.dit import LayerFlowDiT
from layerflow.pipeline import conditioned_denoiser
from layerflow.runtime.attention import (
    ATTENTION_CHOICES,
    FAITHFUL,
    KERNELS,
    TOKENS_FIRST,
    AttentionUnavailable,
    select_attention,
)
from layerflow.runtime.devices import Placement, resolve_speed
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.weights.checkpoint import load_network

CPU = torch.device("cpu")
CASE = reference_cases()[0]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdpa", "flash", "math"])
def test_cpu_kernels_equal_plain_attention(name):
    """Tokens-first kernels against softmax(q k^T / sqrt(e)) v written out, on (b, n, h, e) inputs."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=generator, dtype=torch.float64).float() for _ in range(3))
    scores = torch.einsum("bnhe,bmhe->bhnm", q.double(), k.double()) / 16**0.5
    expected = torch.einsum("bhnm,bmhe->bnhe", scores.softmax(-1), v.double())  # (b, n, h, e)
    kernel, _ = select_attention(name, CPU, torch.float32, 16)
    assert kernel.layout == TOKENS_FIRST
    out = kernel(q, k, v)
    assert out.shape == (2, 37, 3, 16)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)


def test_faithful_kernel_is_the_originals_call():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    assert torch.equal(FAITHFUL(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_named_kernel_that_is_not_installed_is_one_clear_line():
    with pytest.raises(AttentionUnavailable) as error:
        select_attention("flash-attn-4", CPU, torch.float32, 64)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("runtime.attention = flash-attn-4: not installed (pip install flash-attn-4 --pre)")
    assert "usable here: auto, sdpa, flash, math" in message


def test_named_gpu_kernel_on_the_cpu_says_so():
    with pytest.raises(AttentionUnavailable, match=r"runtime.attention = cudnn: needs a CUDA GPU"):
        select_attention("cudnn", CPU, torch.float32, 64)


def test_installed_package_without_gpu_is_told_apart_from_a_missing_one(tmp_path, monkeypatch):
    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # the stand-in package leaves with the test
    with pytest.raises(AttentionUnavailable, match="flash-attn-4: needs a CUDA GPU"):
        select_attention("flash-attn-4", CPU, torch.float32, 64)


def test_auto_takes_the_first_usable_kernel_and_names_the_ones_passed_over():
    kernel, passed_over = select_attention("auto", CPU, torch.float32, 64)
    assert kernel.name == "flash"  # PyTorch's flash kernel has a CPU implementation
    assert passed_over == (
        "flash-attn-4: not installed",
        "flash-attn-3: not installed",
        "cudnn: needs a CUDA GPU (this run is on the CPU)",
    )


def test_auto_never_picks_an_inexact_kernel():
    assert not KERNELS["sage"].exact
    from layerflow.runtime.attention import AUTO_ORDER

    assert all(KERNELS[name].exact for name in AUTO_ORDER)


# -- the config -------------------------------------------------------------------------------------


def test_unknown_attention_value_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        tiny_config("gen_rgb", "runtime.attention=flashy")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("runtime.attention = 'flashy' (from --set runtime.attention=flashy): expected one of")
    for choice in ATTENTION_CHOICES:
        assert choice in message


@pytest.mark.parametrize("switch", ["attention=cudnn", "merge_lora=true", "compile=true"])
def test_faithful_refuses_a_fast_path_switch(switch):
    key = switch.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^runtime.{key} = .*while runtime.faithful is true"):
        tiny_config("gen_rgb", "runtime.faithful=true", f"runtime.{switch}")


def test_switches_take_auto_true_or_false():
    assert tiny_config("gen_rgb", "runtime.merge_lora=auto").runtime.merge_lora is None
    assert tiny_config("gen_rgb", "runtime.compile=false").runtime.compile is False
    with pytest.raises(ConfigError, match="runtime.merge_lora .*expected true, false or auto, got 'sometimes'"):
        tiny_config("gen_rgb", "runtime.merge_lora=sometimes")


def test_cpu_default_is_the_faithful_path_and_a_fast_switch_leaves_it():
    placement = Placement(compute_device=CPU, dtype=torch.float32)
    default = resolve_speed(tiny_config().runtime, placement, 16)
    assert default.describe() == {"faithful": True, "attention": "original", "merge_lora": False, "compile": False}
    fast = resolve_speed(tiny_config("gen_rgb", "runtime.attention=math").runtime, placement, 16)
    assert fast.describe() == {"faithful": False, "attention": "math", "merge_lora": True, "compile": False}
    unfaithful = resolve_speed(tiny_config("gen_rgb", "runtime.faithful=false").runtime, placement, 16)
    assert unfaithful.attention.name == "flash" and unfaithful.merge_lora and unfaithful.passed_over


def test_with_ulysses_the_plan_names_the_attention_that_runs():
    """The heads exchanged by Ulysses go through PyTorch's default attention, whatever ``auto`` would pick."""
    placement = Placement(compute_device=CPU, dtype=torch.float32)
    split = resolve_speed(
        tiny_config("gen_rgb", "runtime.faithful=false", "runtime.parallel.ulysses=2").runtime, placement, 16
    )
    assert split.attention is FAITHFUL and split.describe()["attention"] == "original"
    assert split.passed_over == ("every kernel: runtime.parallel.ulysses = 2 runs PyTorch's default attention",)
    with pytest.raises(AttentionUnavailable, match=r"^runtime.attention = math: not used with runtime.parallel"):
        resolve_speed(
            tiny_config("gen_rgb", "runtime.attention=math", "runtime.parallel.ulysses=2").runtime, placement, 16
        )


# -- the fast path against the faithful one ---------------------------------------------------------


def _fixture_network(reference_dir) -> tuple[LayerFlowDiT, dict]:
    case_dir = reference_dir / CASE
    ensure_model_parallel()
    network = LayerFlowDiT(case_dit_config(case_dir))
    load_network(network, case_dir / "ckpt", case_layout(case_dir))
    return network.eval(), load_pt(case_dir / "forward.pt")


def _denoise(network: LayerFlowDiT, reference_dir, recorded: dict, lora_scale) -> torch.Tensor:
    case_dir = reference_dir / CASE
    context = batch_major_context(recorded["context"], recorded["x"].shape[0])
    denoise = conditioned_denoiser(network, case_layout(case_dir), recorded.get("cond_input"), lora_scale=lora_scale)
    with torch.no_grad():
        return denoise(recorded["x"], recorded["timesteps"], context)


@pytest.mark.parametrize("kernel", ["sdpa", "flash", "math"])
def test_fast_path_equals_the_faithful_path_within_float32_rounding(reference_dir, kernel):
    """Tokens-first attention and the merged content LoRA move the output by rounding only (measured
    relative L2 ~1e-7 in float32); the motion switch still works after the merge."""
    network, recorded = _fixture_network(reference_dir)
    faithful = _denoise(network, reference_dir, recorded, recorded["scale"])
    faithful_motion = _denoise(network, reference_dir, recorded, 1)
    network.merge_lora_content()
    network.use_attention(KERNELS[kernel])
    fast = _denoise(network, reference_dir, recorded, recorded["scale"])
    assert relative_l2(fast, faithful) <= 1e-5
    assert relative_l2(_denoise(network, reference_dir, recorded, 1), faithful_motion) <= 1e-5


def test_fast_path_in_bfloat16_adds_nothing_to_bfloat16_rounding(reference_dir):
    """In bfloat16 the fast path is as far from the float32 result as the faithful path is (both
    ~7e-3 relative L2 on the fixture networks): its own difference is inside bfloat16 noise."""
    network, recorded = _fixture_network(reference_dir)
    exact = _denoise(network, reference_dir, recorded, recorded["scale"])
    network = network.to(torch.bfloat16)
    faithful = relative_l2(_denoise(network, reference_dir, recorded, recorded["scale"]), exact)
    network.merge_lora_content()
    network.use_attention(KERNELS["flash"])
    fast = relative_l2(_denoise(network, reference_dir, recorded, recorded["scale"]), exact)
    assert 1e-3 < faithful < 3e-2, "bfloat16 rounding is of this order"
    assert fast <= 1.1 * faithful


def test_merging_changes_the_weights_not_the_function(reference_dir):
    network, _ = _fixture_network(reference_dir)
    qkv = network.transformer.layers[0].attention.query_key_value
    before = qkv.original.weight.clone()
    network.merge_lora_content()
    assert not torch.equal(before, qkv.original.weight), "the fixture's content LoRA is not zero"


@pytest.mark.slow
def test_blocks_compile_once_and_match_eager(reference_dir):
    """Regional compilation: every layer reuses the one compiled block; the result is eager's within rounding."""
    torch._dynamo.reset()
    network, recorded = _fixture_network(reference_dir)
    network.merge_lora_content()
    network.use_attention(KERNELS["flash"])
    eager = _denoise(network, reference_dir, recorded, recorded["scale"])
    network.compile_blocks()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _denoise(network, reference_dir, recorded, recorded["scale"])
    assert relative_l2(compiled, eager) <= 1e-5
    assert network.config.num_layers >= 2
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    again = _denoise(network, reference_dir, recorded, recorded["scale"])
    assert counters["stats"]["unique_graphs"] == 1, "a second step must not compile again"
    assert torch.equal(again, compiled)


# -- end to end -------------------------------------------------------------------------------------


def test_cli_refuses_a_kernel_that_cannot_run_here(tmp_path, capsys):
    prompts = ["--prompt-dir", str(prompt_dir(tmp_path / "prompts"))]
    output = tmp_path / "out"
    code, lines = cli(
        capsys, *tiny(), *FAST, *prompts, "--output", str(output), "--set", "runtime.attention=flash-attn-4"
    )
    assert code == 2
    assert one_error(lines).startswith("error: runtime.attention = flash-attn-4: not installed")
    assert not output.exists()


@pytest.mark.slow
def test_fast_path_run_records_its_kernel_and_what_auto_passed_over(tmp_path, capsys):
    prompts = ["--prompt-dir", str(prompt_dir(tmp_path / "prompts"))]
    output = tmp_path / "out"
    code, lines = cli(
        capsys,
        *tiny(),
        *FAST,
        *prompts,
        "--output",
        str(output),
        "--set",
        "runtime.faithful=false",
        "--set",
        "output.png_sequence=false",
    )
    assert code == 0, lines
    (sample,) = [p for p in output.iterdir() if (p / "meta.json").is_file()]
    meta = json.loads((sample / "meta.json").read_text())
    assert meta["speed"] == {"faithful": False, "attention": "flash", "merge_lora": True, "compile": False}
    log_text = (output / "logs" / "rank0.log").read_text()
    assert (
        "attention auto passed over flash-attn-4: not installed; flash-attn-3: not installed; cudnn: needs a CUDA GPU"
    ) in log_text
