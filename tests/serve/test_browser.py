"""The page of ``layerflow serve`` in a real browser: Debian's headless Chromium driven by Playwright.

One server (the tiny model, a small frame size, few steps) runs for the module; each test opens the
page in a fresh browser page, as a user would, and reads what the page shows. A failing test saves
a screenshot of the page to its pytest tmp folder and prints the path. Without ``/usr/bin/chromium``
or the ``playwright`` package the tests skip and say which is missing (CI installs both).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UPLOAD_LIMIT_MB = 1
STEPS = 8
# the first job (the gen/rgba run) pauses after its second step (LAYERFLOW_FAULT's pause mode), so the
# page's 300 ms poll sees the bar between empty and full however fast the machine runs the tiny model
PAUSE_AT = "0:0001-gen_rgba:1:pause"
START_TIMEOUT_S = 120
RUN_TIMEOUT_MS = 180_000
PROMPTS = {
    "fg": "a red balloon drifting slowly",
    "bg": "a calm lake with hills at sunrise",
    "blend": "a red balloon drifting over a calm lake with hills at sunrise",
}


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright Python package (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"the browser test drives Debian's Chromium, and {CHROMIUM} is absent (apt-get install chromium)")
    return sync_playwright


def _read_url(process: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The URL of the server's first stdout line; the rest of stdout is drained so that it never blocks."""
    lines: list[str] = []
    first = threading.Event()

    def drain() -> None:
        for line in process.stdout:
            lines.append(line)
            first.set()
        first.set()

    threading.Thread(target=drain, daemon=True).start()
    if not first.wait(timeout_s) or not lines:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"layerflow serve printed no URL within {timeout_s} s; its log:\n{log.read_text()}")
    match = re.fullmatch(r"layerflow serve: (http://\S+/)", lines[0].strip())
    assert match, f"the first stdout line should name the URL, got {lines[0]!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``layerflow serve --port 0`` on the tiny model: its URL and its output folder (its stderr: serve.log)."""
    output = tmp_path_factory.mktemp("serve-output")
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "layerflow.cli", "serve", "--port", "0", "--output", str(output)]
    command += ["--model", "tiny", "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat"), "LAYERFLOW_FAULT": PAUSE_AT}
    with open(log, "w") as errors:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        yield _read_url(process, log, START_TIMEOUT_S), output
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, tmp_path):
    """A fresh browser page; the test opens the server's page in it with :func:`opened`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    yield context.new_page()
    context.close()


@contextmanager
def opened(tab, url: str, screenshot: Path):
    """The page at ``url``, loaded and ready; a failure inside saves a screenshot and prints its path."""
    try:
        tab.goto(url)
        tab.wait_for_function("document.querySelector('#status').textContent === 'ready'", timeout=30_000)
        yield tab
    except BaseException:
        try:
            tab.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot of the page at the failure: {screenshot}")
        except Exception as error:  # the page may be gone; the original failure matters more
            print(f"no screenshot of the page: {error}")
        raise


def status_of(tab) -> tuple[str, str]:
    """The status line's text and class."""
    return tab.text_content("#status"), tab.get_attribute("#status", "class") or ""


def refusal(tab, action) -> str:
    """Do ``action``; the one-line error it puts in the status line."""
    tab.evaluate("document.querySelector('#status').className = ''")
    action()
    tab.wait_for_function("document.querySelector('#status').classList.contains('error')", timeout=30_000)
    text, _ = status_of(tab)
    assert text and "\n" not in text, f"the refusal should be one line: {text!r}"
    return text


def smallest_size(tab) -> str:
    sizes = tab.eval_on_selector_all("#size option", "options => options.map(o => o.value)")
    return min(sizes, key=lambda size: int(size.split("x")[0]) * int(size.split("x")[1]))


def fill_form(tab, task: str, variant: str, steps: int = STEPS) -> str:
    tab.select_option("#task", task)
    tab.select_option("#variant", variant)
    for layer, prompt in PROMPTS.items():
        box = tab.locator(f"#prompt-{layer}")
        if box.is_visible():
            box.fill(prompt)
    tab.fill("#steps", str(steps))
    size = smallest_size(tab)
    tab.select_option("#size", size)
    return size


def record_progress(tab) -> None:
    """Keep every value the progress bar takes, with the status line at that moment."""
    tab.evaluate(
        """() => {
            window.progressSeen = [];
            const bar = document.querySelector('#progress');
            new MutationObserver(() => window.progressSeen.push(
                [bar.value, bar.max, document.querySelector('#status').textContent]
            )).observe(bar, {attributes: true, attributeFilter: ['value', 'max']});
        }"""
    )


def wait_for_video(tab, selector: str) -> dict:
    """Wait until the <video> has its metadata (a frame size); its src and frame size."""
    tab.wait_for_function(
        "s => { const v = document.querySelector(s); return v && v.readyState >= 1 && v.videoWidth > 0; }",
        arg=selector,
        timeout=30_000,
    )
    return tab.eval_on_selector(selector, "v => ({src: v.src, width: v.videoWidth, height: v.videoHeight})")


def sample_folder(archive: zipfile.ZipFile) -> tuple[str, dict]:
    """The folder inside the zip that holds meta.json (``""`` at its top), and the parsed meta.json."""
    metas = [name for name in archive.namelist() if name == "meta.json" or name.endswith("/meta.json")]
    assert len(metas) == 1, f"one meta.json expected in the zip, found {metas}"
    return metas[0][: -len("meta.json")], json.loads(archive.read(metas[0]))


def check_zip(path: Path, width: int, height: int) -> dict:
    """A valid RGBA gen sample folder: meta.json, RGBA PNG frames of the videos' size, ProRes and WebM."""
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        prefix, meta = sample_folder(archive)
        names = [name[len(prefix) :] for name in archive.namelist() if name.startswith(prefix)]
        frames = sorted(name for name in names if re.fullmatch(r"foreground_rgba/\d+\.png", name))
        assert frames, f"no RGBA PNG frames in the zip: {names}"
        for name in frames:
            with Image.open(io.BytesIO(archive.read(prefix + name))) as image:
                assert image.format == "PNG" and image.mode == "RGBA" and image.size == (width, height), name
        assert "foreground.mov" in names and "foreground.webm" in names, names
        assert {"foreground.mp4", "background.mp4", "blend.mp4", "alpha.mp4"} <= set(names), names
    return meta


@pytest.mark.slow
def test_a_generation_shows_its_layers_and_downloads_its_sample_folder(page, server, tmp_path):
    """gen + rgba on the tiny model from the page: progress, every layer playable, the alpha views, the
    score the sample's meta.json holds, a compose over a colour, the zip download, and a second
    visitor's job shown queued behind it, then run."""
    with opened(page, server[0], tmp_path / "failure.png"):
        generate_and_check(page, tmp_path)


def wait_for_end(tab) -> None:
    tab.wait_for_function(
        "() => ['done', 'error'].some(c => document.querySelector('#status').classList.contains(c))",
        timeout=RUN_TIMEOUT_MS,
    )
    text, kind = status_of(tab)
    assert kind == "done", f"the run did not finish: {text}"
    assert tab.is_visible("#results")


def queue_behind(page):
    """A second visitor's job, posted while the first runs: its page shows it waits one job behind."""
    second = page.context.new_page()
    second.goto(page.url)
    second.wait_for_function("document.querySelector('#status').textContent === 'ready'", timeout=30_000)
    fill_form(second, "gen", "rgb", steps=4)
    second.click("#generate")
    second.wait_for_function("document.querySelector('#status').textContent.startsWith('queued')")
    assert status_of(second)[0] == "queued: 1 job ahead"
    return second


def generate_and_check(page, tmp_path: Path) -> None:
    size = fill_form(page, "gen", "rgba")
    record_progress(page)
    page.click("#generate")
    second = queue_behind(page)
    wait_for_end(page)

    seen = page.evaluate("window.progressSeen")
    running = [value for value, _, status in seen if status.startswith("running") and value > 0]
    assert running and min(running) < STEPS, f"the bar never stood between empty and full while running: {seen}"
    assert page.eval_on_selector("#progress", "bar => [bar.value, bar.max]") == [STEPS, STEPS]

    width, height = (int(side) for side in size.split("x"))
    for layer in ("fg", "bg", "blend", "alpha"):
        video = wait_for_video(page, f'#results video[data-layer="{layer}"]')
        assert video["src"] and (video["width"], video["height"]) == (width, height), (layer, video)
    checker = wait_for_video(page, "#fg-checker")
    assert checker["src"].endswith(".webm") and page.is_visible("#fg-checker")
    assert "linear-gradient" in page.eval_on_selector("#fg-checker", "v => getComputedStyle(v).backgroundImage")

    with page.expect_download() as download_info:
        page.click("#download-zip")
    download = download_info.value
    archive = tmp_path / download.suggested_filename
    download.save_as(archive)
    meta = check_zip(archive, width, height)
    assert (meta["task"], meta["variant"]) == ("gen", "rgba")
    assert [meta["prompts"][layer] for layer in PROMPTS] == list(PROMPTS.values())
    score = page.text_content("#score")
    assert f"SSIM {meta['scores']['ssim']:.3f}" in score, score
    assert f"PSNR {meta['scores']['psnr_db']:.2f} dB" in score, score

    page.fill("#bg-colour", "#ff8800")
    assert page.eval_on_selector("#fg-preview", "v => getComputedStyle(v).backgroundColor") == "rgb(255, 136, 0)"
    page.click("#compose")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('composed')", timeout=60_000)
    composed = wait_for_video(page, "video#composed")
    assert (composed["width"], composed["height"]) == (width, height)

    wait_for_end(second)  # the queued job ran once the first was done
    assert second.text_content("#result-title") != page.text_content("#result-title")


def test_a_refused_upload_or_field_shows_one_line(page, server, tmp_path):
    """For a conditioned task, a file of the wrong type, one over the size limit, a zip holding no PNG
    frames and a step count over the server's limit each show their one-line refusal on the page."""
    with opened(page, server[0], tmp_path / "failure.png"):
        refuse_and_check(page, server[0], tmp_path)


def server_refusal(url: str, path: Path) -> tuple[int, str]:
    """What the server itself answers to an upload of ``path``: the status and its one-line error."""
    request = urllib.request.Request(f"{url}api/uploads?filename={path.name}", data=path.read_bytes(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def refuse_and_check(page, url: str, tmp_path: Path) -> None:
    fill_form(page, "fg2bg", "rgba")
    assert page.is_visible("#given-file") and not page.is_visible("#results")

    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    assert "notes.txt" in refusal(page, lambda: page.set_input_files("#given-file", str(notes)))

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (UPLOAD_LIMIT_MB * 1024 * 1024 + 1))
    text = refusal(page, lambda: page.set_input_files("#given-file", str(big)))
    assert "big.png" in text and "limit" in text

    not_frames = tmp_path / "frames.zip"
    with zipfile.ZipFile(not_frames, "w") as archive:
        archive.writestr("readme.txt", "no frames here")
    shown = refusal(page, lambda: page.set_input_files("#given-file", str(not_frames)))
    code, error = server_refusal(url, not_frames)
    assert code == 415 and error in shown and "frames.zip" in shown, (code, error, shown)

    fill_form(page, "gen", "rgba")
    too_many = int(page.get_attribute("#steps", "max")) + 1
    page.fill("#steps", str(too_many))
    assert "steps" in refusal(page, lambda: page.click("#generate"))
    assert not page.is_visible("#results") and page.is_enabled("#generate")
