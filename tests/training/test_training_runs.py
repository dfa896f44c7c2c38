"""train_video.py end to end (CPU, gloo, tiny model): 2 ranks equal 1 rank, logs, sampling the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_training import PROMPTS, write_manifest, write_still

from layerflow.weights.checkpoint import SAT_MODEL_FILE

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "configs"
SMALL = [
    "model.network.latent_height=4",
    "model.network.latent_width=6",
    "training.layers=[]",
    "training.gradient_checkpointing=false",
]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "sat") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def train(processes: int, task: str, manifest: Path, save: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = str(REPO_ROOT / "sat" / "train_video.py")
    launcher = (
        [sys.executable, script]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script]
    )
    base = [
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / f"{task}.yaml"),
        str(CONFIGS / "train" / "content_lora.yaml"),
        str(CONFIGS / "tiny.yaml"),
    ]
    settings = [
        *SMALL,
        f"training.manifest={manifest}",
        f"training.save={save}",
        f"training.cache={manifest.parent / ('cache_' + task)}",
        *overrides,
    ]
    command = [*launcher, *base, *[arg for s in settings for arg in ("--set", s)], "--no-progress"]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_stills(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stills")
    write_still(root / "a")
    write_still(root / "b", with_alpha=False)
    return write_manifest(
        root / "train.jsonl",
        [
            {"id": "a", "prompts": PROMPTS, "inputs": {"fg": "a/fg.png", "bg": "a/bg.png"}},
            {
                "id": "b",
                "prompts": PROMPTS,
                "still": False,
                "inputs": {"fg": "b/fg_rgb.png", "mask": "b/mask.png", "bg": "b/bg.png"},
            },
        ],
    )


def module_state(save: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(save / str(step) / SAT_MODEL_FILE, weights_only=True)["module"]


def log_records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_rank_with_the_same_global_batch(two_stills, tmp_path):
    # eps=1 makes AdamW's update ~ lr * gradient: the float rounding that differs between one batched
    # forward and two separate ones is not blown up to +-lr where a gradient is zero in theory (the
    # key LayerNorm bias: softmax ignores a shift shared by all keys), so the parameters compare tightly.
    common = (
        "training.steps=2",
        "training.save_interval=1",
        "training.learning_rate=0.5",
        "training.eps=1.0",
        "training.trainable=[content_lora,transformer]",
        "training.tensorboard=false",
    )
    one = train(1, "gen_rgb", two_stills, tmp_path / "one", "training.batch_size=2", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(2, "gen_rgb", two_stills, tmp_path / "two", "training.batch_size=1", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = module_state(tmp_path / "one", 2), module_state(tmp_path / "two", 2)
    start = module_state(tmp_path / "one", 1)
    assert single.keys() == double.keys()
    moved = max((single[key] - start[key]).abs().max().item() for key in single)
    assert moved > 1e-3  # the second step changes the weights far beyond the tolerance below
    for key in single:
        assert torch.allclose(single[key], double[key], rtol=0, atol=1e-6), key
    losses = [[r["loss"] for r in log_records(tmp_path / run)] for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    first = torch.load(tmp_path / "one" / "2" / "training_state.pt", weights_only=True)
    assert first["identity"]["global_batch"] == 2 and first["step"] == 2


def test_train_then_sample_with_logs_and_tensorboard(two_stills, tmp_path):
    save = tmp_path / "run"
    result = train(1, "gen_rgb", two_stills, save, "training.steps=3", "training.save_interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable content_lora:" in result.stdout and "layer_embedding: none here" in result.stdout
    assert (save / "latest").read_text() == "3" and (save / "2").is_dir()
    records = log_records(save)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 and r["loss"] > 0 for r in records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert {"train/lr", "train/samples_per_s", "train/grad_norm"} <= set(events.Tags()["scalars"])

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for layer, text in PROMPTS.items():
        (prompts / f"{layer}.txt").write_text(text + "\n")
    output = tmp_path / "samples"
    sampled = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "sat" / "sample_video.py"),
            "--base",
            str(save / "sample.yaml"),
            "--prompt-dir",
            str(prompts),
            "--output",
            str(output),
            "--set",
            "sampling.num_steps=2",
            "--set",
            "output.preview=false",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    (folder,) = [p for p in output.iterdir() if p.is_dir() and p.name != "logs"]
    assert {"foreground.mp4", "background.mp4", "blend.mp4", "meta.json"} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["checkpoint"] == str(save.resolve())


def test_bad_sample_is_one_line_and_exit_2(two_stills, tmp_path):
    manifest = write_manifest(
        tmp_path / "bad.jsonl",
        [
            {
                "id": "ok",
                "prompts": PROMPTS,
                "inputs": {"fg": str(two_stills.parent / "a/fg.png"), "bg": str(two_stills.parent / "a/bg.png")},
            },
            {
                "id": "no-alpha",
                "prompts": PROMPTS,
                "inputs": {"fg": str(two_stills.parent / "b/fg_rgb.png"), "bg": str(two_stills.parent / "a/bg.png")},
            },
        ],
    )
    result = train(1, "gen_rgb", manifest, tmp_path / "run", "training.steps=1")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample no-alpha" in errors[0] and "fg_rgb.png" in errors[0], result.stderr[-2000:]
    assert "no alpha channel" in errors[0] and not (tmp_path / "run" / "latest").exists()


def test_sigkill_then_rerun_equals_an_uninterrupted_run(two_stills, tmp_path):
    settings = (
        "training.steps=4",
        "training.save_interval=1",
        "training.learning_rate=0.01",
        "training.tensorboard=false",
    )
    straight = train(1, "gen_rgb", two_stills, tmp_path / "straight", *settings)
    assert straight.returncode == 0, straight.stderr[-3000:]

    save = tmp_path / "killed"
    script = str(REPO_ROOT / "sat" / "train_video.py")
    base = [
        "--base",
        str(CONFIGS / "model.yaml"),
        str(CONFIGS / "tasks" / "gen_rgb.yaml"),
        str(CONFIGS / "train" / "content_lora.yaml"),
        str(CONFIGS / "tiny.yaml"),
    ]
    overrides = [
        *SMALL,
        f"training.manifest={two_stills}",
        f"training.save={save}",
        f"training.cache={two_stills.parent / 'cache_gen_rgb'}",
        *settings,
    ]
    process = subprocess.Popen(
        [sys.executable, script, *base, *[a for o in overrides for a in ("--set", o)], "--no-progress"],
        cwd=REPO_ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        latest = save / "latest"
        if latest.is_file() and latest.read_text().strip() == "2":
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (save / "latest").read_text().strip() in {"2", "3"} and not (save / "4").exists()

    resumed = train(1, "gen_rgb", two_stills, save, *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2 to 4" in resumed.stdout or "from step 3 to 4" in resumed.stdout
    assert [r["step"] for r in log_records(save)] == [1, 2, 3, 4]
    final, expected = module_state(save, 4), module_state(tmp_path / "straight", 4)
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    optimizer = [
        torch.load(folder / "4" / "training_state.pt", weights_only=True)["optimizer"]["state"]
        for folder in (save, tmp_path / "straight")
    ]
    assert all(
        torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        for a, b in zip(optimizer[0].values(), optimizer[1].values(), strict=True)
    )
