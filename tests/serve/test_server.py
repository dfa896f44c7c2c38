"""``layerflow serve`` over real HTTP: one in-process server with the tiny model for the module, on port 0.

The jobs run the real generation (tiny model, few steps, 96x64); the tests read what the page reads:
the task list, job states and progress, result files, the zip, compose, and the refusals.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from layerflow.batch.faults import FAULT_VARIABLE
from layerflow.io.reader import clip_length, probe_video, read_clip_frames
from layerflow.io.sample_files import META_FILE
from layerflow.serve.server import DEFAULT_HOST, ServeSettings, serve_in_thread, start
from layerflow.tasks import LAYOUTS

UPLOAD_LIMIT = 2 * 2**20
PROMPTS = {"fg": "a red balloon", "bg": "a calm lake", "blend": "a red balloon over a calm lake"}


class Served:
    def __init__(self, server, root: Path):
        self.server = server
        self.app = server.app
        self.url = server.url.rstrip("/")
        self.root = root
        self.output = server.app.output

    def call(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        """(status, parsed JSON or bytes, headers) of one request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, raw, got = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as error:
            status, raw, got = error.code, error.read(), error.headers
        if got.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(raw), got
        return status, raw, got

    def raw_get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        """A GET with the path sent exactly as written (urllib would normalise ``..``)."""
        connection = http.client.HTTPConnection(*self.server.server_address[:2], timeout=30)
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        result = answer.status, answer.read()
        connection.close()
        return result

    def upload(self, name: str, content: bytes):
        return self.call("POST", f"/api/uploads?filename={name}", content)

    def wait(self, job_id: str, seen: list | None = None, timeout: float = 120) -> dict:
        """Poll a job until it ends; ``seen`` gets every status read on the way."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, state, _ = self.call("GET", f"/api/jobs/{job_id}")
            assert status == 200, state
            if seen is not None:
                seen.append(state)
            if state["state"] in ("done", "failed"):
                return state
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} did not end within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cwd = root / "cwd"
    cwd.mkdir()
    previous = os.getcwd()
    os.chdir(cwd)  # anything written to the current folder would show there
    settings = ServeSettings(output=root / "out", port=0, tiny=True, max_upload_bytes=UPLOAD_LIMIT, queue_size=1)
    server = start(settings)
    thread = serve_in_thread(server)
    try:
        yield Served(server, root)
    finally:
        server.shutdown()
        server.server_close()
        server.app.close()
        thread.join(10)
        os.chdir(previous)


def png_bytes(mode: str, size=(96, 64)) -> bytes:
    """A foreground still: a disc of colour, transparent around it in RGBA."""
    width, height = size
    y, x = np.mgrid[:height, :width]
    inside = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (height / 3) ** 2
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 220, np.where(inside, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba if mode == "RGBA" else rgba[..., :3], mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(colour: tuple[int, int, int], size=(96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def uploads_kept(served: Served) -> set[str]:
    folder = served.output / "uploads"
    return set(os.listdir(folder)) if folder.is_dir() else set()


def test_the_tasks_list_every_layout_with_its_prompts_given_layers_defaults_and_limits(served):
    status, answer, _ = served.call("GET", "/api/tasks")
    assert status == 200
    assert [entry["name"] for entry in answer["tasks"]] == [layout.name for layout in LAYOUTS.values()]
    by_name = {entry["name"]: entry for entry in answer["tasks"]}
    assert by_name["seg_rgb"]["prompts"] == ["fg", "bg"] and by_name["gen_rgb"]["given"] == []
    assert by_name["fg2bg_rgba"]["given"] == [{"layer": "fg", "needs_alpha": True, "takes_mask": True}]
    assert answer["limits"]["upload_bytes"] == UPLOAD_LIMIT
    assert answer["defaults"]["size"] == answer["limits"]["sizes"][0] == "96x64"  # the tiny model's frame
    assert answer["model"] == "tiny"


def test_the_server_listens_on_loopback_by_default_and_answers_loopback_names_only(served):
    from layerflow.cli.serve import parse_args

    assert ServeSettings(output=Path("x")).host == DEFAULT_HOST == parse_args([]).host == "127.0.0.1"
    assert served.server.server_address[0] == "127.0.0.1"
    status, answer = served.raw_get("/api/tasks", {"Host": "attacker.example:80"})
    assert status == 403 and b"127.0.0.1" in answer
    status, answer, _ = served.call("POST", "/api/jobs", {"task": "gen"}, {"Origin": "http://attacker.example"})
    assert status == 403 and "Origin" in answer["error"]


def test_an_upload_over_the_limit_is_refused_with_413_and_one_line(served):
    before = uploads_kept(served)
    status, answer, _ = served.upload("big.png", b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT))
    assert status == 413
    assert "limit" in answer["error"] and "\n" not in answer["error"]
    assert uploads_kept(served) == before


def test_a_client_that_asks_first_hears_the_refusal_before_sending_the_upload(served):
    connection = http.client.HTTPConnection(*served.server.server_address[:2], timeout=30)
    connection.putrequest("POST", "/api/uploads?filename=big.mp4")
    connection.putheader("Content-Length", str(10 * UPLOAD_LIMIT))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()  # and no body
    answer = connection.getresponse()
    assert answer.status == 413 and "limit" in json.loads(answer.read())["error"]
    connection.close()


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("notes.txt", b"hello", ".txt is not accepted"),
        ("clip.mp4", png_bytes("RGB"), "not MP4"),  # a PNG named as a video
        ("frame.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "not a readable image"),
        ("frames.zip", zip_bytes({"../escape.png": png_bytes("RGBA")}), "outside the zip"),
        ("frames.zip", zip_bytes({"0000.png": png_bytes("RGBA"), "run.sh": b"echo"}), "PNG frames only"),
        ("frames.zip", zip_bytes({"0000.png": b"\x89PNG\r\n\x1a\nnot really"}), "not a readable image"),
    ],
)
def test_an_upload_of_the_wrong_type_or_content_is_refused_with_415_and_one_line(served, name, content, said):
    before = uploads_kept(served)
    status, answer, _ = served.upload(name, content)
    assert status == 415, answer
    assert said in answer["error"] and "\n" not in answer["error"]
    assert uploads_kept(served) == before  # nothing kept, not even a temporary folder
    assert not (served.root / "escape.png").exists() and not (served.output / "escape.png").exists()


def test_a_zip_of_png_frames_becomes_a_frame_folder(served):
    frames = {f"clip/{i:04d}.png": png_bytes("RGBA") for i in range(3)}
    status, answer, _ = served.upload("clip.zip", zip_bytes(frames))
    assert status == 201, answer
    assert (answer["kind"], answer["frames"], answer["alpha"]) == ("frames_zip", 3, True)
    folder = served.output / "uploads" / answer["upload"] / "frames"
    assert sorted(os.listdir(folder)) == ["0000.png", "0001.png", "0002.png"]


def test_a_video_upload_is_read_for_its_frames_and_alpha(served, tmp_path):
    from layerflow.io.writer import write_alpha_video, write_mp4

    frames = np.zeros((5, 64, 96, 4), np.uint8)
    frames[..., 0], frames[..., 3] = 200, 128
    for name, write, alpha in (
        ("clip.mp4", lambda path: write_mp4(path, frames[..., :3]), False),
        ("clip.webm", lambda path: write_alpha_video(path, frames, codec="vp9"), True),
    ):
        write(tmp_path / name)
        status, answer, _ = served.upload(name, (tmp_path / name).read_bytes())
        assert status == 201, answer
        assert (answer["kind"], answer["frames"], answer["alpha"]) == ("video", 5, alpha)


def test_a_job_with_a_bad_field_is_refused_with_400_naming_it(served):
    job = {"task": "gen", "variant": "rgba", "prompts": PROMPTS, "steps": 1}
    status, answer, _ = served.call("POST", "/api/jobs", job)
    assert status == 400 and answer["error"].startswith("steps:")
    status, answer, _ = served.call("POST", "/api/jobs", {**job, "steps": 2, "prompts": {"fg": "x", "bg": "y"}})
    assert status == 400 and answer["error"].startswith("prompts.blend:")
    status, rgb, _ = served.upload("plain.png", png_bytes("RGB"))
    assert status == 201 and rgb["alpha"] is False
    conditioned = {"task": "fg2bg", "variant": "rgba", "prompts": PROMPTS, "given": {"fg": rgb["upload"]}}
    status, answer, _ = served.call("POST", "/api/jobs", conditioned)
    assert status == 400 and "alpha" in answer["error"], answer  # found before the job is queued
    status, answer, _ = served.call("POST", "/api/jobs", {**conditioned, "given": {}})
    assert status == 400 and answer["error"].startswith("given.fg:")


def test_files_outside_the_output_folder_hidden_files_and_links_are_not_served(served, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    (served.output / "samples").mkdir(exist_ok=True)
    link = served.output / "samples" / "link.txt"
    link.symlink_to(secret)
    try:
        for path in (
            "/files/../" + os.path.relpath(secret, served.output),
            "/files/samples/%2e%2e/%2e%2e/" + secret.name,
            "/files/" + str(secret),
            "/files/samples/link.txt",
            "/files/samples/.layerflow.lock",
            "/static/../server.py",
        ):
            status, answer = served.raw_get(path)
            assert status == 404, path
            assert b"not for the page" not in answer
    finally:
        link.unlink()


@pytest.mark.slow
def test_jobs_queue_run_one_at_a_time_and_give_the_layers_zip_score_and_compose(served):
    status, rgba, _ = served.upload("balloon.png", png_bytes("RGBA"))
    assert status == 201 and (rgba["kind"], rgba["alpha"]) == ("image", True)
    first = {"task": "gen", "variant": "rgba", "prompts": PROMPTS, "seed": 3, "steps": 12}
    second = {"task": "fg2bg", "variant": "rgba", "prompts": PROMPTS, "given": {"fg": rgba["upload"]}, "steps": 2}
    status, a, _ = served.call("POST", "/api/jobs", first)
    assert status == 202
    status, b, _ = served.call("POST", "/api/jobs", second)
    assert status == 202 and b["position"] == 1
    status, full, _ = served.call("POST", "/api/jobs", first)
    assert status == 429 and "queue" in full["error"]  # queue_size 1: one job may wait

    pairs = []  # (a, b): b read just before a, so a running then was running when b was read
    while not pairs or pairs[-1][0]["state"] not in ("done", "failed"):
        state_b = served.call("GET", f"/api/jobs/{b['job']}")[1]
        pairs.append((served.call("GET", f"/api/jobs/{a['job']}")[1], state_b))
        time.sleep(0.02)
    done_a = pairs[-1][0]
    assert done_a["state"] == "done", done_a
    while_a_ran = [state_b for state_a, state_b in pairs if state_a["state"] == "running"]
    assert while_a_ran and all((s["state"], s["position"]) == ("queued", 1) for s in while_a_ran), while_a_ran
    steps = [state_a["step"] for state_a, _ in pairs if state_a["state"] == "running" and state_a["stage"] == "denoise"]
    assert steps == sorted(steps) and len(set(steps)) >= 2, steps
    assert done_a["step"] == done_a["steps"] == 12
    assert {state_a["stage"] for state_a, _ in pairs} >= {"denoise", "vae_decode"}
    done_b = served.wait(b["job"])
    assert done_b["state"] == "done", done_b
    assert served.app.generator.cache.kept() == [("gen_rgba", (64, 96)), ("fg2bg_rgba", (64, 96))]  # loaded still
    check_result_files(served, done_a["result"])
    check_zip(served, a["job"])
    check_compose(served, a["job"])
    check_given_layer(served, done_b["result"], b["job"], png_bytes("RGBA"))


def check_result_files(served: Served, result: dict) -> None:
    assert set(result["layers"]) == {"fg", "bg", "blend"}
    for url, kind in [*((u, "video/mp4") for u in result["layers"].values()), (result["alpha"], "video/mp4")]:
        status, content, headers = served.call("GET", url)
        assert status == 200 and headers["Content-Type"] == kind and content[4:8] == b"ftyp"
    status, part, headers = served.call("GET", result["fg_alpha"], headers={"Range": "bytes=4-19"})
    assert status == 206 and len(part) == 16 and headers["Content-Type"] == "video/webm"
    whole = (served.output / result["fg_alpha"][len("/files/") :]).read_bytes()
    assert part == whole[4:20] and headers["Content-Range"] == f"bytes 4-19/{len(whole)}"
    status, meta, _ = served.call("GET", result["meta"])
    assert status == 200 and result["score"] == meta["scores"] and "psnr_db" in result["score"]


def check_zip(served: Served, job_id: str) -> None:
    status, content, headers = served.call("GET", f"/api/jobs/{job_id}/zip")
    assert status == 200 and headers["Content-Type"] == "application/zip"
    assert headers["Content-Disposition"] == f'attachment; filename="{job_id}.zip"'
    unpacked = served.root / "unzipped"
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        archive.extractall(unpacked)
    folder = unpacked / job_id
    meta = json.loads((folder / META_FILE).read_text())
    assert (meta["id"], meta["task"], meta["variant"], meta["seed"]) == (job_id, "gen", "rgba", 3)
    assert meta["fingerprint"]["settings"]["sampling.num_steps"] == 12
    frames = sorted((folder / "foreground_rgba").iterdir())
    assert len(frames) == 16 and Image.open(frames[0]).mode == "RGBA"
    prores, webm = probe_video(folder / "foreground.mov"), probe_video(folder / "foreground.webm")
    assert (prores.codec, prores.has_alpha) == ("prores", True)
    assert (webm.codec, webm.has_alpha) == ("vp9", True)
    decoded = read_clip_frames(folder / "foreground.webm")  # (t, h, w, 4), the alpha kept
    png = np.asarray(Image.open(frames[0]))
    assert decoded.shape[-1] == 4 and np.abs(decoded[0, ..., 3].astype(int) - png[..., 3]).max() <= 8


def check_compose(served: Served, job_id: str) -> None:
    status, answer, _ = served.call("POST", f"/api/jobs/{job_id}/compose", {"colour": "#2050a0"})
    assert status == 200, answer
    video = served.output / answer["video"][len("/files/") :]
    assert clip_length(video)[0] == 16
    folder = video.parent
    rgba = np.asarray(Image.open(served.output / "samples" / job_id / "foreground_rgba" / "0000.png")).astype(float)
    check_blend(read_clip_frames(video)[0], rgba, np.array([0x20, 0x50, 0xA0], float))
    assert json.loads((folder / META_FILE).read_text())["given_sources"]["bg"] == {"colour": "#2050a0"}
    status, answer, _ = served.call("POST", f"/api/jobs/{job_id}/compose", {"colour": "blue"})
    assert status == 400 and answer["error"].startswith("colour:")
    status, lake, _ = served.upload("lake.jpg", jpeg_bytes((30, 140, 60)))
    assert status == 201 and lake["kind"] == "image"
    status, answer, _ = served.call("POST", f"/api/jobs/{job_id}/compose", {"background": lake["upload"]})
    assert status == 200, answer
    still = np.asarray(Image.open(io.BytesIO(jpeg_bytes((30, 140, 60))))).astype(float)
    check_blend(read_clip_frames(served.output / answer["video"][len("/files/") :])[0], rgba, still)


def check_blend(decoded: np.ndarray, rgba: np.ndarray, backdrop: np.ndarray) -> None:
    """The composed frame is the foreground over ``backdrop`` by its alpha, not the backdrop: compared in luma
    (BT.709 weights), as the 4:2:0 H.264 file keeps colour at half resolution (the tiny model's frames are noise)."""
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + backdrop * (1 - alpha)  # (h, w, 3)
    luma = np.array([0.2126, 0.7152, 0.0722])
    error = np.abs(decoded @ luma - expected @ luma).mean()
    unlike = np.abs(decoded @ luma - np.broadcast_to(backdrop, expected.shape) @ luma).mean()
    assert error < 10 and unlike > 3 * error, (error, unlike)


def check_given_layer(served: Served, result: dict, job_id: str, uploaded: bytes) -> None:
    assert set(result["given"]) == {"fg", "alpha"}
    folder = served.output / "samples" / job_id
    kept = folder / "given" / "fg" / "balloon.png"
    assert kept.read_bytes() == uploaded  # the upload as it was given
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["given_layers"]["fg"]["as_given"] == "given/fg/balloon.png"


@pytest.mark.slow
def test_a_failing_job_ends_failed_with_one_line_and_leaves_no_folder(served, monkeypatch):
    from layerflow.tasks import get_layout

    job_id = served.app.jobs.next_id(get_layout("gen", "rgb"))
    monkeypatch.setenv(FAULT_VARIABLE, f"0:{job_id}:1")
    status, answer, _ = served.call("POST", "/api/jobs", {"task": "gen", "variant": "rgb", "prompts": PROMPTS})
    assert status == 202 and answer["job"] == job_id
    state = served.wait(job_id)
    assert state["state"] == "failed" and state["result"] is None
    assert "injected fault" in state["error"] and "\n" not in state["error"]
    samples = served.output / "samples"
    assert not any(name.startswith((job_id, f".{job_id}")) for name in os.listdir(samples))
    status, answer, _ = served.call("GET", f"/api/jobs/{job_id}/zip")
    assert status == 409


def test_nothing_is_written_outside_the_output_folder(served):
    assert os.listdir(served.root / "cwd") == []
    assert set(os.listdir(served.root)) <= {"cwd", "out", "unzipped"}  # unzipped: the test's own copy
    assert set(os.listdir(served.output)) <= {"uploads", "samples", "composes", "zips"}


@pytest.mark.slow
def test_the_command_prints_its_address_once_and_sigterm_stops_it_without_leaving_a_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat")}
    command = [sys.executable, "-m", "layerflow.cli", "serve", "--port", "0", "--output", str(tmp_path / "out")]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("layerflow serve: http://127.0.0.1:") and line.endswith("/\n"), line
        url = line.split(": ", 1)[1].strip()
        job = {"task": "gen", "variant": "rgb", "prompts": PROMPTS, "steps": 200}
        for _ in range(2):  # one runs, one waits
            request = urllib.request.Request(url + "api/jobs", data=json.dumps(job).encode(), method="POST")
            with urllib.request.urlopen(request, timeout=30) as answer:
                job_id = json.loads(answer.read())["job"]
        first = f"{int(job_id[:4]) - 1:04d}{job_id[4:]}"
        while True:
            with urllib.request.urlopen(f"{url}api/jobs/{first}", timeout=30) as answer:
                state = json.loads(answer.read())
            if state["stage"] == "denoise" or state["state"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert state["state"] == "running", state
        process.terminate()  # SIGTERM while the first job denoises
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert out == "" and err.strip().splitlines()[-1].startswith("layerflow serve: stopped"), err
    assert sorted(os.listdir(tmp_path)) == ["out"]
    samples = tmp_path / "out" / "samples"
    assert not [name for name in os.listdir(samples) if "gen_rgb" in name]  # neither job, nor a temporary folder


def test_a_bad_size_option_is_one_line_and_exit_status_2(capsys):
    from layerflow.cli.command import main

    assert main(["serve", "--size", "100x64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiples of 16" in err


def test_a_second_server_on_the_same_output_folder_is_refused_with_one_line(served):
    from layerflow.io.output_folder import OutputFolderError

    with pytest.raises(OutputFolderError, match="in use by another run") as refused:
        start(ServeSettings(output=served.output, port=0, tiny=True))
    assert "\n" not in str(refused.value)


def test_an_output_path_that_is_a_file_is_one_line_and_exit_status_2(tmp_path, capsys):
    from layerflow.cli.command import main

    (tmp_path / "taken").write_text("a file")
    assert main(["serve", "--model", "tiny", "--port", "0", "--output", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("layerflow serve: error:") and "taken" in err


def test_a_new_server_removes_what_a_killed_one_left_half_written(tmp_path):
    from layerflow.io.output_folder import write_marker

    output = tmp_path / "out"
    upload = output / "uploads" / ".0123456789abcdef.tmp-0badcafe"
    upload.mkdir(parents=True)
    (upload / "half.mp4").write_bytes(b"\x00" * 100)
    sample = output / "samples" / ".0007-gen_rgb.tmp-1234abcd"
    sample.mkdir(parents=True)
    write_marker(sample, "0007-gen_rgb")
    (sample / "foreground.mp4").write_bytes(b"\x00" * 100)
    server = start(ServeSettings(output=output, port=0, tiny=True))
    try:
        assert not upload.exists() and not sample.exists()
        assert server.app.jobs.next_id(LAYOUTS[next(iter(LAYOUTS))]).startswith("0001-")
    finally:
        server.server_close()
        server.app.close()
