"""A job run as ``layerflow generate`` runs a sample: through the batch runner, into ``samples/<job id>/``.

So a job's folder is a normal sample folder (every layer file, ``given/`` copies of the uploads,
``meta.json`` with the fingerprint and scores), written atomically: a job that fails (or is stopped)
leaves no folder, and the failure is one line. The pipeline of each task, variant and size is built
once and kept (:class:`PipelineCache`, the least recently used one goes when it is full), so the
second job of a task starts denoising at once.
"""

from __future__ import annotations

import collections
import functools
import threading
from pathlib import Path

from layerflow.batch.manifest import Sample
from layerflow.batch.runner import preflight, run_samples
from layerflow.config import ConfigError, LayerFlowConfig
from layerflow.runtime import distributed
from layerflow.runtime.devices import cpu_threads, resolve_placement, resolve_speed
from layerflow.serve.catalog import ModelChoice
from layerflow.serve.jobs import Job, JobProgress, JobRequest
from layerflow.weights.resolve import Weights, resolve_weights


def one_line(error: BaseException) -> str:
    """``Type: first line`` of an error, as the batch runner records a failed sample."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def sample_of(job_id: str, request: JobRequest) -> Sample:
    """The batch runner's sample of a job: its id is the job's, steps and guidance are its overrides."""
    return Sample(
        id=job_id,
        prompts={name: request.prompts[name] for name in request.layout.prompt_layers},
        inputs={name: str(path) for name, path in request.given.items()},
        seed=request.seed,
        overrides={"sampling.num_steps": request.steps, "sampling.guidance_scale": request.guidance},
        source=f"job {job_id}",
    )


class PipelineCache:
    """Built pipelines (and the weights they name) by (task layout, size); at most ``capacity`` kept."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._built: collections.OrderedDict[tuple, tuple[object, Weights]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def kept(self) -> list[tuple]:
        """The keys of the pipelines kept, least recently used first."""
        with self._lock:
            return list(self._built)

    def weights(self, key: tuple, config: LayerFlowConfig) -> Weights:
        with self._lock:
            if key in self._built:
                return self._built[key][1]
        return resolve_weights(config)

    def pipeline(self, key: tuple, config: LayerFlowConfig, weights: Weights):
        """The pipeline of ``key``, built from ``config`` the first time."""
        with self._lock:
            if key in self._built:
                self._built.move_to_end(key)
                return self._built[key][0]
        from layerflow.pipeline import LayerFlowPipeline

        try:
            placement = resolve_placement(config.runtime)
            speed = resolve_speed(config.runtime, placement, config.network.head_dim)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        pipeline = LayerFlowPipeline(config, placement=placement, weights=weights, speed=speed)
        with self._lock:
            self._built[key] = (pipeline, weights)
            while len(self._built) > self.capacity:
                self._built.popitem(last=False)
        return pipeline


class Generator:
    """Runs jobs into ``samples`` with the configs of ``model``."""

    def __init__(self, model: ModelChoice, samples: Path, cache: PipelineCache):
        self.model = model
        self.samples = samples
        self.cache = cache

    def config(self, request: JobRequest) -> LayerFlowConfig:
        return self.model.config(request.layout, request.size)

    def check(self, job_id: str, request: JobRequest) -> str | None:
        """Why the job cannot run (one line: a given layer that does not fit the task), or None; before queueing."""
        return preflight(sample_of(job_id, request), self.config(request), self.samples)

    def __call__(self, job: Job, progress: JobProgress) -> str | None:
        """Run ``job``; None when its folder is written, else the one-line reason it failed."""
        request = job.request
        try:
            config = self.config(request)
            key = (request.layout.name, request.size)
            weights = self.cache.weights(key, config)
            factory = functools.partial(self.cache.pipeline, key, weights=weights)
            with cpu_threads(config.runtime.cpu_threads):
                summary = run_samples(
                    config,
                    [sample_of(job.id, request)],
                    self.samples,
                    factory,
                    show_progress=False,
                    weights=weights,
                    progress=progress,
                )
        except Exception as error:  # a job's failure, whatever it is, is its one line; the server goes on
            return one_line(error)
        finally:
            distributed.detach_rank_log()  # the runner logged this job to samples/logs/rank0.log
        return summary.failed.get(job.id)
