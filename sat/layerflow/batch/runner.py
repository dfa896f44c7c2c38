"""Run many samples, one process or many under torchrun: sharded, resumable, failures recorded.

* Rank r of N runs samples r, r+N, ...; each sample's seed comes from the run seed and its id, so
  1, 2 or N processes produce the same folders with the same content.
* A sample whose folder is complete (LayerFlow's marker and ``meta.json``; folders appear only
  when complete) is skipped, so rerunning the same command after a crash redoes only what was
  not finished. A path in the way that LayerFlow did not make is never touched: that sample fails.
* Before any model loads, every sample is checked (its given-layer files, its folder); a sample
  that cannot run is recorded at once and the others go on.
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

from layerflow.batch.given import check_given_layers, given_layer_sources, read_given_layers
from layerflow.batch.manifest import Sample, shard
from layerflow.batch.progress import RunProgress
from layerflow.config import LayerFlowConfig, apply_sampling_overrides
from layerflow.io import links
from layerflow.io.atomic import DiskFullError, format_bytes, free_bytes, with_margin, write_text_atomic
from layerflow.io.log_file import LogFileHandler
from layerflow.io.output_folder import (
    FAILURES_FILE,
    LOGS_DIR,
    WHERE,
    check_sample_target,
    is_complete,
    largest_sample_bytes,
)
from layerflow.io.sample_folder import write_sample
from layerflow.runtime import distributed, parallel

log = logging.getLogger("layerflow")
FILE_ONLY = {"file_only": True}  # a record for the rank log; the terminal shows it through the progress and summary


@dataclass
class RunSummary:
    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def sample_config(config: LayerFlowConfig, sample: Sample) -> LayerFlowConfig:
    """Apply a sample's ``sampling.*`` overrides (validated like the YAML keys)."""
    if not sample.overrides:
        return config
    sampling = apply_sampling_overrides(config.sampling, sample.overrides, sample.source or f"sample {sample.id}")
    return dataclasses.replace(config, sampling=sampling)


def preflight(sample: Sample, config: LayerFlowConfig, output: Path) -> str | None:
    """Why ``sample`` cannot run (one line), or None: its folder is free or ours, its files are usable."""
    try:
        check_sample_target(output / sample.id)
        sample_config(config, sample)
        if config.layout.given_layers:
            check_given_layers(sample, config)
    except (ValueError, OSError) as error:
        return _reason(error)
    return None


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _setup_rank_log(output: Path, rank: int) -> None:
    handler = LogFileHandler(output, Path(LOGS_DIR) / f"rank{rank}.log", WHERE)  # never through a link
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run_samples(
    config: LayerFlowConfig,
    samples: Sequence[Sample],
    output: Path,
    pipeline_factory: Callable[[LayerFlowConfig], object],
    show_progress: bool = True,
) -> RunSummary:
    """Run this rank's share of ``samples`` into ``output/<id>/``; see the module docstring."""
    rank, world = distributed.rank(), distributed.world_size()
    _setup_rank_log(output, rank)
    groups = parallel.current()  # one video per group of ranks (runtime.parallel); its leader writes
    mine = shard(samples, groups.group_index, groups.num_groups)
    summary = RunSummary()
    failures: list[dict] = []
    todo = []
    for sample in mine:
        if is_complete(output / sample.id):
            summary.skipped.append(sample.id)
            continue
        problem = preflight(sample, config, output)
        if problem is None:
            todo.append(sample)
        else:
            summary.failed[sample.id] = problem
            if groups.is_leader:
                failures.append({"id": sample.id, "rank": rank, "error": problem})
            log.error("sample %s cannot run: %s", sample.id, problem, extra=FILE_ONLY)
    log.info(
        "rank %d/%d: %d samples, %d already complete, %d cannot run",
        rank,
        world,
        len(mine),
        len(summary.skipped),
        len(summary.failed),
    )
    finished = sum(is_complete(output / s.id) for s in samples)
    progress = RunProgress(
        len(samples), finished, config.sampling.num_steps, enabled=show_progress and distributed.is_main_process()
    )
    pipeline = pipeline_factory(config) if todo else None
    if pipeline is not None:
        passed_over = "; ".join(pipeline.speed.passed_over)
        log.info(
            "speed path: %s%s",
            pipeline.speed.describe(),
            f" (attention auto passed over {passed_over})" if passed_over else "",
        )
    disk_full = None
    for sample in todo:
        start = time.perf_counter()
        on_step = progress.start_sample(sample.id)
        failure = None
        try:
            run_config = sample_config(config, sample)
            given = read_given_layers(sample, run_config) if config.layout.given_layers else None
            seed = sample.resolved_seed(config.sampling.seed)
            result = pipeline.generate(sample.prompts, given, seed=seed, sampling=run_config.sampling, on_step=on_step)
            meta = {
                "id": sample.id,
                "prompts": dict(sample.prompts),
                "inputs": dict(sample.inputs),
                "seed": seed,
                "checkpoint": pipeline.weights.description,
                "device": pipeline.placement.device_kind,
                "cpu_threads": torch.get_num_threads(),
                "speed": pipeline.speed.describe(),
                "timings_s": result.timings,
                "given_sources": given_layer_sources(sample, run_config),
            }
            if result.peak_bytes:  # CUDA only: the peak allocated memory of each stage
                meta["peak_allocated_gib"] = {stage: round(n / 2**30, 3) for stage, n in result.peak_bytes.items()}
            if groups.is_leader:
                write_sample(output / sample.id, result.layers, run_config, meta, given)
            summary.done.append(sample.id)
            summary.seconds[sample.id] = time.perf_counter() - start
            log.info("sample %s done in %.1f s", sample.id, summary.seconds[sample.id])
        except DiskFullError as error:  # every later sample would fail too: stop; the rerun resumes
            failure, disk_full = "no space left on device", _disk_full_for_samples(error, output, samples, sample.id)
            break
        except Exception as error:  # one sample's failure, whatever it is, must not stop the batch
            failure = _reason(error)
            summary.failed[sample.id] = failure
            if groups.is_leader:
                failures.append({"id": sample.id, "rank": rank, "error": failure})
            log.exception("sample %s failed: %s", sample.id, failure, extra=FILE_ONLY)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            finished = sum(is_complete(output / s.id) for s in samples) + len(summary.failed)
            progress.end_sample(sample.id, finished, time.perf_counter() - start, failure)
    progress.close()
    if disk_full is not None:
        raise disk_full
    _record_failures(output, rank, failures)
    return summary


def _disk_full_for_samples(
    error: DiskFullError, output: Path, samples: Sequence[Sample], sample_id: str
) -> DiskFullError:
    """The disk filled while writing ``sample_id``: how much a sample needs, from a finished one when there is one."""
    whole = largest_sample_bytes(output, (s.id for s in samples))
    needed = max(error.needed, with_margin(whole))
    left = sum(not is_complete(output / s.id) for s in samples)
    full = DiskFullError(
        output,
        error.written,
        needed,
        f"{output}: no space left on device while writing sample {sample_id}; a sample needs about "
        f"{format_bytes(needed)} free there (the {left} left: about {format_bytes(needed * left)}) and "
        f"{format_bytes(free_bytes(output))} is free (the partial files were removed); "
        f"free some space and rerun the same command to resume",
    )
    full.__cause__ = error  # raised after the loop, outside the handler
    return full


def _record_failures(output: Path, rank: int, failures: list[dict]) -> None:
    """This rank's failures go to ``failures.rank<r>.jsonl``; :func:`merge_failures` joins them."""
    path = output / LOGS_DIR / f"failures.rank{rank}.jsonl"
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    write_text_atomic(path, text, within=output, where=WHERE)


def merge_failures(output: Path, world_size: int) -> list[dict]:
    """Join the failures of this run's ranks into ``failures.jsonl`` (an empty file when none)."""
    failures = []
    for rank in range(world_size):
        text = links.read_text(output, Path(LOGS_DIR) / f"failures.rank{rank}.jsonl", WHERE) or ""
        failures += [json.loads(line) for line in text.splitlines() if line.strip()]
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    write_text_atomic(output / FAILURES_FILE, text, within=output, where=WHERE)
    return failures
