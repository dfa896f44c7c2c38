"""Batch runs under torchrun (CPU, gloo, tiny model): sharding, resume after a kill, failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny

from layerflow.io.output_folder import OutputFolder, OutputFolderError

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "configs"
BASE = tiny("gen", "rgb")
FAST = ["--set", "sampling.num_steps=2", "--set", "output.preview=false", "--no-progress"]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def environment() -> dict:
    """The caller's environment without thread-count variables: a plain process sees every core, as a user's does."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(REPO_ROOT / "sat") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def command(processes: int, manifest: Path, output: Path, *extra: str) -> list[str]:
    script = str(REPO_ROOT / "sat" / "sample_video.py")
    if processes == 1:
        launcher = [sys.executable, script]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            script,
        ]
    return [*launcher, *BASE, *FAST, "--manifest", str(manifest), "--output", str(output), *extra]


def run(processes: int, manifest: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(processes, manifest, output, *extra),
        cwd=REPO_ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_manifest(path: Path, count: int, broken: dict | None = None) -> list[str]:
    lines, ids = [], []
    for i in range(count):
        ids.append(f"sample-{i}")
        lines.append(
            {
                "id": ids[-1],
                "prompts": {"fg": f"a ball number {i}", "bg": f"a field {i}", "blend": f"ball {i} on field {i}"},
            }
        )
    if broken:
        lines.append(broken)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return ids


def sample_folders(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.is_dir() and p.name != "logs" and not p.name.startswith("."))


def fingerprint(folder: Path) -> dict[str, str]:
    """Checksums of every output file, nested ones included, except meta.json (its timings differ run to run)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "meta.json"
    }


def comparable_meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("timings_s")
    return meta


def test_two_processes_give_the_same_folders_as_one(tmp_path):
    """Default settings, no thread variables: torchrun gives each rank one thread, the plain process has all."""
    manifest = tmp_path / "jobs.jsonl"
    ids = write_manifest(manifest, 6)
    single, double = tmp_path / "one", tmp_path / "two"
    first = run(1, manifest, single)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(2, manifest, double)
    assert second.returncode == 0, second.stderr[-2000:]
    assert sample_folders(single) == sample_folders(double) == sorted(ids)
    for sample_id in ids:
        files = fingerprint(single / sample_id)
        assert {"foreground.mp4", "background.mp4", "blend.mp4"} <= set(files)
        assert files == fingerprint(double / sample_id), sample_id
        assert comparable_meta(single / sample_id) == comparable_meta(double / sample_id)
        meta = json.loads((single / sample_id / "meta.json").read_text())
        assert (meta["device"], meta["cpu_threads"]) == ("cpu", 1)
    assert (double / "logs" / "rank0.log").is_file() and (double / "logs" / "rank1.log").is_file()
    assert (double / "failures.jsonl").read_text() == ""


def wait_until_unlocked(output: Path, seconds: float) -> bool:
    """True once no process holds the output folder's lock (torchrun's workers have exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            OutputFolder(output).acquire().release()
            return True
        except OutputFolderError:
            time.sleep(0.2)
    return False


def test_killed_run_resumes_without_touching_finished_samples(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    ids = write_manifest(manifest, 6)
    output = tmp_path / "out"
    process = subprocess.Popen(
        command(2, manifest, output),
        cwd=REPO_ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            done = sample_folders(output) if output.is_dir() else []
            if len(done) >= 2 or process.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert wait_until_unlocked(output, seconds=120), "the workers of the killed launcher did not stop"
    finished = sample_folders(output)
    assert finished, "the run wrote nothing before it was killed"
    for name in finished:
        assert (output / name / "meta.json").is_file(), f"{name} is visible but incomplete"
    before = {name: (fingerprint(output / name), (output / name / "meta.json").stat().st_mtime_ns) for name in finished}

    rerun = run(2, manifest, output)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sample_folders(output) == sorted(ids)
    for name, (files, mtime) in before.items():
        assert fingerprint(output / name) == files
        assert (output / name / "meta.json").stat().st_mtime_ns == mtime
    assert not [p for p in output.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_broken_sample_is_recorded_and_the_others_finish(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    output = tmp_path / "out"
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    broken = {"id": "broken", "prompts": {"fg": "a", "bg": "b", "blend": "c"}, "inputs": {"fg": "corrupt.mp4"}}
    fg2bg = [
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "fg2bg_rgb.yaml"),
        str(CONFIGS / "tiny.yaml"),
    ]
    good = [
        {
            "id": f"good-{i}",
            "prompts": {"fg": f"a {i}", "bg": "b", "blend": "c"},
            "inputs": {"fg": str(tmp_path / "fg.mp4")},
        }
        for i in range(2)
    ]
    from layerflow.io.synthetic import layered_clip
    from layerflow.io.writer import write_mp4

    write_mp4(tmp_path / "fg.mp4", layered_clip(16, 64, 96)["fg"])
    manifest.write_text("".join(json.dumps(line) + "\n" for line in [good[0], broken, good[1]]), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "sat" / "sample_video.py"),
            *fg2bg,
            *FAST,
            "--manifest",
            str(manifest),
            "--output",
            str(output),
        ],
        cwd=REPO_ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert sample_folders(output) == ["good-0", "good-1"]
    failures = [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["broken"]
    assert "corrupt.mp4" in failures[0]["error"]
    assert "failed: broken:" in result.stderr
