"""The queue of generations: first in, first out, one at a time, on one worker thread.

A job is ``queued`` (``position`` = jobs ahead of it, the running one included), then ``running``
(``stage`` and ``step``/``steps`` follow the generation: :class:`JobProgress` is the batch runner's
progress for it), then ``done`` or ``failed`` (``error``: one line). A full queue refuses a new job
(:class:`QueueFull`). :meth:`JobQueue.stop` drops the queued jobs and stops the running one at its
next step or stage (:class:`ServerStopping` unwinds it like Ctrl-C, so its unfinished folder is
removed by the atomic write).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from layerflow.tasks import TaskLayout


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class QueueFull(RuntimeError):
    """The queue holds as many waiting jobs as it may (HTTP 429)."""


class ServerStopping(BaseException):
    """Raised inside a running generation when the server stops: not a failure, so nothing records it."""


@dataclass(frozen=True)
class JobRequest:
    """What a job makes: a task layout, its prompts, given-layer files by input name, seed, steps,
    guidance and frame size (height, width)."""

    layout: TaskLayout
    prompts: Mapping[str, str]
    given: Mapping[str, Path]
    seed: int
    steps: int
    guidance: float
    size: tuple[int, int]


@dataclass
class Job:
    id: str
    request: JobRequest
    state: JobState = JobState.QUEUED
    stage: str | None = None
    step: int = 0
    steps: int = 0
    error: str | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


class JobProgress:
    """The batch runner's progress (:class:`layerflow.batch.progress.RunProgress`'s methods) for one job:
    it writes the stage and step into the job, and stops the run when the server stops."""

    def __init__(self, job: Job, stopping: threading.Event, lock: threading.Lock):
        self.job = job
        self.stopping = stopping
        self.lock = lock

    def _check(self) -> None:
        if self.stopping.is_set():
            raise ServerStopping()

    def start_sample(self, sample_id: str, num_steps: int | None = None):
        with self.lock:
            self.job.steps = num_steps or self.job.request.steps
            self.job.step = 0

        def on_step(step: int, x) -> None:
            with self.lock:
                self.job.step = step + 1
            self._check()

        return on_step

    def stage(self, name: str) -> None:
        with self.lock:
            self.job.stage = name
        self._check()

    def end_sample(self, sample_id: str, finished: int, seconds: float, failure: str | None = None) -> None:
        with self.lock:
            self.job.seconds = seconds

    def close(self) -> None:
        return None


# The worker's work: run ``job`` with ``progress``; returns None when done, else the one-line error.
RunJob = Callable[[Job, JobProgress], "str | None"]


class JobQueue:
    """FIFO jobs run by one worker thread with ``run``; at most ``capacity`` wait at a time."""

    def __init__(self, run: RunJob, capacity: int, first_number: int = 1):
        self.run = run
        self.capacity = capacity
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.number = first_number
        self.stopping = threading.Event()
        self._wake = threading.Condition(self.lock)
        self._worker = threading.Thread(target=self._work, name="layerflow-serve-worker", daemon=True)

    def next_id(self, layout: TaskLayout) -> str:
        """The id the next submitted job of ``layout`` gets (a sample folder's name)."""
        with self.lock:
            return f"{self.number:04d}-{layout.name}"

    def submit(self, request: JobRequest) -> Job:
        with self.lock:
            if self.stopping.is_set():
                raise QueueFull("the server is stopping")
            if len(self.waiting) >= self.capacity:
                raise QueueFull(f"the queue is full ({self.capacity} jobs waiting); try again when one has finished")
            job = Job(f"{self.number:04d}-{request.layout.name}", request, steps=request.steps)
            self.number += 1
            self.jobs[job.id] = job
            self.waiting.append(job)
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def snapshot(self, job: Job) -> tuple[Job, int]:
        """A consistent copy of ``job`` and its position (jobs ahead of it)."""
        with self.lock:
            position = 0
            if job.state is JobState.QUEUED:
                position = list(self.waiting).index(job) + (self.running is not None)
            return dataclasses.replace(job), position

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Drop the waiting jobs, stop the running one (at its next step or stage) and wait for the worker."""
        with self.lock:
            self.stopping.set()
            for job in self.waiting:
                job.state, job.error = JobState.FAILED, "the server stopped before this job ran"
            self.waiting.clear()
            self._wake.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def _next(self) -> Job | None:
        with self.lock:
            while not self.waiting and not self.stopping.is_set():
                self._wake.wait()
            if self.stopping.is_set():
                return None
            job = self.waiting.popleft()
            job.state = JobState.RUNNING
            self.running = job
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                error = self.run(job, JobProgress(job, self.stopping, self.lock))
            except ServerStopping:
                error = "the server stopped while this job ran (its unfinished folder was removed)"
            with self.lock:
                job.state = JobState.FAILED if error else JobState.DONE
                job.error = error
                self.running = None
