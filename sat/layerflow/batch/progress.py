"""What rank 0 shows while samples run: bars on a terminal, one line per sample otherwise.

On a terminal, tqdm bars show the whole run and the sample in progress: its denoising steps, then
the VAE decode and the writing of its files (on the CPU these take most of a sample's time), with
the stage named beside the bar. When stderr is a file or a pipe (a cluster job log,
``2> run.log``), bars would become a stream of carriage-return fragments; there each finished or
failed sample gives one plain line instead: ``[3/20] sample-02 done in 41.2 s``.
``--no-progress`` shows neither. :class:`StageBar` is the same kind of bar for the layer tools
(``layerflow compose``, ``layerflow score``), shown on a terminal only.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from layerflow.sampling import StepCallback

# What a sample's bar shows beside it per stage (pipeline stage names, then the runner's "write").
STAGE_LABELS = {
    "text_encoder": "encoding prompts",
    "vae_encode": "encoding given layers",
    "denoise": "denoising",
    "vae_decode": "decoding (VAE)",
    "write": "writing files",
}
FINISHING_STAGES = ("vae_decode", "write")  # each one unit of the sample's bar, after its steps
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # no rate:
# the units are steps and stages of different lengths


class StageBar:
    """A tqdm bar of ``total`` units over named stages; :meth:`stage` names the one now running.

    A stage started with ``counts=True`` takes one unit, filled when the next stage starts or the
    bar closes; the others (the denoising, counted step by step) take none of their own.
    """

    def __init__(self, total: int, desc: str, stream: TextIO, leave: bool = True):
        self.bar = tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=stream, bar_format=BAR_FORMAT)
        self._open = False  # a counted stage is running

    @classmethod
    def for_terminal(cls, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None):
        """A bar on ``stream`` (stderr) when it is a terminal and ``enabled``, else None."""
        stream = stream or sys.stderr
        return cls(total, desc, stream) if enabled and stream.isatty() else None

    def stage(self, label: str, counts: bool = True) -> None:
        if self._open:
            self.bar.update(1)
        self._open = counts
        self.bar.set_postfix_str(label)

    def close(self) -> None:
        if self._open:
            self.bar.update(1)
            self._open = False
        self.bar.close()


class RunProgress:
    """Progress of a run of ``total`` samples, ``finished`` of them complete before it started."""

    def __init__(self, total: int, finished: int, num_steps: int, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.mode = "off" if not enabled else "bars" if self.stream.isatty() else "lines"
        self.total = total
        self.num_steps = num_steps
        self.samples_bar = None
        self.steps_bar = None
        if self.mode == "bars":
            self.samples_bar = tqdm(
                total=total, initial=finished, desc="samples", unit="sample", dynamic_ncols=True, file=self.stream
            )

    def start_sample(self, sample_id: str, num_steps: int | None = None) -> StepCallback | None:
        """Call when a sample starts (``num_steps``: its own, when it overrides the run's); returns the
        sampler's per-step callback, or None."""
        if self.mode != "bars":
            return None
        steps = self.num_steps if num_steps is None else num_steps
        self.steps_bar = StageBar(steps + len(FINISHING_STAGES), f"  {sample_id}", self.stream, leave=False)
        return lambda step, x: self.steps_bar.bar.update(1)

    def stage(self, name: str) -> None:
        """Call as a stage of the sample starts: the pipeline's (``on_stage``), then ``write``."""
        if self.steps_bar is not None:
            self.steps_bar.stage(STAGE_LABELS.get(name, name), counts=name in FINISHING_STAGES)

    def end_sample(self, sample_id: str, finished: int, seconds: float, failure: str | None = None) -> None:
        """Call when a sample ends; ``finished`` counts the samples done or failed so far, on every rank."""
        if self.steps_bar is not None:
            self.steps_bar.close()
            self.steps_bar = None
        if self.mode == "bars":
            self.samples_bar.n = finished
            self.samples_bar.refresh()
        elif self.mode == "lines":
            outcome = f"failed: {failure}" if failure else f"done in {seconds:.1f} s"
            print(f"[{finished}/{self.total}] {sample_id} {outcome}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.steps_bar is not None:
            self.steps_bar.close()
        if self.samples_bar is not None:
            self.samples_bar.close()
