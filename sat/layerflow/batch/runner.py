"""Run many samples, one process or many under torchrun: sharded, resumable, failures recorded.

* Rank r of N runs samples r, r+N, ...; each sample's seed comes from the run seed and its id, so
  1, 2 or N processes produce the same folders with the same content.
* A sample whose folder is complete (LayerFlow's marker and ``meta.json``; folders appear only
  when complete) is skipped, so rerunning the same command after a crash redoes only what was
  not finished. A path in the way that LayerFlow did not make is never touched: that sample fails.
* A rerun never keeps a stale result: each sample records its fingerprint (everything that decides
  its files, :mod:`layerflow.batch.fingerprint`) in ``meta.json``. Before any model loads, rank 0
  compares every finished sample's with this run's; if any differs the whole run stops with one
  line naming the first such sample and setting (nothing touched), unless ``redo_changed`` asks
  to make those samples again (each replaced only once its new folder is complete).
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
from layerflow.batch.fingerprint import ChangedSampleError, Fingerprinter, refusal, why_changed
from layerflow.batch.given import (
    check_given_layers,
    given_layer_record,
    given_layer_sources,
    kept_given_files,
    read_given_layers,
)
from layerflow.batch.manifest import Sample, shard
from layerflow.batch.progress import RunProgress
from layerflow.batch.sample_folder import write_sample
from layerflow.config import LayerFlowConfig, apply_sampling_overrides
from layerflow.io import links
from layerflow.io.atomic import DiskFullError, format_bytes, free_bytes, with_margin, write_text_atomic
from layerflow.io.output_folder import (
    FAILURES_FILE,
    LOGS_DIR,
    WHERE,
    check_sample_target,
    is_complete,
    largest_sample_bytes,
)
from layerflow.io.sample_files import META_FILE, SampleFolderError, read_meta
from layerflow.runtime import distributed, parallel
from layerflow.runtime.parallel import ParallelGroups
from layerflow.runtime.parallel.agreement import GroupLost, PartnerFailed, RankFailure
from layerflow.weights.resolve import Weights, resolve_weights

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


def preflight(sample: Sample, config: LayerFlowConfig, output: Path, checked: set | None = None) -> str | None:
    """Why ``sample`` cannot run (one line), or None: its folder is free or ours, its files are usable.

    ``checked``: the given-layer files this run has checked already (see :func:`check_given_layers`).
    """
    try:
        check_sample_target(output / sample.id)
        sample_config(config, sample)
        if config.layout.given_layers:
            check_given_layers(sample, config, checked)
    except (ValueError, OSError) as error:
        return _reason(error)
    return None


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _setup_rank_log(output: Path, rank: int) -> None:
    distributed.attach_rank_log(output, Path(LOGS_DIR) / f"rank{rank}.log", WHERE)  # replaces an earlier run's


def run_samples(
    config: LayerFlowConfig,
    samples: Sequence[Sample],
    output: Path,
    pipeline_factory: Callable[[LayerFlowConfig], object],
    show_progress: bool = True,
    checked: set | None = None,
    weights: Weights | None = None,
    redo_changed: bool = False,
    progress: RunProgress | None = None,
) -> RunSummary:
    """Run this rank's share of ``samples`` into ``output/<id>/``; see the module docstring.

    ``checked``: given-layer files the caller has checked already, so that each is checked (and
    warned about) once per run. ``weights`` (default: :func:`resolve_weights` of ``config``) are what
    the pipeline loads, named in each fingerprint; ``redo_changed`` makes finished samples with another
    fingerprint again instead of stopping with :class:`ChangedSampleError`. ``progress`` is where the
    run reports its samples, steps and stages (default: a :class:`RunProgress` on stderr; ``layerflow
    serve`` passes one that its web page polls).
    """
    rank, world = distributed.rank(), distributed.world_size()
    _setup_rank_log(output, rank)
    distributed.tell_launcher(log=str(output / LOGS_DIR / f"rank{rank}.log"))
    groups = parallel.current()  # one video per group of ranks (runtime.parallel); its leader writes
    mine = shard(samples, groups.group_index, groups.num_groups)
    fingerprinter = Fingerprinter(config, weights if weights is not None else resolve_weights(config))
    redo = plan_reruns(config, samples, output, fingerprinter, redo_changed)
    fault = fault_from_environment()  # a test's injected failure (batch/faults.py); None in real runs
    summary = RunSummary()
    failures: list[dict] = []
    todo = _samples_to_run(mine, config, output, redo, set() if checked is None else checked, summary, failures)
    log.info(
        "rank %d/%d: %d samples, %d already complete, %d cannot run",
        rank,
        world,
        len(mine),
        len(summary.skipped),
        len(summary.failed),
    )
    finished = count_finished(output, samples, redo)
    if progress is None:
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
    disk_full: DiskFullError | None = None
    for sample in todo:
        start = time.perf_counter()
        _start_video(groups, sample.id)
        failure = None
        try:
            run_config = sample_config(config, sample)
            on_step = progress.start_sample(sample.id, run_config.sampling.num_steps)
            if fault is not None:
                on_step = fault.around(on_step, sample.id, rank)
            seed = sample.resolved_seed(config.sampling.seed)
            fingerprint = fingerprinter.record(sample, run_config, seed)  # before reading: what was read is named
            given = read_given_layers(sample, run_config) if config.layout.given_layers else None
            result = pipeline.generate(
                sample.prompts, given, seed=seed, sampling=run_config.sampling, on_step=on_step, on_stage=progress.stage
            )
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
                **rerun_records(sample, run_config, fingerprint, given),
            }
            if result.peak_bytes:  # CUDA only: the peak allocated memory of each stage
                meta["peak_allocated_gib"] = {stage: round(n / 2**30, 3) for stage, n in result.peak_bytes.items()}
            progress.stage("write")
            if groups.is_leader:
                write_sample(
                    output / sample.id, result.layers, run_config, meta, given, kept_given_files(sample, run_config)
                )
            summary.done.append(sample.id)
            summary.seconds[sample.id] = time.perf_counter() - start
            log.info("sample %s done in %.1f s", sample.id, summary.seconds[sample.id])
        except DiskFullError as error:  # every later sample would fail too: stop; the rerun resumes
            failure, disk_full = "no space left on device", _disk_full_for_samples(error, output, samples, sample.id)
            break
        except Exception as error:  # one sample's failure, whatever it is, must not stop the batch
            _log_failure(sample.id, error)
            failed, lost = _group_failure(error, groups, rank)
            failure = failed.reason
            summary.failed[sample.id] = failure
            if groups.is_leader:
                failures.append({"id": sample.id, "rank": failed.rank, "error": failure})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except BaseException:  # Ctrl-C or SIGTERM: the sample is discarded, so it is neither done nor failed
            progress.close()
            raise
        finished = count_finished(output, samples, redo) + len(summary.failed)
        progress.end_sample(sample.id, finished, time.perf_counter() - start, failure)
        if lost is not None:
            break
    progress.close()
    if disk_full is not None:
        raise disk_full
    _record_failures(output, rank, failures)
    distributed.tell_launcher(sample=None)
    if lost is not None:
        raise GroupLost(f"{lost} while sample {sample.id} ran; rerun the same command to finish the batch")
    return summary


def _samples_to_run(
    mine: Sequence[Sample],
    config: LayerFlowConfig,
    output: Path,
    redo: dict[str, int],
    checked: set,
    summary: RunSummary,
    failures: list[dict],
) -> list[Sample]:
    """This rank's samples that are not complete (or are to be made again) and pass their pre-check;
    the complete ones go to ``summary.skipped``, the ones that cannot run to ``summary.failed`` (and,
    on the group's leader, to ``failures``)."""
    rank, is_leader = distributed.rank(), parallel.current().is_leader
    todo = []
    for sample in mine:
        if is_complete(output / sample.id) and sample.id not in redo:
            summary.skipped.append(sample.id)
            continue
        problem = preflight(sample, config, output, checked)
        if problem is None:
            todo.append(sample)
            continue
        summary.failed[sample.id] = problem
        if is_leader:
            failures.append({"id": sample.id, "rank": rank, "error": problem})
        log.error("sample %s cannot run: %s", sample.id, problem, extra=FILE_ONLY)
    return todo


def plan_reruns(
    config: LayerFlowConfig, samples: Sequence[Sample], output: Path, fingerprinter: Fingerprinter, redo_changed: bool
) -> dict[str, int]:
    """Which finished samples this run makes again: ``{id: modification time of its meta.json}``.

    Rank 0 compares every finished sample's recorded fingerprint with this run's (before any model
    loads) and tells every rank, with how it names the weights, which every rank then records (so
    ranks on nodes with their own copy of the weights agree). A difference without ``redo_changed``
    raises :class:`ChangedSampleError` on every rank, naming the first changed sample and setting;
    nothing has been written then. Collective.
    """
    plan, failure = "", None
    if distributed.is_main_process():
        try:
            changed = _changed_samples(config, samples, output, fingerprinter)
            if changed and not redo_changed:
                (sample_id, why), others = changed[0], len(changed) - 1
                raise ChangedSampleError(refusal(output / sample_id, why, others))
            redo = {sample_id: _meta_time(output / sample_id) for sample_id, _ in changed}
            plan = json.dumps({"redo": redo, "weights": fingerprinter.weights_named})
        except Exception as error:  # every rank must hear of it, or the others wait for rank 0 forever
            failure = error
            plan = json.dumps({"error": str(error) if isinstance(error, ChangedSampleError) else _reason(error)})
    plan = json.loads(distributed.share_from_main(plan))
    if failure is not None:
        raise failure
    if "error" in plan:
        raise ChangedSampleError(plan["error"])
    fingerprinter.adopt_weights(plan["weights"])  # the weights as rank 0 compared them, recorded by every rank
    for sample_id in plan["redo"]:
        log.info("sample %s was made with other settings; making it again (--redo-changed)", sample_id)
    return plan["redo"]


def _changed_samples(
    config: LayerFlowConfig, samples: Sequence[Sample], output: Path, fingerprinter: Fingerprinter
) -> list[tuple[str, str]]:
    """``(id, why)`` of every finished sample whose fingerprint is not this run's, in run order."""
    changed = []
    for sample in samples:
        folder = output / sample.id
        if not is_complete(folder):
            continue
        try:
            meta = read_meta(folder)
        except SampleFolderError:
            meta = None
        run_config = sample_config(config, sample)
        unreadable: dict[str, str] = {}
        current = fingerprinter.settings(sample, run_config, sample.resolved_seed(config.sampling.seed), unreadable)
        for setting, reason in unreadable.items():
            log.warning("%s: %s cannot be read now (%s), so that input is not compared", folder, setting, reason)
        why = why_changed(meta, current, unreadable)
        if why is not None:
            changed.append((sample.id, why))
    return changed


def _meta_time(folder: Path) -> int:
    return (folder / META_FILE).stat().st_mtime_ns


def count_finished(output: Path, samples: Sequence[Sample], redo: dict[str, int]) -> int:
    """Complete sample folders, not counting the changed ones that this run has not made again yet."""
    return sum(
        is_complete(output / s.id) and (s.id not in redo or _meta_time(output / s.id) != redo[s.id]) for s in samples
    )


def rerun_records(
    sample: Sample, run_config: LayerFlowConfig, fingerprint: dict, given: dict[str, torch.Tensor] | None
) -> dict[str, object]:
    """``meta.json``'s ``fingerprint`` and, for a conditional task, ``given_layers`` (which file is which)."""
    records: dict[str, object] = {"fingerprint": fingerprint}
    if given is not None:
        content = {name: fingerprint["settings"].get(f"inputs.{name}") for name in sample.inputs}
        records["given_layers"] = given_layer_record(sample, run_config, given, content)
    return records


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
