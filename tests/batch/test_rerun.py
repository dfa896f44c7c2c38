"""Rerunning into an output folder: a finished sample is kept only when it was made with this run's
settings (its fingerprint in meta.json), and the given layers are kept as they were given.

Every refusal is checked to come before any model loads and to leave the folder as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from test_reliability import FAST, cli, entry, manifest, one_error, tiny, tree

from layerflow.batch.fingerprint import ContentHashes, first_difference
from layerflow.io.synthetic import write_layered_clip

REDO_HINT = "; rerun with --redo-changed to replace it, or use another --output"


def meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def sample_trees(output: Path) -> dict:
    """Every sample folder's files and bytes, and the run's failure list (the rank logs may grow)."""
    return {name: tree(output / name) for name in ("a", "b")} | {"failures": (output / "failures.jsonl").read_bytes()}


def test_changed_settings_are_refused_before_loading_and_same_or_unrelated_ones_skip(tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    run = [*tiny(), *FAST, "--manifest", str(jobs), "--output", str(output)]
    assert cli(capsys, *run)[0] == 0
    recorded = meta(output / "a")["fingerprint"]
    assert recorded["settings"]["sampling.num_steps"] == 2 and len(recorded["sha256"]) == 64
    before = sample_trees(output)

    import layerflow.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(layerflow.pipeline.LayerFlowPipeline, "__init__", refuse)  # from here on
    code, lines = cli(capsys, *run, "--set", "sampling.num_steps=3")
    assert code == 2
    assert one_error(lines) == (
        f"error: {output / 'a'} was made with sampling.num_steps=2, this run has 3 "
        f"(1 more finished sample differs too){REDO_HINT}"
    )
    code, lines = cli(capsys, *run, "--seed", "7")  # random weights: the run seed draws them
    assert code == 2
    assert 'weights.network="random (from sampling.seed=42)", this run has "random (from sampling.seed=7)"' in (
        one_error(lines)
    )
    code, lines = cli(capsys, *run, "--set", "output.preview=true")  # output keys change the files
    assert code == 2 and "output.preview=false, this run has true" in one_error(lines)
    reseeded = manifest(tmp_path / "reseeded.jsonl", entry("a", seed=5), entry("b"))
    code, lines = cli(capsys, *tiny(), *FAST, "--manifest", str(reseeded), "--output", str(output))
    assert code == 2
    assert one_error(lines).startswith(f"error: {output / 'a'} was made with seed={recorded['settings']['seed']}, ")
    assert sample_trees(output) == before

    for same in ([], ["--set", "runtime.keep_text_encoder=true"], ["--set", "runtime.model_cpu_offload=true"]):
        code, lines = cli(capsys, *run, *same)
        assert code == 0, lines
    assert sample_trees(output) == before


def test_redo_changed_replaces_only_the_changed_samples_and_old_folders_count_as_changed(tmp_path, capsys):
    output = tmp_path / "out"
    jobs = manifest(tmp_path / "jobs.jsonl", entry("a"), entry("b"))
    assert cli(capsys, *tiny(), *FAST, "--manifest", str(jobs), "--output", str(output))[0] == 0
    kept_b = tree(output / "b")
    changed = manifest(tmp_path / "changed.jsonl", entry("a", overrides={"sampling.num_steps": 3}), entry("b"))
    run = [*tiny(), *FAST, "--manifest", str(changed), "--output", str(output)]
    code, lines = cli(capsys, *run)
    assert code == 2 and one_error(lines).startswith(f"error: {output / 'a'} was made with sampling.num_steps=2, ")

    assert cli(capsys, *run, "--redo-changed")[0] == 0
    assert meta(output / "a")["fingerprint"]["settings"]["sampling.num_steps"] == 3
    assert tree(output / "b") == kept_b
    assert not [p.name for p in output.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    record = meta(output / "b")  # as an older LayerFlow wrote it: no fingerprint
    del record["fingerprint"]
    (output / "b" / "meta.json").write_text(json.dumps(record), encoding="utf-8")
    code, lines = cli(capsys, *run)
    assert code == 2
    assert one_error(lines) == (
        f"error: {output / 'b'} has no fingerprint in its meta.json (made by an older LayerFlow, or the "
        f"file is unreadable), so this run cannot tell whether it was made with the same settings{REDO_HINT}"
    )
    assert cli(capsys, *run, "--redo-changed")[0] == 0
    assert "fingerprint" in meta(output / "b")


def test_given_layers_are_kept_as_given_and_their_content_decides(tmp_path, capsys):
    clip = write_layered_clip(tmp_path / "inputs")
    (clip["fg_rgba"] / "notes.txt").write_text("not a frame")
    output = tmp_path / "out"
    jobs = manifest(
        tmp_path / "jobs.jsonl",
        entry("pngs", inputs={"fg": str(clip["fg_rgba"])}),
        entry("matted", inputs={"fg": str(clip["fg"]), "mask": str(clip["mask"])}),
    )
    assert cli(capsys, *tiny("fg2bg", "rgba"), *FAST, "--manifest", str(jobs), "--output", str(output))[0] == 0

    pngs = output / "pngs"
    frames = sorted(clip["fg_rgba"].glob("*.png"))
    kept = sorted((pngs / "given" / "fg" / "fg_rgba").iterdir())
    assert [p.name for p in kept] == [p.name for p in frames]  # the frames, nothing else of the folder
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(kept, frames, strict=True))
    assert meta(pngs)["given_layers"] == {
        "fg": {
            "as_given": "given/fg/fg_rgba",
            "content": meta(pngs)["fingerprint"]["settings"]["inputs.fg"],
            "as_model_input": ["given_foreground.mp4", "given_alpha.mp4"],
        }
    }
    assert (pngs / "given_foreground.mp4").is_file() and (pngs / "given_alpha.mp4").is_file()
    matted = output / "matted"
    for name in ("fg", "mask"):
        assert (matted / "given" / name / f"{name}.mp4").read_bytes() == clip[name].read_bytes()
    assert meta(matted)["given_layers"]["mask"]["as_given"] == "given/mask/mask.mp4"

    reuse = manifest(tmp_path / "reuse.jsonl", entry("reuse", inputs={"fg": str(pngs)}))
    assert cli(capsys, *tiny("fg2bg", "rgba"), *FAST, "--manifest", str(reuse), "--output", str(output))[0] == 0
    taken = sorted((pngs / "foreground_rgba").iterdir())
    again = sorted((output / "reuse" / "given" / "fg" / "foreground_rgba").iterdir())
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in taken]
    assert meta(output / "reuse")["given_sources"]["fg"]["file"] == "foreground_rgba"

    before = {name: tree(output / name) for name in ("pngs", "matted")}
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "inputs", moved)  # the same bytes elsewhere: still the same sample
    same = manifest(
        tmp_path / "same.jsonl",
        entry("pngs", inputs={"fg": str(moved / "fg_rgba")}),
        entry("matted", inputs={"fg": str(moved / "fg.mp4"), "mask": str(moved / "mask.mp4")}),
    )
    run = [*tiny("fg2bg", "rgba"), *FAST, "--manifest", str(same), "--output", str(output)]
    assert cli(capsys, *run)[0] == 0
    shutil.copyfile(clip["bg"], moved / "mask.mp4")  # another matte under the same name
    code, lines = cli(capsys, *run)
    assert code == 2
    assert one_error(lines).startswith(f"error: {output / 'matted'} was made with inputs.mask=sha256:")
    (moved / "mask.mp4").unlink()  # an input gone since: that input cannot be compared, the rest is
    code, lines = cli(capsys, *run)
    assert code == 0, lines
    assert any(line.startswith(f"warning: {output / 'matted'}: inputs.mask cannot be read now") for line in lines)
    assert {name: tree(output / name) for name in ("pngs", "matted")} == before


def test_frame_folder_hash_follows_content_and_order_not_names(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    for index, value in enumerate((10, 20, 30)):
        frame = np.full((4, 4, 3), value, np.uint8).tobytes()
        (first / f"{index:04d}.png").write_bytes(frame)
        (second / f"frame_{index}.png").write_bytes(frame)
    (second / "notes.txt").write_text("not a frame")
    hashes = ContentHashes()
    assert hashes.of(first) == hashes.of(second)
    assert hashes.of(first).startswith("sha256-frames:")
    (second / "frame_0.png").write_bytes(np.full((4, 4, 3), 11, np.uint8).tobytes())
    assert ContentHashes().of(first) != ContentHashes().of(second)
    (second / "frame_0.png").write_bytes((first / "0000.png").read_bytes())
    assert ContentHashes().of(first) == ContentHashes().of(second)
    (second / "frame_0.png").rename(second / "frame_9.png")  # the first frame last: another clip
    assert ContentHashes().of(first) != ContentHashes().of(second)


def test_first_difference_names_the_first_changed_setting():
    recorded = {"sampling.num_steps": 50, "prompts.fg": "a red balloon", "output.fps": 8}
    assert first_difference(recorded, dict(recorded)) is None
    assert first_difference(recorded, {**recorded, "prompts.fg": "a blue kite", "output.fps": 24}) == (
        'prompts.fg="a red balloon", this run has "a blue kite"'
    )
    assert first_difference(recorded, {**recorded, "inputs.bg": "sha256:00"}) == (
        "no inputs.bg (this run has sha256:00)"
    )
    assert first_difference({**recorded, "inputs.bg": "sha256:00"}, recorded) == (
        "inputs.bg=sha256:00, which this run does not have"
    )
    assert first_difference({**recorded, "inputs.bg": "sha256:00"}, recorded, unknown={"inputs.bg"}) is None
