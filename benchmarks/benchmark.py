"""Time every stage of one LayerFlow run and record its peak memory.

The configuration is given exactly as for ``sample_video.py``; the benchmark runs
``LayerFlowPipeline.generate``, whose stage clock (T5 encoding, VAE encoding of the given layers,
denoising, VAE decoding) synchronises the accelerator at every boundary and, on CUDA, records each
stage's peak allocated memory (so the peak has a name); it times each denoising step from its
callback, then times writing the output folder (``--no-write`` skips it; without a
working ffmpeg the run notes it in one line and the JSON has the other stages).

Examples::

    # the tiny built-in model on the CPU (seconds)
    python benchmarks/benchmark.py --base configs/model.yaml configs/tasks/fg2bg_rgba.yaml \\
        configs/tiny.yaml --repeats 3 --json outputs/bench_tiny.json

    # the full-size RGBA model on a GPU, no weights needed
    python benchmarks/benchmark.py --base configs/model.yaml configs/tasks/gen_rgba.yaml \\
        --set model.weights=random --repeats 3 --warmup 1 --json outputs/bench_gen_rgba.json

Random weights give valid timings: the work done by every layer depends on the tensor shapes and
the configuration, never on the weight values. Only the text encoder is special: without the
released T5-XXL folder a small stand-in T5 of the same width is built, and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))

from layerflow.batch.sample_folder import write_sample  # noqa: E402
from layerflow.config import ConfigError, LayerFlowConfig, load_config  # noqa: E402
from layerflow.io.atomic import write_text_atomic  # noqa: E402
from layerflow.pipeline import LayerFlowPipeline  # noqa: E402
from layerflow.runtime.devices import SpeedPlan, cpu_threads, resolve_placement, resolve_speed  # noqa: E402
from layerflow.tasks import TaskLayout  # noqa: E402
from layerflow.weights.checkpoint import CheckpointError  # noqa: E402
from layerflow.weights.resolve import MissingWeightsError, Weights, resolve_weights  # noqa: E402

RANDOM_WEIGHTS_NOTE = (
    "random weights give valid timings: the work of every layer depends on shapes and "
    "configuration, not on weight values"
)
PROMPTS = {
    "fg": "a red balloon drifting slowly to the right",
    "bg": "a calm lake with green hills at sunrise",
    "blend": "a red balloon drifting over a calm lake with green hills at sunrise",
}
STAGES = ("text_encoder", "vae_encode", "denoise", "vae_decode", "write_outputs", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument(
        "--base", nargs="+", required=True, metavar="YAML", help="config files, merged in order (later files win)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.num_steps=25 (repeatable)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every measurement to this JSON file")
    parser.add_argument(
        "--output", type=Path, metavar="DIR", help="where the sample folders are written (default: a temporary folder)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="time the pipeline only, write no files (for a machine without ffmpeg)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": None,
        "load_average_1_5_15min": os.getloadavg(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# -- inputs --------------------------------------------------------------------------------------


def benchmark_prompts(layout: TaskLayout) -> dict[str, str]:
    return {name: PROMPTS[name] for name in layout.prompt_layers}


def benchmark_given_layers(layout: TaskLayout, size: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random given-layer videos (F_layer, 3, H, W) in [-1, 1] of the shapes the task takes."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    return {
        name: torch.rand(layout.span(name).pixel_frames, 3, height, width, generator=generator) * 2 - 1
        for name in layout.given_layers
    }


# -- timing --------------------------------------------------------------------------------------


class StageClock:
    """Wall-clock marks that wait for queued accelerator work first."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def time_one_run(pipeline: LayerFlowPipeline, config: LayerFlowConfig, folder: Path | None, seed: int) -> dict:
    """One sample through :meth:`LayerFlowPipeline.generate` (its own stage timings) and, unless
    ``folder`` is None, :func:`write_sample`; returns seconds per stage and per denoising step.

    A step's time runs from the previous step's callback to its own; the first step also holds the
    sampler's setup and the work after the last callback (so the steps add up to ``denoise``).
    ``write_error`` is set, and ``write_outputs`` left out, when the files could not be written.
    """
    layout = config.layout
    clock = StageClock(pipeline.placement.compute_device)
    prompts = benchmark_prompts(layout)
    given = benchmark_given_layers(layout, config.video_size) if layout.given_layers else None
    marks: list[float] = []
    start = clock.now()
    result = pipeline.generate(prompts, given, seed=seed, on_step=lambda step, x: marks.append(clock.now()))
    mark = clock.now()
    stages = dict(result.timings)
    steps = [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)]
    steps.insert(0, stages["denoise"] - sum(steps))
    run: dict = {"stages": stages, "steps": steps, "stage_peak_bytes": dict(result.peak_bytes)}
    if folder is not None:
        meta = {"id": folder.name, "prompts": prompts, "seed": seed, "benchmark": True}
        try:
            write_sample(folder, result.layers, config, meta, given)
            mark, stages["write_outputs"] = _lap(clock, mark)
        except (OSError, RuntimeError) as error:  # no ffmpeg, an encoder it lacks: the timings stand without it
            run["write_error"] = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    stages["total"] = mark - start
    return run


def _lap(clock: StageClock, since: float) -> tuple[float, float]:
    now = clock.now()
    return now, now - since


def peak_memory(device: torch.device, stage_peaks: dict[str, int]) -> dict:
    """The run's peak: on CUDA the largest stage peak of the pipeline (it resets the mark at every
    stage), on the CPU the process's peak resident set (no per-stage figure exists there)."""
    if device.type == "cuda":
        stage = max(stage_peaks, key=stage_peaks.get)
        return {"kind": "torch.cuda.max_memory_allocated", "bytes": stage_peaks[stage], "stage": stage}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"kind": "max RSS of the process (resource.getrusage)", "bytes": rss * scale}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def summarize_runs(runs: list[dict], num_steps: int) -> dict:
    """Per stage and per step position: median, min, max over the timed runs; per stage the largest
    peak of any run (empty where the device reports none)."""
    stages = {name: summarize([run["stages"][name] for run in runs]) for name in STAGES if name in runs[0]["stages"]}
    per_step = [summarize([run["steps"][i] for run in runs]) for i in range(num_steps)]
    step_means = [statistics.fmean(run["steps"]) for run in runs]
    peaks = {name: max(run["stage_peak_bytes"][name] for run in runs) for name in runs[0]["stage_peak_bytes"]}
    return {"stages": stages, "steps": per_step, "step_mean": summarize(step_means), "stage_peak_bytes": peaks}


def gib(count: int) -> str:
    return f"{count / 2**30:.2f}"


def _cells(values: dict) -> tuple[str, str, str]:
    return tuple(f"{values[key]:.4f}" for key in ("median", "min", "max"))


def format_table(summary: dict, num_steps: int) -> str:
    """Seconds per stage and step; a ``peak GiB`` column when the stages have peaks (CUDA)."""
    peaks = summary["stage_peak_bytes"]
    rows = [("stage", "median s", "min s", "max s", *(("peak GiB",) if peaks else ()))]
    for name, values in summary["stages"].items():
        rows.append((name, *_cells(values), *((gib(peaks[name]) if name in peaks else "",) if peaks else ())))
        if name == "denoise":
            mean = summary["step_mean"]
            rows.append((f"  per step (mean of {num_steps})", *_cells(mean), *(("",) if peaks else ())))
            for index, step in enumerate(summary["steps"]):
                rows.append((f"  step {index + 1}", *_cells(step), *(("",) if peaks else ())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------


def prepare_config(args: argparse.Namespace) -> tuple[LayerFlowConfig, Weights, str]:
    """The validated config, where its weights come from, and a note on which text encoder is timed."""
    config = load_config(args.base, args.set)
    weights = resolve_weights(config)
    if not weights.random:
        return config, weights, f"released T5 from {weights.text_encoder}"
    if not weights.stand_in_t5:
        return config, weights, f"T5 from {weights.text_encoder}"
    width = config.model.network.text_hidden_size
    configured = config.model.text_encoder.path
    why = f"{configured} not found" if configured else "no T5 folder configured"
    return (
        config,
        weights,
        f"small stand-in T5 of width {width} ({why}): text_encoder times are not those of T5-XXL",
    )


def run_benchmark(
    config: LayerFlowConfig,
    weights: Weights,
    repeats: int,
    warmup: int,
    output: Path | None,
    progress: Callable[[str], None] = lambda message: None,
    speed: SpeedPlan | None = None,
) -> dict:
    """Load once, then ``warmup`` untimed and ``repeats`` timed runs; ``output`` None writes no files.
    ``speed``: the plan resolved before loading (resolved here when left out)."""
    start = time.perf_counter()
    pipeline = LayerFlowPipeline(config, weights=weights, speed=speed)
    device = pipeline.placement.compute_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - start
    seed, write_error = config.sampling.seed, None
    runs, peaks, warmups = [], [], []
    for index in range(warmup + repeats):
        timed = index >= warmup
        name = f"run_{index - warmup}" if timed else f"warmup_{index}"
        progress(f"run {index - warmup + 1}/{repeats}" if timed else f"warmup {index + 1}/{warmup}")
        run = time_one_run(pipeline, config, None if output is None or write_error else output / name, seed)
        if "write_error" in run:
            write_error = run.pop("write_error")
            print(
                f"note: the outputs could not be written ({write_error}); timing without write_outputs", file=sys.stderr
            )
            for earlier in runs:  # keep every timed run alike
                earlier["stages"]["total"] -= earlier["stages"].pop("write_outputs")
        if timed:
            runs.append(run)
            peaks.append(peak_memory(device, run["stage_peak_bytes"]))
        else:  # the first call also compiles (runtime.compile) and tunes kernels: its excess over a timed run
            warmups.append({"total": run["stages"]["total"], "denoise": run["stages"]["denoise"]})
    return {
        "write_outputs": "not measured: " + (write_error or "--no-write")
        if output is None or write_error
        else "measured",
        "machine": machine_info(device),
        "dtype": str(pipeline.placement.dtype).removeprefix("torch."),
        "load_seconds": load_seconds,
        "warmup_seconds": warmups,
        "repeats": repeats,
        "warmup": warmup,
        "num_steps": config.sampling.num_steps,
        "peak_memory": max(peaks, key=lambda peak: peak["bytes"]),
        "stage_peak_memory": "torch.cuda.max_memory_allocated per stage, reset at each stage's start"
        if device.type == "cuda"
        else f"not measured: PyTorch keeps no allocator statistics on {device.type}",
        "summary": summarize_runs(runs, config.sampling.num_steps),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, weights, text_encoder_note = prepare_config(args)
        # a device or attention kernel this machine lacks: one line before any model loads
        speed = resolve_speed(config.runtime, resolve_placement(config.runtime), config.network.head_dim)
    except (ConfigError, MissingWeightsError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report_progress = lambda message: print(f"[benchmark] {message}", file=sys.stderr, flush=True)
    with cpu_threads(config.runtime.cpu_threads):  # the thread count sample_video.py runs with
        if args.no_write:
            result = run_benchmark(config, weights, args.repeats, args.warmup, None, report_progress, speed)
        elif args.output is not None:
            args.output.mkdir(parents=True, exist_ok=True)
            result = run_benchmark(config, weights, args.repeats, args.warmup, args.output, report_progress, speed)
        else:
            with tempfile.TemporaryDirectory(prefix="layerflow-bench-") as folder:
                result = run_benchmark(config, weights, args.repeats, args.warmup, Path(folder), report_progress, speed)
    result.update(
        {
            "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
            "config_files": list(config.sources),
            "config": config.to_dict(),
            "weights": config.model.weights,
            "text_encoder": text_encoder_note,
            "note": RANDOM_WEIGHTS_NOTE if config.model.weights == "random" else "released weights",
        }
    )
    machine = result["machine"]
    where = machine["gpu"] or (
        f"{machine['cpu_model']} ({machine['cpu_cores']} cores, {machine['torch_threads']} threads)"
    )
    print(
        f"{config.layout.name}, {result['num_steps']} steps, {result['dtype']}, {config.model.weights} weights "
        f"on {where}; torch {machine['torch']}; median of {args.repeats} runs after {args.warmup} warmup"
    )
    print(format_table(result["summary"], result["num_steps"]))
    peak = result["peak_memory"]
    in_stage = f", in {peak['stage']}" if "stage" in peak else ""
    print(f"peak memory: {gib(peak['bytes'])} GiB ({peak['kind']}{in_stage}); load {result['load_seconds']:.2f} s")
    if result["warmup_seconds"]:
        first = result["warmup_seconds"][0]
        print(
            f"first (warm-up) run: total {first['total']:.2f} s, denoise {first['denoise']:.2f} s "
            f"(compilation and kernel tuning happen there)"
        )
    if not result["summary"]["stage_peak_bytes"]:
        print(f"per-stage peak memory: {result['stage_peak_memory']}")
    print(f"text encoder: {text_encoder_note}")
    if config.model.weights == "random":
        print(f"note: {RANDOM_WEIGHTS_NOTE}")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
