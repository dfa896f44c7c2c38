"""``python -m layerflow.cli.launch``: torchrun that checks first and ends in one line (the scripts' launcher).

Takes torchrun's arguments (``--standalone --nproc_per_node=N SCRIPT ARGS...``) and runs the same
ranks with the same environment as ``torchrun``, with three differences:

1. ``SCRIPT ARGS --validate-only`` runs first, in one process that sees the world size to come
   (``WORLD_SIZE``): a config, prompt, input, manifest or weights error ends there, before any
   rank starts, with the script's one line and exit status 2.
2. When a rank fails, the run ends with one line instead of torchrun's ``ChildFailedError``
   traceback. Each rank keeps a status file for the launcher
   (:func:`layerflow.runtime.distributed.tell_launcher`, in a temporary folder): its log, the
   sample it runs, how it ended. The line is the failing rank's own last word (exit status 1, 2,
   3, 130 or 143 as in one process), or, for a rank that died without one (killed, crashed), one
   naming the rank, its signal or exit code, its sample and its log (exit status 3).
3. torchrun's own messages go to ``launcher.log`` beside the rank logs, not to the terminal.

Only the ranks that had ended when torchrun noticed the first failure are judged, not those it
then stopped. Scripts that keep no status (``train_video.py``) keep their exit status and their
own lines; only a death by a signal, or an exit status they do not use, gets the launcher's line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from layerflow.runtime.distributed import LAUNCH_STATUS_VARIABLE

EXIT_CRASHED = 3  # as an internal error in one process
SCRIPT_STATUSES = (1, 2, 3, 130, 143)  # the exit statuses the scripts end with on purpose
INTERRUPTED = "interrupted: stopped cleanly (unfinished samples were discarded); rerun the same command to resume"


class _Kept(logging.Handler):
    """torchrun's log records, kept for ``launcher.log``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _world_size(args) -> int | None:
    """The number of ranks torchrun will start, or None when it is not fixed (an elastic node range)."""
    low, high = torchrun.parse_min_max_nnodes(args.nnodes)
    return high * torchrun.determine_local_world_size(args.nproc_per_node) if low == high else None


def validate(args) -> int:
    """Run the script with ``--validate-only`` in one process; its exit status (0: go on)."""
    if args.no_python or args.run_path:
        return 0  # not a LayerFlow script run by Python: nothing to ask
    script = ["-m", args.training_script] if args.module else [args.training_script]
    env = dict(os.environ)
    world = _world_size(args)
    if world is not None:
        env["WORLD_SIZE"] = str(world)
    command = [sys.executable, *script, *args.training_script_args, "--validate-only"]
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode


def _read_status(folder: Path, rank: int) -> dict | None:
    path = folder / f"rank{rank}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _crashed(failure: ProcessFailure, status: Mapping | None) -> bool:
    """Ended without a last word: a rank that keeps a status but never said how it ended, or one
    that keeps none and died by a signal or with an exit status the scripts do not use."""
    if status is not None:
        return "exit" not in status
    return failure.exitcode < 0 or failure.exitcode not in SCRIPT_STATUSES


def _how_it_died(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"ended with exit status {failure.exitcode} without a word (a crash)"


def root_cause(failures: Mapping[int, ProcessFailure], statuses: Mapping[int, dict | None]) -> tuple[int, str]:
    """The exit status and the one line for the failed ranks ``failures`` (by rank, in the order
    torchrun saw them end: first those that ended by themselves, then those it stopped).

    Only the ranks seen in the first second are judged: one that torchrun had to kill because it
    did not stop (30 s later) is not a cause. A rank that said its last word ended as it said, even
    if torchrun's closing signal hit it while it was exiting. The rank that matters is the first
    seen of: one that ended without a word, one that failed on its own, one whose video partner was
    lost, one that was interrupted.
    """
    first = min(f.timestamp for f in failures.values())
    seen = [rank for rank, f in failures.items() if f.timestamp <= first + 1]

    def order(rank: int) -> tuple[int, int]:
        status = statuses.get(rank)
        if _crashed(failures[rank], status):
            return 0, seen.index(rank)
        said = (status or {}).get("exit", failures[rank].exitcode)
        if not said:
            kind = 4
        elif (status or {}).get("partner_lost"):
            kind = 2
        else:
            kind = 3 if said in (130, 143) else 1
        return kind, seen.index(rank)

    rank = min(seen, key=order)
    failure, status = failures[rank], statuses.get(rank) or {}
    log = f"; its log: {status['log']}" if status.get("log") else ""
    if _crashed(failure, statuses.get(rank)):
        sample = f" while running sample {status['sample']}" if status.get("sample") else ""
        return EXIT_CRASHED, f"error: rank {rank} {_how_it_died(failure)}{sample}{log}"
    code, line = status.get("exit", failure.exitcode), status.get("error", "")
    if line and code == EXIT_CRASHED:
        line += log
    return code, line


def _interrupted(stop: SignalException) -> int:
    return 130 if stop.sigval == signal.SIGINT else 128 + int(stop.sigval)


def _keep_log(kept: _Kept, statuses: Mapping[int, dict | None]) -> None:
    """Write torchrun's messages to ``launcher.log`` in the folder of the first rank log known."""
    logs = [Path(s["log"]).parent for s in statuses.values() if s and s.get("log")]
    if logs and kept.lines:
        (logs[0] / "launcher.log").write_text("\n".join(kept.lines) + "\n", encoding="utf-8")


def launch(args) -> int:
    """Start the ranks as torchrun does; return the run's exit status, having printed at most one line."""
    kept = _Kept()
    messages = logging.getLogger("torch.distributed")
    messages.handlers = [kept]  # instead of torch's handler to the terminal
    messages.propagate = False
    messages.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="layerflow-launch-") as folder:
        os.environ[LAUNCH_STATUS_VARIABLE] = folder  # the ranks inherit the launcher's environment
        code, line, statuses = 0, "", {}
        try:
            torchrun.run(args)
        except ChildFailedError as error:
            statuses = {rank: _read_status(Path(folder), rank) for rank in error.failures}
            code, line = root_cause(error.failures, statuses)
        except SignalException as stop:
            code, line = _interrupted(stop), INTERRUPTED
        except KeyboardInterrupt:  # Ctrl-C before torchrun's own signal handlers were in place
            code, line = 130, INTERRUPTED
        if not statuses:
            statuses = {0: _read_status(Path(folder), 0)}
        _keep_log(kept, statuses)
    if line:
        print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        checked = validate(args)
    except KeyboardInterrupt:  # the check, stopped with Ctrl-C, said so itself
        return 130
    return checked or launch(args)


if __name__ == "__main__":
    sys.exit(main())
