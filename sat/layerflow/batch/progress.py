"""What rank 0 shows while samples run: bars on a terminal, one line per sample otherwise.

On a terminal, tqdm bars show the whole run and the steps of the sample in progress. When stderr
is a file or a pipe (a cluster job log, ``2> run.log``), bars would become a stream of
carriage-return fragments; there each finished or failed sample gives one plain line instead:
``[3/20] sample-02 done in 41.2 s``. ``--no-progress`` shows neither.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from layerflow.sampling import StepCallback


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
        total = self.num_steps if num_steps is None else num_steps
        self.steps_bar = tqdm(
            total=total, desc=f"  {sample_id}", unit="step", leave=False, dynamic_ncols=True, file=self.stream
        )
        return lambda step, x: self.steps_bar.update(1)

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
