"""Process-group and rank helpers: the one place that knows about torch.distributed.

SwissArmyTransformer's layers ask its model-parallel group for their world size, so a group must
exist before a model is built, even in a single process. Under ``torchrun`` the environment names
the rank and world size and the real group is created; otherwise a single-process group on an
in-memory store is made (no port is opened). Model-parallel size is always 1.

Under ``layerflow.cli.launch`` (the scripts' launcher) each rank also keeps a small status file for
the launcher (:func:`tell_launcher`): its log, the sample it runs and how it ended, from which the
launcher makes the one line it prints when a rank fails or dies.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from sat import mpu

from layerflow.io.atomic import write_text_atomic
from layerflow.io.log_file import LogFileHandler

LAUNCH_STATUS_VARIABLE = "LAYERFLOW_LAUNCH_STATUS"  # the folder of the ranks' status files, set by layerflow.cli.launch
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # how long a collective of the default group may wait


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def stop_with_launcher() -> None:
    """Under torchrun, ask Linux to send this worker SIGTERM when the launcher dies.

    torchrun starts each worker in a session of its own, so a launcher killed with ``kill -9``
    leaves its workers running on as orphans, still writing into the output folder and holding
    its lock. With this, they stop cleanly instead (the CLI handles SIGTERM like Ctrl-C). A no-op
    outside Linux or outside torchrun.
    """
    if not launched_by_torchrun() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def init_process_group(backend: str | None = None) -> None:
    """Create the default process group if none exists: from the torchrun environment, or alone."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if launched_by_torchrun():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)


def ensure_model_parallel() -> None:
    """Make sure SAT's model-parallel group (size 1) exists."""
    init_process_group()
    # SAT guesses the ranks per node (and says so) unless told; torchrun sets it, a plain process is 1
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1" if not launched_by_torchrun() else str(world_size()))
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)


_control_group = None


def _control() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for small control messages (CPU tensors, even when the default is NCCL)."""
    global _control_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


def sum_over_ranks(local: int) -> int:
    """The sum of an integer over every rank (the value itself in a single process). Collective."""
    group = _control()
    if group is None:
        return local
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total, group=group)
    return int(total.item())


def share_from_main(message: str) -> str:
    """Rank 0's ``message`` on every rank (e.g. an error that must stop all of them). Collective."""
    group = _control()
    if group is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


_rank_log: tuple[logging.Logger, logging.FileHandler] | None = None  # (logger, handler) of the current run


def attach_rank_log(root: Path, relative: Path, where: str, logger: str = "layerflow") -> None:
    """Log ``logger``'s INFO and up to ``root / relative`` (this rank's log file), replacing the file of
    an earlier run; the file is reached without following links below ``root`` (``where`` names the
    setting to change when something is in the way, :class:`layerflow.io.log_file.LogFileHandler`).

    One handler at a time: a process that runs several times (the demo runs 8 configurations,
    tests run many) writes each record once, into the current run's file.
    """
    global _rank_log
    detach_rank_log()
    handler = LogFileHandler(root, relative, where)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    target = logging.getLogger(logger)
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    _rank_log = (target, handler)


def detach_rank_log() -> None:
    """Remove and close the handler of :func:`attach_rank_log`, if any (at the end of a run)."""
    global _rank_log
    if _rank_log is not None:
        target, handler = _rank_log
        target.removeHandler(handler)
        handler.close()
        _rank_log = None


_told: dict = {}


def tell_launcher(**facts) -> bool:
    """Under ``layerflow.cli.launch``, add ``facts`` (``log``, ``sample``, ``exit``, ``error``) to this
    rank's status file, ``rank<r>.json``; the launcher reads it when the run ends. Returns whether
    there is a launcher to tell: without one, nothing is written."""
    folder = os.environ.get(LAUNCH_STATUS_VARIABLE)
    if not folder:
        return False
    _told.update(facts)
    write_text_atomic(Path(folder) / f"rank{rank()}.json", json.dumps(_told, ensure_ascii=False))
    return True
