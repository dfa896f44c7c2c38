"""Screenshots of the page of ``layerflow serve`` for docs/serve/, taken in Debian's headless Chromium.

    python scripts/serve_screenshots.py                 # starts `layerflow serve` (tiny model without weights)
    python scripts/serve_screenshots.py --url http://127.0.0.1:7860/   # a server already running (real weights)

Writes ``form.png`` (a conditioned task's form, with its given-layer upload), ``running.png`` (the form
while a run denoises), ``result.png`` (a finished gen/rgba result: the layers, the foreground over a
checkerboard and composed over a colour, the score), ``result_fg2bg.png`` (fg2bg/rgba from an uploaded
zip of RGBA frames: the given layer beside the generated ones) and ``error.png`` (an upload refused in the status
line: a zip without PNG frames) to ``--out`` (default docs/serve/). Needs the playwright package and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 860}
PROMPTS = {
    "fg": "a red balloon drifting slowly",
    "bg": "a calm lake with hills at sunrise",
    "blend": "a red balloon drifting over a calm lake with hills at sunrise",
}
PNG_COLOURS = 256  # a palette keeps each screenshot small enough to commit


@contextmanager
def served(url: str | None):
    """The URL of the server to photograph: ``url`` as given, or a `layerflow serve` started for the run."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="layerflow-serve-") as output:
        command = [sys.executable, "-m", "layerflow.cli", "serve", "--model", "tiny", "--port", "0", "--output", output]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat")}
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            line = process.stdout.readline().strip()
            threading.Thread(target=process.stdout.read, daemon=True).start()  # never let its stdout fill up
            match = re.fullmatch(r"layerflow serve: (http://\S+/)", line)
            if not match:
                raise SystemExit(f"error: layerflow serve did not print its URL (got {line!r})")
            yield match.group(1)
        finally:
            process.terminate()
            process.wait(timeout=30)


def save(image_path: Path, png: bytes) -> None:
    """The screenshot as a palette PNG (the page is flat colours; the videos' frames lose little)."""
    temporary = image_path.with_suffix(".tmp.png")
    temporary.write_bytes(png)
    with Image.open(temporary) as image:
        image.convert("RGB").quantize(PNG_COLOURS).save(image_path, optimize=True)
    temporary.unlink()
    print(f"{image_path} ({image_path.stat().st_size // 1024} KB)")


def fill(page, task: str, variant: str, steps: int) -> None:
    page.select_option("#task", task)
    page.select_option("#variant", variant)
    for layer, prompt in PROMPTS.items():
        box = page.locator(f"#prompt-{layer}")
        if box.is_visible():
            box.fill(prompt)
    page.fill("#steps", str(steps))
    page.locator("#steps").blur()


def wait_for_status(page, pattern: str, timeout_ms: int = 300_000) -> None:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#status').textContent)", arg=pattern, timeout=timeout_ms
    )


def shoot_form(page, out: Path, steps: int) -> None:
    fill(page, "fg2bg", "rgba", steps)
    save(out / "form.png", page.screenshot(full_page=True))


def shoot_error(page, out: Path, sample: Path) -> None:
    page.set_input_files("#given-file", str(sample))
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    save(out / "error.png", page.locator("#form").screenshot())


def shoot_run(page, out: Path, steps: int) -> None:
    fill(page, "gen", "rgba", steps)
    page.click("#generate")
    wait_for_status(page, r"step [1-9]")
    save(out / "running.png", page.locator("#form").screenshot())
    wait_for_status(page, "^(done|error)|failed")
    page.fill("#bg-colour", "#3a7bd5")
    page.click("#compose")
    wait_for_status(page, "^composed|error")
    page.click("#play-all")
    page.mouse.move(0, 0)
    page.wait_for_timeout(3500)
    save(out / "result.png", page.screenshot(full_page=True))


def shoot_conditioned(page, out: Path, steps: int, tmp: Path) -> None:
    """fg2bg/rgba from the synthetic clip's RGBA foreground (the demo's), uploaded as a zip of PNG frames."""
    sys.path.insert(0, str(REPO_ROOT / "sat"))
    from layerflow.io.synthetic import write_layered_clip

    frames = write_layered_clip(tmp / "clip")["fg_rgba"]
    archive = tmp / "balloon_rgba.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for frame in sorted(frames.iterdir()):
            zipped.write(frame, frame.name)
    fill(page, "fg2bg", "rgba", steps)
    page.set_input_files("#given-file", str(archive))
    wait_for_status(page, "^uploaded|error")
    page.click("#generate")
    wait_for_status(page, "^(done|error)|failed")
    page.mouse.move(0, 0)
    page.wait_for_timeout(3500)
    save(out / "result_fg2bg.png", page.screenshot(full_page=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running layerflow serve (default: start one on the tiny model)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "serve", help="where the PNGs go")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of the photographed run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with served(args.url) as url, sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        wait_for_status(page, "^ready$", 30_000)
        shoot_form(page, args.out, args.steps)
        not_frames = Path(tmp) / "dancer_frames.zip"
        with zipfile.ZipFile(not_frames, "w") as archive:
            archive.writestr("notes.txt", "the frames are elsewhere")
        shoot_error(page, args.out, not_frames)
        page.reload()
        wait_for_status(page, "^ready$", 30_000)
        shoot_run(page, args.out, args.steps)
        shoot_conditioned(page, args.out, args.steps, Path(tmp))
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
