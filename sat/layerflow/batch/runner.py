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
* When one video is made by a group of ranks (``runtime.parallel``), a rank that fails tells its
  partners at their next exchange (:mod:`layerflow.runtime.parallel.agreement`): the whole group
  gives the sample up, its leader records it once with the failing rank and its reason, and the
  group goes on with its next sample. A partner that dies or hangs ends this rank's share of the
  run with :class:`GroupLost` (one line; a rerun finishes the batch).
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

from layerflow.batch.faults import fault_from_environment
from layerflow.batch.given import check_given_layers, given_layer_sources, read_given_layers
from layerflow.batch.manifest import Sample, shard
from layerflow.batch.progress import RunProgress
from layerflow.config import LayerFlowConfig, apply_sampling_overrides
from layerflow.io.atomic import write_text_atomic
from layerflow.io.output_folder import FAILURES_FILE, LOGS_DIR, check_sample_target, is_complete
from layerflow.io.sample_folder import write_sample
from layerflow.runtime import distributed, parallel
from layerflow.runtime.parallel import ParallelGroups
from layerflow.runtime.parallel.agreement import GroupLost, PartnerFailed, RankFailure

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
    (output / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / LOGS_DIR / f"rank{rank}.log", encoding="utf-8")
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
    distributed.tell_launcher(log=str(output / LOGS_DIR / f"rank{rank}.log"))
    groups = parallel.current()  # one video per group of ranks (runtime.parallel); its leader writes
    mine = shard(samples, groups.group_index, groups.num_groups)
    fault = fault_from_environment()  # a test's injected failure (batch/faults.py); None in real runs
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
    lost: GroupLost | None = None
    for sample in todo:
        start = time.perf_counter()
        on_step = progress.start_sample(sample.id)
        if fault is not None:
            on_step = fault.around(on_step, sample.id, rank)
        _start_video(groups, sample.id)
        failure = None
        try:
            run_config = sample_config(config, sample)
            given = read_given_layers(sample, run_config) if config.layout.given_layers else None
            seed = sample.resolved_seed(config.sampling.seed)
            result = pipeline.generate(sample.prompts, given, seed=seed, sampling=run_config.sampling, on_step=on_step)
            _video_made(groups)
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
        except Exception as error:  # one sample's failure, whatever it is, must not stop the batch
            _log_failure(sample.id, error)
            failed, lost = _group_failure(error, groups, rank)
            failure = failed.reason
            summary.failed[sample.id] = failure
            if groups.is_leader:
                failures.append({"id": sample.id, "rank": failed.rank, "error": failure})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            finished = sum(is_complete(output / s.id) for s in samples) + len(summary.failed)
            progress.end_sample(sample.id, finished, time.perf_counter() - start, failure)
        if lost is not None:
            break
    progress.close()
    _record_failures(output, rank, failures)
    distributed.tell_launcher(sample=None)
    if lost is not None:
        raise GroupLost(f"{lost} while sample {sample.id} ran; rerun the same command to finish the batch")
    return summary


def _start_video(groups: ParallelGroups, sample_id: str) -> None:
    """A sample begins: its group's votes start over; a launcher learns which sample this rank runs."""
    if groups.agreement is not None:
        groups.agreement.start()
    distributed.tell_launcher(sample=sample_id)


def _video_made(groups: ParallelGroups) -> None:
    """The group's last vote on a video: every rank did its part (else :class:`PartnerFailed`). Collective."""
    if groups.agreement is not None:
        groups.agreement.finish()


def _group_failure(error: Exception, groups: ParallelGroups, rank: int) -> tuple[RankFailure, GroupLost | None]:
    """Who failed the sample and why, the same on every rank of its group, and the loss of the group
    if a partner died or hung. This rank's own error is first told to the partners, which wait for it
    at their next exchange (collective)."""
    if isinstance(error, PartnerFailed):
        return error.failure, None
    own = RankFailure(rank, _reason(error))
    if isinstance(error, GroupLost):
        return own, error
    if groups.agreement is None:
        return own, None
    try:
        return groups.agreement.fail(own.reason), None
    except GroupLost as lost:
        return own, lost


def _log_failure(sample_id: str, error: Exception) -> None:
    """The rank log's record of a failed sample: the traceback on a rank that failed, one line on its partners."""
    if isinstance(error, (PartnerFailed, GroupLost)):
        log.error("sample %s given up: %s", sample_id, error, extra=FILE_ONLY)
    else:
        log.exception("sample %s failed: %s", sample_id, _reason(error), extra=FILE_ONLY)


def _record_failures(output: Path, rank: int, failures: list[dict]) -> None:
    """This rank's failures go to ``failures.rank<r>.jsonl``; :func:`merge_failures` joins them."""
    path = output / LOGS_DIR / f"failures.rank{rank}.jsonl"
    write_text_atomic(path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))


def merge_failures(output: Path, world_size: int) -> list[dict]:
    """Join the failures of this run's ranks into ``failures.jsonl`` (an empty file when none)."""
    failures = []
    for rank in range(world_size):
        part = output / LOGS_DIR / f"failures.rank{rank}.jsonl"
        if part.is_file():
            lines = part.read_text(encoding="utf-8").splitlines()
            failures += [json.loads(line) for line in lines if line.strip()]
    write_text_atomic(output / FAILURES_FILE, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return failures
