"""The same frames give the same video bytes, however many CPUs the writing process may use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT

from layerflow.io.writer import write_alpha_video, write_mp4

WRITERS = {  # file name -> how it is written (frames, path)
    "clip.mp4": "write_mp4(path, np.load(frames)[..., :3])",
    "clip.mov": "write_alpha_video(path, np.load(frames), codec='prores')",
    "clip.webm": "write_alpha_video(path, np.load(frames), codec='vp9')",
}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> tuple[np.ndarray, str]:
    """A textured RGBA clip (16, 128, 192, 4): enough macroblock rows for x264 to use several threads."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 180, 192, dtype=np.float32)[None, None, :, None]
    clip = (rng.random((16, 128, 192, 4), dtype=np.float32) * 60 + ramp).astype(np.uint8)
    path = tmp_path_factory.mktemp("frames") / "frames.npy"
    np.save(path, clip)
    return clip, str(path)


def write_here(name: str, clip: np.ndarray, path) -> bytes:
    if name.endswith(".mp4"):
        write_mp4(path, clip[..., :3])
    else:
        write_alpha_video(path, clip, codec="prores" if name.endswith(".mov") else "vp9")
    return path.read_bytes()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writing_twice_gives_the_same_bytes(tmp_path, frames, name):
    clip, _ = frames
    assert write_here(name, clip, tmp_path / f"a-{name}") == write_here(name, clip, tmp_path / f"b-{name}")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_process_bound_to_one_cpu_writes_the_same_bytes(tmp_path, frames, name):
    """ffmpeg would size libx264's threads by the CPUs a process may use (as a per-rank binding sets)."""
    clip, frames_path = frames
    here = write_here(name, clip, tmp_path / f"here-{name}")
    there = tmp_path / f"one-cpu-{name}"
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from layerflow.io.writer import write_alpha_video, write_mp4
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
        frames, path = {frames_path!r}, {str(there)!r}
        {WRITERS[name]}
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert there.read_bytes() == here
