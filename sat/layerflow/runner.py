"""Run many samples, one process or many under torchrun: sharded, resumable, failures recorded.

* Rank r of N runs samples r, r+N, ...; each sample's seed comes from the run seed and its id, so
  1, 2 or N processes produce the same folders with the same content.
* A sample whose folder is complete (it has ``meta.json``; folders appear only when complete) is
  skipped, so rerunning the same command after a crash redoes only what was not finished.
* A sample that fails (bad input, out of memory) is written to ``failures.jsonl`` with its id and
  reason and the run goes on; the exit status says whether every sample succeeded.
* Rank 0 shows a progress bar for the whole run (it counts finished folders of all ranks); every
  rank logs to ``logs/rank<r>.log`` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed, parallel
from .atomic import write_text_atomic
from .batch import Sample, shard
from .config import LayerFlowConfig, SamplingSection
from .geometry import PIXEL_FRAMES_PER_LAYER
from .outputs import is_complete, write_sample
from .video_reader import read_foreground_layers, read_layer_video

log = logging.getLogger("layerflow")


@dataclass
class RunSummary:
    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def read_given_layers(sample: Sample, config: LayerFlowConfig) -> dict[str, torch.Tensor]:
    """The sample's given-layer files -> layer videos (16, 3, H, W) in [-1, 1], as the model takes them."""
    layout, size = config.layout, config.video_size
    given: dict[str, torch.Tensor] = {}
    for name in layout.given_layers:
        if name == "alpha":
            continue
        source = sample.inputs[name]
        if name == "fg":
            wants_alpha = "alpha" in layout.given_layers or "mask" in sample.inputs
            video = None if wants_alpha else read_layer_video(source, num_frames=PIXEL_FRAMES_PER_LAYER, size=size)
            if video is not None and video.shape[1] == 3:
                given["fg"] = video  # an RGB foreground without matte is taken as it is
                continue
            fg, alpha_layer = read_foreground_layers(source, sample.inputs.get("mask"),
                                                     num_frames=PIXEL_FRAMES_PER_LAYER, size=size)
            given["fg"] = fg
            if "alpha" in layout.given_layers:
                given["alpha"] = alpha_layer
        else:
            video = read_layer_video(source, num_frames=PIXEL_FRAMES_PER_LAYER, size=size)
            given[name] = video[:, :3]
    return given


def sample_config(config: LayerFlowConfig, sample: Sample) -> LayerFlowConfig:
    """Apply a sample's ``sampling.*`` overrides."""
    if not sample.overrides:
        return config
    values = {}
    for key, value in sample.overrides.items():
        section, _, name = key.partition(".")
        if section != "sampling" or name not in {f.name for f in dataclasses.fields(SamplingSection)}:
            raise ValueError(f"sample {sample.id}: only sampling.* overrides are allowed per sample, got {key!r}")
        values[name] = value
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **values))


def _setup_rank_log(output: Path, rank: int) -> None:
    (output / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / "logs" / f"rank{rank}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run_samples(config: LayerFlowConfig, samples: Sequence[Sample], output: Path,
                pipeline_factory: Callable[[LayerFlowConfig], object], show_progress: bool = True) -> RunSummary:
    """Run this rank's share of ``samples`` into ``output/<id>/``; see the module docstring."""
    rank, world = distributed.rank(), distributed.world_size()
    output.mkdir(parents=True, exist_ok=True)
    _setup_rank_log(output, rank)
    groups = parallel.current()  # one video per group of ranks (runtime.parallel); its leader writes
    mine = shard(samples, groups.group_index, groups.num_groups)
    summary = RunSummary()
    todo = []
    for sample in mine:
        if is_complete(output / sample.id):
            summary.skipped.append(sample.id)
        else:
            todo.append(sample)
    log.info("rank %d/%d: %d samples, %d already complete", rank, world, len(mine), len(summary.skipped))
    bar = None
    if show_progress and distributed.is_main_process():
        finished = sum(is_complete(output / s.id) for s in samples)
        bar = tqdm(total=len(samples), initial=finished, desc="samples", unit="sample", dynamic_ncols=True)
    pipeline = pipeline_factory(config) if todo else None
    failures: list[dict] = []
    for sample in todo:
        start = time.perf_counter()
        step_bar = None
        if bar is not None:
            step_bar = tqdm(total=config.sampling.num_steps, desc=f"  {sample.id}", unit="step", leave=False,
                            dynamic_ncols=True)
        try:
            run_config = sample_config(config, sample)
            given = read_given_layers(sample, run_config) if config.layout.given_layers else None
            seed = sample.resolved_seed(config.sampling.seed)
            result = pipeline.generate(sample.prompts, given, seed=seed, sampling=run_config.sampling,
                                       on_step=_step_updater(step_bar))
            meta = {"id": sample.id, "prompts": dict(sample.prompts), "inputs": dict(sample.inputs), "seed": seed,
                    "checkpoint": run_config.model.checkpoint if run_config.model.weights == "checkpoint" else
                    "random weights", "timings_s": result.timings}
            if groups.is_leader:
                write_sample(output / sample.id, result.layers, run_config, meta, given)
            summary.done.append(sample.id)
            summary.seconds[sample.id] = time.perf_counter() - start
            log.info("sample %s done in %.1f s", sample.id, summary.seconds[sample.id])
        except (ValueError, OSError, RuntimeError, torch.cuda.OutOfMemoryError) as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            summary.failed[sample.id] = reason
            if groups.is_leader:
                failures.append({"id": sample.id, "rank": rank, "error": reason})
            log.error("sample %s failed: %s", sample.id, reason)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            if step_bar is not None:
                step_bar.close()
        if bar is not None:
            bar.n = sum(is_complete(output / s.id) for s in samples) + len(summary.failed)
            bar.refresh()
    if bar is not None:
        bar.close()
    _record_failures(output, rank, failures)
    return summary


def _step_updater(step_bar: tqdm | None) -> Callable[[int, int], None] | None:
    if step_bar is None:
        return None
    return lambda step, total: step_bar.update(1)


def _record_failures(output: Path, rank: int, failures: list[dict]) -> None:
    """This rank's failures go to ``failures.rank<r>.jsonl``; :func:`merge_failures` joins them."""
    path = output / "logs" / f"failures.rank{rank}.jsonl"
    write_text_atomic(path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))


def merge_failures(output: Path, world_size: int) -> list[dict]:
    """Join the failures of this run's ranks into ``failures.jsonl`` (an empty file when none)."""
    failures = []
    for rank in range(world_size):
        part = output / "logs" / f"failures.rank{rank}.jsonl"
        if part.is_file():
            lines = part.read_text(encoding="utf-8").splitlines()
            failures += [json.loads(line) for line in lines if line.strip()]
    write_text_atomic(output / "failures.jsonl", "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return failures
