"""A fault-injection point for testing how a batch run survives a failing rank: ``LAYERFLOW_FAULT``.

``LAYERFLOW_FAULT=RANK:SAMPLE:STEP[:MODE]`` makes rank RANK fail while it denoises sample SAMPLE,
right after sampler step STEP (counted from 0). MODE says how:

* ``raise`` (the default): a ``RuntimeError``, as an out-of-memory error on one GPU would;
* ``exit``: the process ends at once, without cleanup (``os._exit(1)``), as a crash would;
* ``kill``: the process sends itself SIGKILL, as the kernel's out-of-memory killer would;
* ``hang``: the process sleeps for ever, as a rank stuck on a device or a file system would;
* ``pause``: that step takes :data:`PAUSE_S` seconds longer and the run goes on, as a step on a busy
  device would (lets a test watch a run in the middle, whatever the machine's speed).

Unset (always, outside tests), nothing changes. A value that does not parse stops the run before
any model loads, with one line (exit status 2).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from layerflow.config import ConfigError
from layerflow.sampling import StepCallback

FAULT_VARIABLE = "LAYERFLOW_FAULT"
MODES = ("raise", "exit", "kill", "hang", "pause")
PAUSE_S = 3.0


class InjectedFault(RuntimeError):
    """The failure that ``LAYERFLOW_FAULT`` asked for."""


@dataclass(frozen=True)
class Fault:
    rank: int
    sample: str
    step: int
    mode: str = "raise"

    def happen(self) -> None:
        """Fail in this fault's way (the caller checked that this is the rank, sample and step)."""
        if self.mode == "pause":
            time.sleep(PAUSE_S)
            return
        if self.mode == "exit":
            os._exit(1)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            while True:
                time.sleep(3600)
        raise InjectedFault(f"injected fault ({FAULT_VARIABLE}) at step {self.step} of sample {self.sample}")

    def around(self, on_step: StepCallback | None, sample_id: str, rank: int) -> StepCallback | None:
        """The sampler callback for ``sample_id`` on ``rank``: ``on_step``, then the fault at its step."""
        if (rank, sample_id) != (self.rank, self.sample):
            return on_step

        def step_then_fail(step: int, x: torch.Tensor) -> None:
            if on_step is not None:
                on_step(step, x)
            if step == self.step:
                self.happen()

        return step_then_fail


def fault_from_environment() -> Fault | None:
    """The fault ``LAYERFLOW_FAULT`` asks for, or None when it is unset or empty."""
    text = os.environ.get(FAULT_VARIABLE, "").strip()
    if not text:
        return None
    parts = text.split(":")
    expected = f"{FAULT_VARIABLE}={text!r}: expected RANK:SAMPLE_ID:STEP[:MODE] with MODE one of {', '.join(MODES)}"
    if len(parts) not in (3, 4) or not parts[0].isdigit() or not parts[2].isdigit() or not parts[1]:
        raise ConfigError(expected)
    mode = parts[3] if len(parts) == 4 else "raise"
    if mode not in MODES:
        raise ConfigError(expected)
    return Fault(int(parts[0]), parts[1], int(parts[2]), mode)
