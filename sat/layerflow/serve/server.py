"""The HTTP server of ``layerflow serve``: the routes of the API, the page's static files, the output's files.

:class:`ServeApp` owns what a server holds (the output folder's lock, the uploads, the job queue,
the results); :class:`Handler` maps requests onto it; :func:`start` binds the socket. The API
(``/work/SERVE_API.md``, README "Web page"): every body is JSON, every error ``{"error": "<one
line>"}`` with a 4xx or 5xx status.

Safety: the server binds 127.0.0.1 unless told otherwise, and then answers only requests addressed
to a loopback name (a page elsewhere cannot reach it by pointing its own domain name at 127.0.0.1)
and refuses a POST sent from another origin. Uploads are checked for size before a byte is read.
Every file written is below the output folder, every file sent is a plain file below it (or a
page file), found without following links.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from layerflow.io.output_folder import OutputFolder
from layerflow.serve.catalog import MAX_STEPS, check_sizes, choose_model, default_sizes, format_size
from layerflow.serve.files import byte_range, confined, content_type, open_confined
from layerflow.serve.generation import Generator, PipelineCache
from layerflow.serve.job_body import BadField, Defaults, read_job
from layerflow.serve.jobs import JobQueue, JobState, QueueFull
from layerflow.serve.results import COLOUR, ResultError, Results, describe
from layerflow.serve.uploads import UPLOAD_TYPES, UploadRefused, UploadStore, UploadTooLarge, remove_upload_leftovers
from layerflow.tasks import LAYOUTS

log = logging.getLogger("layerflow.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_UPLOAD_MB = 200
MAX_JSON_BYTES = 64 * 1024
DRAIN_BYTES = 64 * 2**20  # of a refused upload, read and dropped so that the client hears the refusal
_JOB_ID = r"\d{4,}-[a-z0-9]+_[a-z]+"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ServeSettings:
    """The options of ``layerflow serve`` (``tiny`` None: the tiny model when no weights are present;
    ``sizes`` empty: the config's size, and twice it for the tiny model; ``cached_models`` 0: all eight
    tasks for the tiny model, one otherwise)."""

    output: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    tiny: bool | None = None
    max_upload_bytes: int = DEFAULT_UPLOAD_MB * 2**20
    queue_size: int = 8
    sizes: tuple[tuple[int, int], ...] = ()
    max_steps: int = MAX_STEPS
    cached_models: int = 0


class Refusal(Exception):
    """An answer other than success: an HTTP status and one line."""

    def __init__(self, status: int, line: str):
        super().__init__(line)
        self.status = status
        self.line = line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """A ``Host`` header without its port: ``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


def _first_job_number(output: Path) -> int:
    """One more than the highest job number found in the output folder: a new job's id was never used there,
    so no zip or compose of an older job (whose folder was deleted since) is taken for its own."""
    numbers = [0]
    for folder in ("samples", "zips", "composes"):
        if (output / folder).is_dir():
            numbers += [int(m.group(1)) for name in os.listdir(output / folder) if (m := re.match(r"^(\d{4,})-", name))]
    return max(numbers) + 1


class ServeApp:
    """What one server holds. Takes the lock of ``OUTPUT/samples`` (one server per output folder) and
    removes what a killed server left half-written there; the model is chosen and the worker started."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.output = Path(settings.output).absolute()
        self.samples = self.output / "samples"
        self.model = choose_model(settings.configs, settings.overrides, settings.tiny)
        self.sizes = settings.sizes or default_sizes(self.model)
        check_sizes(self.model, self.sizes)
        self.folder = OutputFolder(self.samples).acquire()
        self.folder.clean_stale()
        remove_upload_leftovers(self.output / "uploads")
        self.uploads = UploadStore(self.output / "uploads", settings.max_upload_bytes, self.output, self.sizes[0])
        self.results = Results(self.output)
        config = self.model.config(next(iter(LAYOUTS.values())))
        self.defaults = Defaults(
            seed=config.sampling.seed,
            steps=min(config.sampling.num_steps, settings.max_steps),
            guidance=config.sampling.guidance_scale,
            sizes=self.sizes,
            max_steps=settings.max_steps,
        )
        cached = settings.cached_models or (len(LAYOUTS) if self.model.tiny else 1)
        self.generator = Generator(self.model, self.samples, PipelineCache(cached))
        self.jobs = JobQueue(self.generator, settings.queue_size, _first_job_number(self.output))
        self.jobs.start()

    def close(self) -> None:
        """Drop the queued jobs, stop the running one (its folder is not kept) and release the lock."""
        self.jobs.stop()
        self.folder.release()

    # -- answers ---------------------------------------------------------------------------------

    def tasks(self) -> dict:
        entries = [
            {
                "task": layout.task.value,
                "variant": layout.variant.value,
                "name": layout.name,
                "prompts": list(layout.prompt_layers),
                "given": [
                    {"layer": g.layer, "needs_alpha": g.needs_alpha, "takes_mask": g.takes_mask}
                    for g in layout.given_inputs
                ],
                "layers": list(layout.video_layers),
            }
            for layout in LAYOUTS.values()
        ]
        defaults = self.defaults
        return {
            "tasks": entries,
            "model": "tiny" if self.model.tiny else "checkpoint",
            "defaults": {
                "seed": defaults.seed,
                "steps": defaults.steps,
                "guidance": defaults.guidance,
                "size": format_size(self.sizes[0]),
            },
            "limits": {
                "upload_bytes": self.settings.max_upload_bytes,
                "max_steps": defaults.max_steps,
                "sizes": [format_size(size) for size in self.sizes],
                "upload_types": list(UPLOAD_TYPES),
                "queue_size": self.settings.queue_size,
            },
        }

    def submit(self, body: object) -> dict:
        try:
            request = read_job(body, self.defaults, self.uploads)
        except BadField as error:
            raise Refusal(HTTPStatus.BAD_REQUEST, str(error)) from None
        problem = self.generator.check(self.jobs.next_id(request.layout), request)
        if problem is not None:  # named by its place in the output folder, as the page knows it
            raise Refusal(HTTPStatus.BAD_REQUEST, f"given: {problem.replace(f'{self.output}/', '')}")
        try:
            job = self.jobs.submit(request)
        except QueueFull as error:
            raise Refusal(HTTPStatus.TOO_MANY_REQUESTS, str(error)) from None
        return {"job": job.id, "position": self.jobs.snapshot(job)[1]}

    def job_status(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        folder = self.results.folder(job_id)
        if job is None:
            if folder is None:
                raise Refusal(HTTPStatus.NOT_FOUND, f"no job {job_id}")
            status = {"job": job_id, "state": JobState.DONE.value, "position": 0, "stage": None, "step": 0, "steps": 0}
            return {**status, "error": None, "result": describe(self.output, folder)}
        job, position = self.jobs.snapshot(job)
        done = job.state is JobState.DONE and folder is not None
        return {
            "job": job.id,
            "task": job.request.layout.task.value,
            "variant": job.request.layout.variant.value,
            "state": job.state.value,
            "position": position,
            "stage": job.stage,
            "step": job.step,
            "steps": job.steps,
            "error": job.error,
            "seconds": job.seconds,
            "result": describe(self.output, folder) if done else None,
        }

    def finished_folder(self, job_id: str) -> Path:
        folder = self.results.folder(job_id)
        if folder is None:
            known = self.jobs.get(job_id) is not None
            raise Refusal(HTTPStatus.NOT_FOUND if not known else HTTPStatus.CONFLICT, f"job {job_id} has no result")
        return folder

    def compose(self, job_id: str, body: object) -> dict:
        folder = self.finished_folder(job_id)
        if not isinstance(body, dict) or len(set(body) & {"colour", "background"}) != 1 or len(body) != 1:
            raise Refusal(HTTPStatus.BAD_REQUEST, 'expected {"colour": "#rrggbb"} or {"background": "<upload id>"}')
        if "colour" in body:
            colour = body["colour"]
            if not isinstance(colour, str) or not COLOUR.match(colour):
                raise Refusal(HTTPStatus.BAD_REQUEST, f"colour: expected #rrggbb, got {colour!r}")
            background, name = colour.lower(), colour[1:].lower()
        else:
            upload = self.uploads.get(body["background"])
            if upload is None:
                raise Refusal(HTTPStatus.BAD_REQUEST, f"background: no upload {body['background']!r}")
            background, name = str(upload.path), f"bg-{upload.id}"
        try:
            video = self.results.compose_over(folder, background, name)
        except (ResultError, ValueError, OSError) as error:
            raise Refusal(HTTPStatus.BAD_REQUEST, str(error).splitlines()[0]) from None
        return {"video": "/files/" + video.relative_to(self.output).as_posix()}


class LayerFlowHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: ServeApp):
        self.app = app
        self.check_host = is_loopback(address[0])
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: LayerFlowHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "layerflow-serve"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- methods ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_HEAD(self) -> None:
        self._answer(lambda path: self._get(path, head=True))

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        path = urlsplit(self.path).path
        try:
            self._check_origin()
            route(path)
        except Refusal as refusal:
            self._error(refusal.status, refusal.line)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            log.exception("internal error answering %s %s", self.command, path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(error).__name__}: {error})")

    def _check_origin(self) -> None:
        """A loopback server answers loopback names only; a POST from a page of another origin is refused."""
        host = self.headers.get("Host", "")
        if self.server.check_host and host_name(host) not in _LOOPBACK_NAMES:
            raise Refusal(HTTPStatus.FORBIDDEN, f"Host {host!r}: this server answers requests to 127.0.0.1 only")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin and urlsplit(origin).netloc != host:
            raise Refusal(HTTPStatus.FORBIDDEN, f"Origin {origin!r}: requests from other sites are refused")

    # -- routes ----------------------------------------------------------------------------------

    def _get(self, path: str, head: bool = False) -> None:
        app = self.server.app
        if path == "/":
            return self._send_file(self._static("index.html"), head)
        if path.startswith("/static/"):
            return self._send_file(self._static(path[len("/static/") :]), head)
        if path.startswith("/files/"):
            file = confined(app.output, path[len("/files/") :])
            if file is None:
                raise Refusal(HTTPStatus.NOT_FOUND, "no such file in the output folder")
            return self._send_file(file, head)
        if path == "/api/tasks":
            return self._json(HTTPStatus.OK, app.tasks())
        if match := re.fullmatch(rf"/api/jobs/({_JOB_ID})", path):
            return self._json(HTTPStatus.OK, app.job_status(match.group(1)))
        if match := re.fullmatch(rf"/api/jobs/({_JOB_ID})/zip", path):
            archive = app.results.zip_of(app.finished_folder(match.group(1)))
            disposition = f'attachment; filename="{match.group(1)}.zip"'
            return self._send_file(archive, head, {"Content-Disposition": disposition})
        raise Refusal(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _post(self, path: str) -> None:
        app = self.server.app
        if path == "/api/uploads":
            return self._upload()
        if path == "/api/jobs":
            return self._json(HTTPStatus.ACCEPTED, app.submit(self._read_json()))
        if match := re.fullmatch(rf"/api/jobs/({_JOB_ID})/compose", path):
            return self._json(HTTPStatus.OK, app.compose(match.group(1), self._read_json()))
        raise Refusal(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")

    def handle_expect_100(self) -> bool:
        """A client that asks first (``Expect: 100-continue``, as curl does) hears of a refusal before sending."""
        if self.command == "POST" and urlsplit(self.path).path == "/api/uploads":
            try:
                self._check_upload_request()
            except Refusal as refusal:
                self.close_connection = True
                self._error(refusal.status, refusal.line)
                return False
        return super().handle_expect_100()

    def _check_upload_request(self) -> tuple[str, int | None]:
        """The upload's name and length, checked before a byte of it is read (:class:`Refusal` 413 or 415)."""
        filename = (parse_qs(urlsplit(self.path).query).get("filename") or [""])[0]
        length = self._length()
        try:
            self.server.app.uploads.check_request(filename, length)
        except (UploadTooLarge, UploadRefused) as error:
            too_large = isinstance(error, UploadTooLarge)
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if too_large else HTTPStatus.UNSUPPORTED_MEDIA_TYPE
            raise Refusal(status, str(error)) from None
        return filename, length

    def _upload(self) -> None:
        store = self.server.app.uploads
        try:
            filename, length = self._check_upload_request()
        except Refusal:
            self._drain(self._length())
            raise
        try:
            upload = store.receive(filename, self.rfile, length)
        except UploadRefused as error:
            raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(error)) from None
        self._json(HTTPStatus.CREATED, upload.as_json())

    # -- reading and writing ---------------------------------------------------------------------

    def _length(self) -> int | None:
        text = self.headers.get("Content-Length")
        if text is None or not text.strip().isdigit():
            return None
        return int(text)

    def _drain(self, length: int | None) -> None:
        """Read and drop what is left of a refused body, up to :data:`DRAIN_BYTES`; beyond that, hang up."""
        self.close_connection = True
        left = min(length or 0, DRAIN_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(_CHUNK, left)) if hasattr(self.rfile, "read1") else b""
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_json(self) -> object:
        length = self._length()
        if length is None:
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length")
        if length > MAX_JSON_BYTES:
            self._drain(length)
            raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a JSON body is at most {MAX_JSON_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(length).decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({error})") from None

    def _static(self, name: str) -> Path:
        file = STATIC / name
        if not _STATIC_NAME.match(name) or not file.is_file():
            raise Refusal(HTTPStatus.NOT_FOUND, f"no page file {name!r}")
        return file

    def _json(self, status: int, data: dict) -> None:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, line: str) -> None:
        self._json(status, {"error": " ".join(str(line).split())})

    def _send_file(self, path: Path, head: bool = False, headers: dict | None = None) -> None:
        with open_confined(path) as file:
            size = os.fstat(file.fileno()).st_size
            try:
                span = byte_range(self.headers.get("Range"), size)
            except ValueError:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, stop = span or (0, size)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
            self.send_header("Content-Type", content_type(path))
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            if span:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if head:
                return
            file.seek(start)
            left = stop - start
            while left > 0:
                chunk = file.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def start(settings: ServeSettings) -> LayerFlowHTTPServer:
    """Prepare the app and bind its socket (port 0: a free one); the caller runs ``serve_forever``."""
    app = ServeApp(settings)
    try:
        return LayerFlowHTTPServer((settings.host, settings.port), app)
    except BaseException:
        app.close()
        raise


def serve_in_thread(server: LayerFlowHTTPServer) -> threading.Thread:
    """Run ``server`` on a thread of its own (tests; the command runs it on the main thread)."""
    thread = threading.Thread(target=server.serve_forever, name="layerflow-serve", daemon=True)
    thread.start()
    return thread
