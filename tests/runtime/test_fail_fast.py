"""A failing, dying or hung rank ends fast and in one line (CPU, gloo, tiny model).

The faults are injected with ``LAYERFLOW_FAULT`` (``layerflow/batch/faults.py``). The whole runs go
through ``python -m layerflow.cli.launch``, as the scripts do; the votes of a video group are also
driven directly, in two processes without a model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO_ROOT
from test_distributed import environment, sample_folders, wait_until_unlocked, write_manifest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from layerflow.batch import faults
from layerflow.batch.faults import Fault, InjectedFault, fault_from_environment
from layerflow.cli.launch import root_cause
from layerflow.config import ConfigError

CONFIGS = REPO_ROOT / "configs"
SCRIPT = str(REPO_ROOT / "sat" / "sample_video.py")
BASE = ["--base", str(CONFIGS / "model.yaml"), str(CONFIGS / "tasks" / "gen_rgb.yaml"), str(CONFIGS / "tiny.yaml")]
FAST = ["--set", "sampling.num_steps=2", "--set", "output.preview=false", "--no-progress"]
PARTNER_BOUND_S = 60  # the goal: a failing rank's partners stop within a minute


# -- the fault-injection point ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1:sample-0", "x:sample-0:2", "1::2", "1:sample-0:2:explode", "1:s:2:raise:more"])
def test_a_malformed_fault_is_one_line(monkeypatch, value):
    monkeypatch.setenv("LAYERFLOW_FAULT", value)
    with pytest.raises(ConfigError, match=r"^LAYERFLOW_FAULT=.*expected RANK:SAMPLE_ID:STEP\[:MODE\]"):
        fault_from_environment()


def test_a_fault_fires_on_its_rank_sample_and_step_only(monkeypatch):
    monkeypatch.setenv("LAYERFLOW_FAULT", "1:sample-3:2")
    fault = fault_from_environment()
    assert fault == Fault(1, "sample-3", 2, "raise")
    steps = []
    assert fault.around(None, "sample-3", rank=0) is None  # another rank: unchanged
    callback = fault.around(lambda step, x: steps.append(step), "sample-3", rank=1)
    callback(0, torch.zeros(1))
    callback(1, torch.zeros(1))
    with pytest.raises(InjectedFault, match="at step 2 of sample sample-3"):
        callback(2, torch.zeros(1))
    assert steps == [0, 1, 2]  # the caller's callback ran first, every time


# -- the votes of a video group, two processes, no model -----------------------------------------


def _vote_worker(rank: int, world: int, store: str, results: str) -> None:
    """A scripted sequence of videos on a guidance pair (cfg=2, timeout 2 s); see the test."""
    import torch.distributed as dist

    from layerflow.config import ParallelSection
    from layerflow.runtime import parallel
    from layerflow.runtime.parallel.agreement import GroupLost, PartnerFailed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    groups = parallel.setup(ParallelSection(cfg=2, timeout_s=2.0))
    votes, pair = groups.agreement, groups.cfg_group
    seen: dict = {}

    def exchange() -> list[float]:
        halves = [torch.empty(1), torch.empty(1)]
        pair.all_gather(halves, torch.tensor([float(rank)]))
        return [float(h) for h in halves]

    # 1. rank 1 fails before the exchange; rank 0 learns it in the exchange's vote
    votes.start()
    if rank == 1:
        seen["own_failure"] = vars(votes.fail("ValueError: bad input on rank 1"))
    else:
        try:
            exchange()
        except PartnerFailed as failed:
            seen["partner_failure"] = vars(failed.failure)
    # 2. the next video runs normally: the groups are still in step
    votes.start()
    seen["after_failure"] = exchange()
    votes.finish()
    # 3. both fail at the same point: both record the lower rank
    votes.start()
    seen["both"] = vars(votes.fail(f"RuntimeError: out of memory on rank {rank}"))
    # 4. a failure after the video's last vote (the leader writing) is the rank's own: no vote
    votes.start()
    exchange()
    votes.finish()
    if rank == 0:
        seen["late"] = vars(votes.fail("OSError: disk full"))
    votes.start()
    seen["after_late"] = exchange()
    # 5. rank 1 hangs: rank 0 gives up after the timeout
    votes.start()
    votes.check()
    if rank == 1:
        Path(results, "rank1.json").write_text(json.dumps(seen))
        time.sleep(8)
        os._exit(0)
    start = time.monotonic()
    try:
        exchange()
    except GroupLost as lost:
        seen["lost"] = {"seconds": time.monotonic() - start, "message": str(lost)}
    Path(results, "rank0.json").write_text(json.dumps(seen))
    os._exit(0)


@pytest.mark.slow
def test_the_votes_of_a_guidance_pair(tmp_path):
    """One rank's failure reaches its partner at the next exchange, with its reason, and the pair goes
    on in step; a double failure records the lower rank; a failure after the last vote is the rank's
    own; a partner that hangs is given up after runtime.parallel.timeout_s (2 s here)."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _vote_worker, args=(2, os.path.join(folder, "store"), str(tmp_path)), nprocs=2, join=False
        )
        deadline = time.monotonic() + 120
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the vote workers hung"
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["own_failure"] == zero["partner_failure"] == {"rank": 1, "reason": "ValueError: bad input on rank 1"}
    assert zero["after_failure"] == one["after_failure"] == [0.0, 1.0]
    assert zero["both"] == one["both"] == {"rank": 0, "reason": "RuntimeError: out of memory on rank 0"}
    assert zero["late"] == {"rank": 0, "reason": "OSError: disk full"}
    assert zero["after_late"] == one["after_late"] == [0.0, 1.0]
    lost = zero["lost"]
    assert 2.0 <= lost["seconds"] < 7, lost  # the timeout, not rank 1 ending its sleep after 8 s
    assert lost["message"] == "rank 0: its video partner rank 1 did not answer within runtime.parallel.timeout_s = 2 s"


def test_the_timeout_is_checked_when_read():
    from test_parallel import tiny_config

    assert tiny_config("gen_rgb", "runtime.parallel.timeout_s=20").runtime.parallel.timeout_s == 20.0
    for bad in ("0", "-5", ".nan", ".inf"):
        with pytest.raises(
            ConfigError, match=r"^runtime\.parallel\.timeout_s = .*expected (a number of seconds|a finite number)"
        ):
            tiny_config("gen_rgb", f"runtime.parallel.timeout_s={bad}")


# -- the launcher's one line ------------------------------------------------------------------------


def failure(rank: int, exitcode: int, later_s: int = 0) -> ProcessFailure:
    """A failure as torchrun records it, ``later_s`` seconds after the first one."""
    seen = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")
    seen.timestamp += later_s
    return seen


def test_root_cause_prefers_a_rank_that_died_without_a_word():
    """rank 0 said it lost its partner (exit 3), rank 1 died by itself (exit status 1 but no last word)."""
    failures = {0: failure(0, 3), 1: failure(1, 1)}
    statuses = {
        0: {"log": "out/logs/rank0.log", "sample": "s-1", "exit": 3, "error": "error: rank 0: lost", "partner_lost": 1},
        1: {"log": "out/logs/rank1.log", "sample": "s-1"},
    }
    code, line = root_cause(failures, statuses)
    assert code == 3
    assert line == (
        "error: rank 1 ended with exit status 1 without a word (a crash) while running sample s-1; "
        "its log: out/logs/rank1.log"
    )


def test_root_cause_believes_the_last_word_over_torchruns_closing_signal():
    """Every rank ended with 1 (some samples failed); torchrun's SIGTERM hit rank 1 as it exited."""
    failures = {0: failure(0, 1), 1: failure(1, -15)}
    statuses = {r: {"log": f"out/logs/rank{r}.log", "sample": None, "exit": 1, "error": ""} for r in (0, 1)}
    assert root_cause(failures, statuses) == (1, "")  # rank 0 printed the summary and the failures itself


def test_root_cause_of_a_script_without_status_keeps_its_exit_status():
    assert root_cause({0: failure(0, 2), 1: failure(1, 2)}, {0: None, 1: None}) == (2, "")
    # rank 1 was killed first; torchrun then stopped rank 0 (the failures come in the order torchrun saw them)
    code, line = root_cause({1: failure(1, -9), 0: failure(0, -15)}, {0: None, 1: None})
    assert (code, line) == (3, "error: rank 1 was killed by SIGKILL")


def test_root_cause_is_not_a_rank_that_torchrun_had_to_kill():
    """rank 1 hung, rank 0 gave up on it (exit 3); rank 1 ignored torchrun's SIGTERM and was killed 30 s later."""
    failures = {0: failure(0, 3), 1: failure(1, -9, later_s=30)}
    said = "error: rank 0: its video partner rank 1 did not answer within runtime.parallel.timeout_s = 300 s"
    statuses = {
        0: {"log": "out/logs/rank0.log", "sample": "s-1", "exit": 3, "error": said, "partner_lost": True},
        1: {"log": "out/logs/rank1.log", "sample": "s-1"},
    }
    assert root_cause(failures, statuses) == (3, f"{said}; its log: out/logs/rank0.log")


# -- whole runs through the scripts' launcher ---------------------------------------------------------


def launch(processes: int, manifest: Path, output: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "layerflow.cli.launch",
        "--standalone",
        f"--nproc_per_node={processes}",
        SCRIPT,
        *BASE,
        *FAST,
        "--manifest",
        str(manifest),
        "--output",
        str(output),
        *extra,
    ]
    env = environment()
    env["LAYERFLOW_FAULT"] = fault
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def log_time(log: Path, pattern: str) -> datetime:
    """When the rank log first recorded a line matching ``pattern``."""
    for line in log.read_text(encoding="utf-8").splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"{log} has no line matching {pattern!r}")


def failures_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    """stderr without rank 0's progress lines."""
    return [line for line in stderr.splitlines() if not re.match(r"^\[\d+/\d+\] ", line)]


def partner_delay(output: Path, sample_id: str, failing: int, partner: int) -> float:
    """Seconds from the failing rank's error to its partner giving the sample up (from the rank logs)."""
    failed = log_time(output / "logs" / f"rank{failing}.log", rf"sample {sample_id} failed")
    given_up = log_time(output / "logs" / f"rank{partner}.log", rf"sample {sample_id} given up")
    return (given_up - failed).total_seconds()


@pytest.mark.slow
def test_a_guidance_pair_gives_up_a_failed_sample_goes_on_and_a_rerun_finishes(tmp_path):
    manifest, output = tmp_path / "jobs.jsonl", tmp_path / "out"
    ids = write_manifest(manifest, 2)
    run = launch(2, manifest, output, "--set", "runtime.parallel.cfg=2", fault="1:sample-0:0")
    assert run.returncode == 1, run.stderr[-3000:]
    assert sample_folders(output) == ["sample-1"]  # the pair went on with the next sample
    [failed] = failures_of(output)
    assert (failed["id"], failed["rank"]) == ("sample-0", 1)
    assert failed["error"].startswith("InjectedFault: injected fault (LAYERFLOW_FAULT) at step 0")
    assert error_lines(run.stderr) == [f"failed: sample-0: {failed['error']}"]
    assert 0 <= partner_delay(output, "sample-0", failing=1, partner=0) < PARTNER_BOUND_S

    rerun = launch(2, manifest, output, "--set", "runtime.parallel.cfg=2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sample_folders(output) == sorted(ids)
    assert (output / "failures.jsonl").read_text() == ""


@pytest.mark.slow
def test_in_two_ulysses_groups_only_the_failed_sample_is_lost(tmp_path):
    """4 ranks, ulysses=2: group 0 (ranks 0, 1) takes samples 0 and 2, group 1 (ranks 2, 3) sample 1,
    which rank 3 fails after its second step."""
    manifest, output = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_manifest(manifest, 3)
    run = launch(4, manifest, output, "--set", "runtime.parallel.ulysses=2", fault="3:sample-1:1")
    assert run.returncode == 1, run.stderr[-3000:]
    assert sample_folders(output) == ["sample-0", "sample-2"]
    [failed] = failures_of(output)
    assert (failed["id"], failed["rank"]) == ("sample-1", 3)
    assert "at step 1 of sample sample-1" in failed["error"]
    assert error_lines(run.stderr) == [f"failed: sample-1: {failed['error']}"]
    assert 0 <= partner_delay(output, "sample-1", failing=3, partner=2) < PARTNER_BOUND_S


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_one_line(tmp_path):
    """ulysses=2 on 2 ranks; rank 1 is killed (SIGKILL, as by the kernel's OOM killer) in sample 0."""
    manifest, output = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_manifest(manifest, 2)
    run = launch(2, manifest, output, "--set", "runtime.parallel.ulysses=2", fault="1:sample-0:0:kill")
    assert run.returncode == 3
    assert run.stderr.splitlines() == [
        f"error: rank 1 was killed by SIGKILL while running sample sample-0; its log: {output / 'logs' / 'rank1.log'}"
    ]
    assert wait_until_unlocked(output, seconds=5), "a rank outlived the launcher"
    assert sample_folders(output) == []


@pytest.mark.slow
def test_a_config_error_stops_the_launcher_before_any_rank_starts(tmp_path):
    manifest, output = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_manifest(manifest, 2)
    run = launch(2, manifest, output, "--set", "runtime.parallel.ulysses=3")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "error: runtime.parallel.ulysses=3 must divide the 4 attention heads "
        "(model.network.num_attention_heads); possible: 1, 2, 4"
    ]
    assert not output.exists()


def test_validate_only_checks_and_writes_nothing(tmp_path, capsys):
    from layerflow.cli.generate import main

    manifest, output = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_manifest(manifest, 3)
    assert main([*BASE, "--manifest", str(manifest), "--output", str(output), "--validate-only"]) == 0
    assert capsys.readouterr().out == f"ok: 3 samples of gen_rgb on 1 process -> {output}\n"
    assert not output.exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "prompts": \n', encoding="utf-8")
    assert main([*BASE, "--manifest", str(broken), "--output", str(output), "--validate-only"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not output.exists()


def test_a_pause_slows_its_step_and_the_run_goes_on(monkeypatch):
    monkeypatch.setenv("LAYERFLOW_FAULT", "0:sample-1:1:pause")
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    steps = []
    callback = fault_from_environment().around(lambda step, x: steps.append(step), "sample-1", rank=0)
    for step in range(3):
        callback(step, torch.zeros(1))
    assert steps == [0, 1, 2] and slept == [faults.PAUSE_S]
