"""Per-stage bookkeeping of ``LayerFlowPipeline.generate`` and ``benchmarks/benchmark.py``: every stage
is named and timed, and each stage's peak memory is its own.

PyTorch keeps no allocator statistics on the CPU, so the CUDA source (``torch.cuda.max_memory_allocated``)
cannot run here. The peak bookkeeping is tested against :class:`CountingMemory`, a memory source whose
allocations the test makes itself, with the expected peaks worked out by hand below each case.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from layerflow.pipeline import LayerFlowPipeline, _StageClock
from layerflow.runtime.devices import Placement

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import benchmark  # noqa: E402

CONFIGS = REPO_ROOT / "configs"
PROMPTS = {"fg": "a red ball", "bg": "a green field", "blend": "a red ball on a green field"}


class CountingMemory:
    """A memory source like CUDA's: ``reset`` lowers the mark to what is allocated now."""

    def __init__(self):
        self.allocated = 0
        self.high = 0
        self.resets = 0

    def use(self, count: int) -> None:
        self.allocated += count
        self.high = max(self.high, self.allocated)

    def free(self, count: int) -> None:
        self.allocated -= count

    def reset(self) -> None:
        self.high = self.allocated
        self.resets += 1

    def peak(self) -> int:
        return self.high


def test_stage_clock_resets_the_mark_per_stage_and_keeps_the_stage_maximum():
    memory = CountingMemory()
    timings, peaks = {}, {}
    clock = _StageClock(Placement(torch.device("cpu"), torch.float32), timings, peaks, memory)
    with clock("first"):
        memory.use(100)
        memory.use(50)  # high 150
        memory.free(120)  # 30 stay allocated
    with clock("second"):
        memory.use(10)  # from the reset mark 30: high 40, not the first stage's 150
    assert peaks == {"first": 150, "second": 40}
    assert list(timings) == ["first", "second"] and all(seconds >= 0 for seconds in timings.values())
    assert memory.resets == 2


def test_stage_clock_without_a_memory_source_records_no_peak():
    timings, peaks = {}, {}
    with _StageClock(Placement(torch.device("cpu"), torch.float32), timings, peaks)("only"):
        pass
    assert list(timings) == ["only"] and peaks == {}


# Bytes each stage allocates on top of 1000 resident ones, largest first: without a reset at each
# stage's start, every later stage would report the text encoder's 1000 + 4000.
RESIDENT = 1000
STAGE_BYTES = {"text_encoder": 4000, "vae_encode": 300, "denoise": 20, "vae_decode": 1}
STAGE_METHODS = {
    "text_encoder": "encode_prompts",
    "vae_encode": "encode_given_layers",
    "denoise": "sample_latents",
    "vae_decode": "decode_layers",
}


def allocating(pipeline: LayerFlowPipeline, memory: CountingMemory, stage: str):
    """The pipeline's method for ``stage``, allocating that stage's bytes while it runs."""
    method = getattr(pipeline, STAGE_METHODS[stage])

    def run(*args, **kwargs):
        memory.use(STAGE_BYTES[stage])
        try:
            return method(*args, **kwargs)
        finally:
            memory.free(STAGE_BYTES[stage])

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("gen_rgb", ["text_encoder", "denoise", "vae_decode"]),
        ("fg2bg_rgb", ["text_encoder", "vae_encode", "denoise", "vae_decode"]),
    ],
)
def test_generate_names_times_and_peaks_every_stage(name, stages, monkeypatch):
    config = tiny_config(name, "sampling.num_steps=2")
    pipeline = LayerFlowPipeline(config)
    assert pipeline.memory is None  # on the CPU nothing is measured, so nothing is reported
    height, width = config.video_size
    given = {
        layer: torch.zeros(config.layout.span(layer).pixel_frames, 3, height, width)
        for layer in config.layout.given_layers
    } or None

    memory = CountingMemory()
    memory.use(RESIDENT)
    pipeline.memory = memory
    for stage in stages:
        monkeypatch.setattr(pipeline, STAGE_METHODS[stage], allocating(pipeline, memory, stage))
    measured = pipeline.generate(PROMPTS, given, seed=3)
    assert list(measured.timings) == stages and all(measured.timings[stage] > 0 for stage in stages)
    assert measured.peak_bytes == {stage: RESIDENT + STAGE_BYTES[stage] for stage in stages}
    assert memory.allocated == RESIDENT and memory.resets == len(stages)
    assert set(measured.layers) == set(config.layout.video_layers)


def test_benchmark_reports_the_stage_peaks_and_names_the_largest():
    gib = 2**30
    runs = [
        {
            "stages": {"text_encoder": 1.0, "denoise": 4.0, "vae_decode": 2.0, "total": 7.0},
            "steps": [2.0, 2.0],
            "stage_peak_bytes": {"text_encoder": 3 * gib, "denoise": 20 * gib, "vae_decode": 12 * gib},
        },
        {
            "stages": {"text_encoder": 1.2, "denoise": 4.4, "vae_decode": 2.2, "total": 7.8},
            "steps": [2.4, 2.0],
            "stage_peak_bytes": {"text_encoder": 3 * gib, "denoise": 19 * gib, "vae_decode": 25 * gib},
        },
    ]
    summary = benchmark.summarize_runs(runs, num_steps=2)
    # per stage the larger of the two runs
    assert summary["stage_peak_bytes"] == {"text_encoder": 3 * gib, "denoise": 20 * gib, "vae_decode": 25 * gib}
    lines = benchmark.format_table(summary, num_steps=2).splitlines()
    assert lines[0].split()[-2:] == ["peak", "GiB"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["denoise"][1:] == ["4.2000", "4.0000", "4.4000", "20.00"]
    assert rows["vae_decode"][-1] == "25.00" and rows["text_encoder"][-1] == "3.00"
    assert len(rows["total"]) == 4  # no peak: the run's total is not a stage of the pipeline

    peak = benchmark.peak_memory(torch.device("cuda"), runs[1]["stage_peak_bytes"])
    assert (peak["bytes"], peak["stage"]) == (25 * gib, "vae_decode")


def test_benchmark_table_on_the_cpu_has_no_peak_column():
    runs = [{"stages": {"denoise": 1.0, "total": 1.0}, "steps": [0.5, 0.5], "stage_peak_bytes": {}}]
    summary = benchmark.summarize_runs(runs, num_steps=2)
    assert summary["stage_peak_bytes"] == {}
    assert "peak" not in benchmark.format_table(summary, num_steps=2)
    assert benchmark.peak_memory(torch.device("cpu"), {})["kind"].startswith("max RSS")


@pytest.mark.slow
def test_sample_meta_records_the_stage_peaks_when_there_are_some(tmp_path):
    from layerflow.batch.manifest import Sample
    from layerflow.batch.runner import run_samples

    config = tiny_config("gen_rgb", "sampling.num_steps=2", "output.preview=false")
    pipeline = LayerFlowPipeline(config)
    memory = CountingMemory()
    memory.use(3 * 2**29)  # 1.5 GiB resident through every stage, which allocate nothing more
    pipeline.memory = memory
    summary = run_samples(
        config, [Sample(id="one", prompts=PROMPTS, seed=1)], tmp_path, lambda _: pipeline, show_progress=False
    )
    assert summary.done == ["one"]
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta["peak_allocated_gib"] == {"text_encoder": 1.5, "denoise": 1.5, "vae_decode": 1.5}
    assert list(meta["timings_s"]) == ["text_encoder", "denoise", "vae_decode"]
