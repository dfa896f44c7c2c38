"""The same sampling run through the original LayerFlow code and through ours, in one process.

Two modes:

- fixture (the default): both implementations get one fixture case's tiny network and checkpoint
  (``<fixtures>/<case>/config.json`` and ``ckpt/``), its recorded text states and given latents;
- ``--size tiny|full``: no checkpoint and no fixture. Our network is built from
  ``configs/model.yaml`` + ``configs/tasks/<case>.yaml`` (+ ``configs/tiny.yaml`` for tiny) with
  seeded random weights (``model.weights=random``), and the same weights are copied into the
  original's network by key name (the original's keys are ours behind ``model.diffusion_model.``).
  Text states and given latents are seeded random tensors of the task's shapes. It runs on
  ``--device`` (default: the GPU if there is one) in the dtype our config picks there (bfloat16 on
  CUDA), the original converted to the same dtype the way SAT's ``get_model`` does.

In both, the two get the same seed, the same number of steps and a classifier-free-guidance batch
of 2. The runs alternate (original, ours, original, ...) so that both see the same machine load;
the script prints the median time of each and per step, the ratio ours / original (of the medians,
of back-to-back pairs and of the fastest runs), the speed-up original / ours and the largest
difference of the final latents.

The original is NOT part of this repository. Give a checkout of SihuiJi/LayerFlow with
``--original``; its ``sat/`` folder is put on ``sys.path`` at run time so that its local modules
(``diffusion_video``, ``dit_video_concat``, ``sgm``, ...) import, while ``import sat`` keeps
resolving to the installed SwissArmyTransformer. Packages it imports at module level but never
uses on the sampling path (the VAE training base class, image encoders, a VAE helper, an LMS
integrator) are served as empty placeholder modules when they are not installed; see
:data:`UNUSED_BY_SAMPLING`. The engine is built the way the reference fixtures were made
(``<fixtures>/README.md``, "Changes made to run the reference").

Example::

    git clone /path/to/LayerFlow /tmp/layerflow-original
    python benchmarks/compare_original.py --original /tmp/layerflow-original --case fg2bg_rgba --repeats 7

    # the full-size network with random weights on a GPU, 5 guided steps per run
    python benchmarks/compare_original.py --original /tmp/layerflow-original --case gen_rgba --size full \
        --steps 5 --repeats 3 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "sat"))

from layerflow.config import ConfigError, LayerFlowConfig, load_config  # noqa: E402
from layerflow.io.atomic import write_text_atomic  # noqa: E402
from layerflow.pipeline import LayerFlowPipeline  # noqa: E402
from layerflow.runtime.distributed import ensure_model_parallel  # noqa: E402
from layerflow.weights.build import build_network  # noqa: E402
from layerflow.weights.checkpoint import NETWORK_PREFIX  # noqa: E402
from layerflow.weights.resolve import Weights  # noqa: E402

DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "reference"
SIZES = ("tiny", "full")
# The original's sample() takes the task as an index for the conditioned generations only
# (the decomposition and the plain generation pass none and get its default).
ORIGINAL_TASK_INDEX = {"fg2bg": 1, "bg2fg": 2}

# Imported at module level by the original, never called when sampling from given text states
# with an Identity first stage and no loss:
UNUSED_BY_SAMPLING = {
    "pytorch_lightning": "base class of sgm.models.autoencoder (the VAE training engine)",
    "kornia": "image augmentations in sgm.modules.encoders.modules",
    "diffusers": "DiagonalGaussianDistribution in diffusion_video.encode_first_stage",
    "scipy": "scipy.integrate in the LMS sampler coefficients (sampling_utils)",
}


class CompareError(RuntimeError):
    """The original checkout or a fixture case cannot be used (one line saying why)."""


# -- importing the original ------------------------------------------------------------------------


class _PlaceholderModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves empty modules for the given top-level package names; any attribute is a fresh class."""

    def __init__(self, packages: set[str]):
        self.packages = packages
        self.served: list[str] = []

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attribute: str, owner: str = spec.name):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return type(attribute, (), {"__module__": owner})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module) -> None:
        self.served.append(module.__name__)


@contextlib.contextmanager
def placeholders_for_missing(packages: dict[str, str]) -> Iterator[_PlaceholderModules]:
    """Placeholder modules for the packages that are not installed, only while the block runs."""
    missing = {name for name in packages if importlib.util.find_spec(name) is None}
    finder = _PlaceholderModules(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)


def import_original(checkout: Path) -> tuple[dict[str, types.ModuleType], list[str]]:
    """Import the original engines from ``checkout/sat``; returns them and the placeholder modules used."""
    source = checkout / "sat"
    if not (source / "diffusion_video.py").is_file():
        raise CompareError(f"--original {checkout}: no sat/diffusion_video.py (expected a SihuiJi/LayerFlow checkout)")
    import transformers  # noqa: F401  (imported before the placeholders so that its package probes see the truth)
    from transformers import T5EncoderModel, T5Tokenizer  # noqa: F401

    sys.path.insert(0, str(source))
    with placeholders_for_missing(UNUSED_BY_SAMPLING) as finder:
        engines = {
            "rgba": importlib.import_module("diffusion_video"),
            "rgb": importlib.import_module("diffusion_video_rgb"),
        }
        importlib.import_module("sgm.util")
    sat_package = importlib.import_module("sat")
    if Path(sat_package.__file__).resolve().is_relative_to(source.resolve()):
        raise CompareError(f"'import sat' resolved to {sat_package.__file__}, not SwissArmyTransformer")
    return engines, finder.served


def build_original_engine(
    engines: dict,
    checkout: Path,
    case: dict,
    num_steps: int,
    checkpoint: Path | None = None,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """The original ``SATVideoDiffusionEngine`` at the case's sizes, without T5 or VAE, weights loaded
    from ``checkpoint`` or given as the engine's ``state``; in ``dtype`` on ``device`` as SAT's
    ``get_model`` leaves it (weights loaded in float32, then the whole engine converted and moved)."""
    import sgm.util
    from omegaconf import OmegaConf
    from sat import mpu

    ensure_model_parallel()
    sgm.util.set_context_parallel_group(1, mpu.get_model_parallel_group())
    model = OmegaConf.load(checkout / "sat" / "configs" / case["reference_config"]).model
    network = model.network_config.params
    sizes, options = case["sizes"], case["options"]
    for key in (
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "time_embed_dim",
        "latent_height",
        "latent_width",
        "num_frames",
        "patch_size",
        "in_channels",
        "out_channels",
        "time_compressed_rate",
    ):
        network[key] = sizes[key]
    network.transformer_args.checkpoint_activations = False
    modules = network.modules
    modules.patch_embed_config.params.text_hidden_size = sizes["text_hidden_size"]
    for key in ("motion_r", "spatial_r", "lora_alpha", "is_switch", "is_stage1"):
        modules.lora_config.params[key] = options["lora"][key]
    model.conditioner_config = {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": []}}
    model.first_stage_config = {"target": "torch.nn.Identity"}
    model.loss_fn_config = None
    model.denoiser_config = case["denoiser_config"]
    sampler = json.loads(json.dumps(case["sampler_config"]))
    sampler["params"].update(num_steps=num_steps, verbose=False, device=device)
    sampler["params"]["guider_config"]["params"]["num_steps"] = num_steps
    model.sampler_config = sampler
    args = argparse.Namespace(
        model_config=model, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, device=device
    )
    engine = engines[case["case"].split("_")[1]].SATVideoDiffusionEngine(args)
    if state is None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["module"]
    engine.load_state_dict(state, strict=True)
    return engine.to(dtype=dtype).to(device).eval().requires_grad_(False)


def original_case(checkout: Path, config: LayerFlowConfig) -> dict:
    """What :func:`build_original_engine` needs, for our config instead of a fixture case: the sizes
    and LoRA of ``config``, the denoiser and sampler of the original's own task YAML."""
    from omegaconf import OmegaConf

    layout, network = config.layout, config.network
    name = f"cogvideox_2b_stage2_{layout.task.value}_{layout.variant.value}.yaml"
    if not (checkout / "sat" / "configs" / name).is_file():
        raise CompareError(f"--original {checkout}: no sat/configs/{name}")
    model = OmegaConf.load(checkout / "sat" / "configs" / name).model
    sampler = OmegaConf.to_container(model.sampler_config, resolve=True)
    sampler["params"]["guider_config"]["params"].update(
        scale=config.sampling.guidance_scale, exp=config.sampling.guidance_exponent
    )
    sizes = {
        key: getattr(network, key)
        for key in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "time_embed_dim",
            "latent_height",
            "latent_width",
            "num_frames",
            "patch_size",
            "in_channels",
            "out_channels",
            "text_hidden_size",
        )
    }
    sizes["time_compressed_rate"] = int(model.network_config.params.time_compressed_rate)
    lora = {
        key: getattr(network.lora, key) for key in ("motion_r", "spatial_r", "lora_alpha", "is_switch", "is_stage1")
    }
    return {
        "case": layout.name,
        "reference_config": name,
        "sizes": sizes,
        "options": {"lora": lora},
        "denoiser_config": OmegaConf.to_container(model.denoiser_config, resolve=True),
        "sampler_config": sampler,
    }


# -- ours ----------------------------------------------------------------------------------------------


def network_overrides(case: dict) -> list[str]:
    """``model.network.*`` overrides giving our network the sizes and switches of a fixture case's
    ``config.json`` (the original's tiny network, LoRA included)."""
    sizes, options = case["sizes"], case["options"]
    network = {
        key: sizes[key]
        for key in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "time_embed_dim",
            "text_hidden_size",
            "latent_height",
            "latent_width",
            "num_frames",
        )
    }
    network.update(
        {
            key: options[key]
            for key in (
                "learnable_txt_embed",
                "learnable_pos_embed",
                "qk_ln",
                "height_interpolation",
                "width_interpolation",
                "elementwise_affine",
            )
        }
    )
    overrides = [f"model.network.{key}={json.dumps(value)}" for key, value in network.items()]
    overrides += [
        f"model.network.lora.{key}={json.dumps(options['lora'][key])}"
        for key in ("motion_r", "spatial_r", "lora_alpha", "is_switch", "is_stage1")
    ]
    return overrides


def build_our_pipeline(
    case_dir: Path, case: dict, num_steps: int, seed: int, extra: list[str] | tuple[str, ...] = ()
) -> LayerFlowPipeline:
    """Our pipeline for the case's task at its tiny sizes (every size from the fixture files).

    The network is loaded from the case's checkpoint and the VAE from the fixtures' tiny VAE by the
    pipeline's own loaders; ``extra`` are further ``section.key=value`` overrides (e.g.
    ``runtime.merge_lora=true``).
    """
    task, variant = case["case"].split("_")
    options = case["options"]
    overrides = network_overrides(case)
    vae_file = case_dir.parent / "vae" / "3d-vae.pt"
    vae = json.loads((case_dir.parent / "vae" / "vae.json").read_text(encoding="utf-8"))["encoder"]["params"]
    overrides += [
        f"model.vae.{key}={json.dumps(vae[key])}" for key in ("ch", "ch_mult", "num_res_blocks", "z_channels")
    ]
    guider = case["sampler_config"]["params"]["guider_config"]["params"]
    overrides += [
        f"sampling.num_steps={num_steps}",
        f"sampling.seed={seed}",
        f"sampling.guidance_scale={guider['scale']}",
        f"sampling.guidance_exponent={guider['exp']}",
        f"sampling.lora_scale={options['lora_scale_at_inference']}",
        "model.weights=checkpoint",
        f"model.checkpoint={case_dir / 'ckpt'}",
        f"model.vae.path={vae_file}",
        f"model.vae.scale_factor={case['scale_factor']}",
        "runtime.device=cpu",
        "runtime.dtype=float32",
        *extra,
    ]
    configs = REPO_ROOT / "configs"
    config = load_config(
        [configs / "model.yaml", configs / "tasks" / f"{task}_{variant}.yaml", configs / "tiny.yaml"], overrides
    )
    weights = Weights(
        random=False,
        checkpoint=str(case_dir / "ckpt"),
        vae=str(vae_file),
        text_encoder=Path(config.model.text_encoder.path),
    )  # T5 is never loaded: text states are given
    return LayerFlowPipeline(config, weights=weights)


def random_config(
    case: str, size: str, device: str, num_steps: int, seed: int, extra: list[str] | tuple[str, ...] = ()
) -> LayerFlowConfig:
    """Our config for ``case`` (e.g. gen_rgba) at ``size`` with seeded random weights on ``device``."""
    configs = REPO_ROOT / "configs"
    task_file = configs / "tasks" / f"{case}.yaml"
    if not task_file.is_file():
        known = sorted(path.stem for path in (configs / "tasks").glob("*.yaml"))
        raise CompareError(f"--case {case}: no {task_file.relative_to(REPO_ROOT)}; expected one of {known}")
    files = [configs / "model.yaml", task_file, *([configs / "tiny.yaml"] if size == "tiny" else [])]
    return load_config(
        files,
        [
            "model.weights=random",
            f"runtime.device={device}",
            f"sampling.num_steps={num_steps}",
            f"sampling.seed={seed}",
            *extra,
        ],
    )


def random_weights(config: LayerFlowConfig) -> Weights:
    """Seeded random network and VAE; T5 is never loaded (the text states are given)."""
    return Weights(random=True, checkpoint="", vae="", text_encoder=Path(config.model.text_encoder.path))


def random_network_state(config: LayerFlowConfig) -> dict[str, torch.Tensor]:
    """The float32 weights our pipeline gives its network for ``config`` (seeded, before any merge),
    under the original engine's key names."""
    ensure_model_parallel()
    network = build_network(config, random_weights(config))  # the builder the pipeline uses
    return {NETWORK_PREFIX + key: value for key, value in network.state_dict().items()}


# -- the comparison ------------------------------------------------------------------------------------


def timed(run: Callable[[], torch.Tensor], device: torch.device | None = None) -> tuple[float, torch.Tensor]:
    """Seconds of ``run()`` (queued GPU work on ``device`` included) and its result."""
    synchronize = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        result = run()
    synchronize()
    return time.perf_counter() - start, result


def alternate(
    runs: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """``warmup`` untimed then ``repeats`` timed rounds, each running every entry once in turn;
    returns the seconds of each and its last result."""
    for _ in range(warmup):
        for run in runs.values():
            timed(run, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, results[name] = timed(run, device)
            times[name].append(seconds)
    return times, results


def timing_summary(times: dict[str, list[float]], latents: dict[str, torch.Tensor], num_steps: int) -> dict:
    """Medians, minima, per-step seconds, the three ratios ours / original and the largest difference."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    return {
        "times_s": times,
        "median_s": medians,
        "min_s": minima,
        "seconds_per_step": {name: median / num_steps for name, median in medians.items()},
        "ratio_ours_over_original": medians["ours"] / medians["original"],
        "speedup_original_over_ours": medians["original"] / medians["ours"],
        "ratio_of_minima": minima["ours"] / minima["original"],
        "median_of_paired_ratios": statistics.median(
            ours / original for ours, original in zip(times["ours"], times["original"], strict=True)
        ),
        "max_abs_diff_final_latent": (latents["ours"].float() - latents["original"].float()).abs().max().item(),
        "max_abs_final_latent": latents["original"].float().abs().max().item(),
    }


def compare(
    checkout: Path,
    case_dir: Path,
    num_steps: int | None,
    repeats: int,
    warmup: int,
    ours_overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    case = json.loads((case_dir / "config.json").read_text(encoding="utf-8"))
    recorded = torch.load(case_dir / "sampling.pt", map_location="cpu", weights_only=True)
    num_steps = num_steps or int(recorded["num_steps"])
    seed = int(recorded["seed"])
    engines, placeholders = import_original(checkout)
    checkpoint = case_dir / "ckpt" / (case_dir / "ckpt" / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    engine = build_original_engine(engines, checkout, case, num_steps, checkpoint)
    pipeline = build_our_pipeline(case_dir, case, num_steps, seed, ours_overrides)

    text = recorded["cond_crossattn"]  # (n_prompts, 226, e), the original's batch-major layout
    condition = recorded.get("cond_latent")  # (1, T_cond, c, h, w) or None
    shape = tuple(recorded["final_latent"].shape[1:])
    task_kwargs = {"task_idx": recorded["task_idx"]} if "task_idx" in recorded else {}

    def original() -> torch.Tensor:
        torch.manual_seed(seed)
        return engine.sample(
            {"crossattn": text},
            uc={"crossattn": torch.zeros_like(text)},
            batch_size=1,
            shape=shape,
            cond_image=condition,
            **task_kwargs,
        )

    context = text.reshape(1, -1, text.shape[-1])  # (1, n_prompts * 226, e)

    def ours() -> torch.Tensor:
        return pipeline.sample_latents(context, condition, seed)

    load_before = os.getloadavg()
    times, latents = alternate({"original": original, "ours": ours}, repeats, warmup, torch.device("cpu"))
    result = {
        "mode": "fixture",
        "case": case["case"],
        "num_steps": num_steps,
        "seed": seed,
        "cfg_batch": 2,
        "ours_overrides": list(ours_overrides),
        "latent_shape": list(shape),
        "repeats": repeats,
        "warmup": warmup,
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **timing_summary(times, latents, num_steps),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "placeholder_modules": placeholders,
    }
    if num_steps == int(recorded["num_steps"]):
        result["max_abs_diff_vs_recorded"] = {
            name: (latent - recorded["final_latent"]).abs().max().item() for name, latent in latents.items()
        }
    return result


def compare_random(
    checkout: Path,
    case: str,
    size: str,
    device: str,
    num_steps: int,
    repeats: int,
    warmup: int,
    ours_overrides: list[str] | tuple[str, ...] = (),
    seed: int = 0,
) -> dict:
    """Both implementations at ``size`` with the same seeded random weights on ``device``; see the module docstring."""
    config = random_config(case, size, device, num_steps, seed, ours_overrides)
    layout, network = config.layout, config.network
    engines, placeholders = import_original(checkout)
    state = random_network_state(config)
    weights = random_weights(config)
    start = time.perf_counter()
    pipeline = LayerFlowPipeline(config, weights=weights)  # the same seeded weights; T5 is never loaded
    load_ours = time.perf_counter() - start
    placement = pipeline.placement
    start = time.perf_counter()
    engine = build_original_engine(
        engines,
        checkout,
        original_case(checkout, config),
        num_steps,
        state=state,
        dtype=placement.dtype,
        device=str(placement.compute_device),
    )
    load_original = time.perf_counter() - start
    ours_state = pipeline.network.state_dict()
    unequal = [
        key
        for key, value in state.items()
        if key[len(NETWORK_PREFIX) :] not in ours_state
        or not torch.equal(ours_state[key[len(NETWORK_PREFIX) :]].cpu(), value.to(placement.dtype))
    ]
    del state

    generator = torch.Generator().manual_seed(seed + 1)
    prompts = len(layout.prompt_layers)
    text = torch.randn(prompts, layout.text_length // prompts, network.text_hidden_size, generator=generator) * 0.1
    latent = (network.in_channels, network.latent_height, network.latent_width)
    condition = torch.randn(1, layout.condition_frames, *latent, generator=generator) if layout.condition else None
    text = text.to(placement.compute_device)  # (n_prompts, 226, e), the original's batch-major layout
    condition = condition.to(placement.compute_device) if condition is not None else None
    context = text.reshape(1, -1, text.shape[-1]).to(placement.dtype)  # (1, n_prompts * 226, e)
    shape = (layout.generated_frames, *latent)
    task_kwargs = (
        {"task_idx": ORIGINAL_TASK_INDEX[layout.task.value]} if layout.task.value in ORIGINAL_TASK_INDEX else {}
    )

    def original() -> torch.Tensor:
        torch.manual_seed(seed)
        return engine.sample(
            {"crossattn": text},
            uc={"crossattn": torch.zeros_like(text)},
            batch_size=1,
            shape=shape,
            cond_image=condition,
            **task_kwargs,
        )

    def ours() -> torch.Tensor:
        return pipeline.sample_latents(context, condition, seed)

    device_used = placement.compute_device
    if device_used.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_used)
    load_before = os.getloadavg()
    times, latents = alternate({"original": original, "ours": ours}, repeats, warmup, device_used)
    result = {
        "mode": f"random weights, {size} size",
        "case": layout.name,
        "size": size,
        "num_steps": num_steps,
        "seed": seed,
        "cfg_batch": 2,
        "tokens": {
            "text": layout.text_length,
            "video": layout.latent_frames * network.latent_height * network.latent_width // network.patch_size**2,
        },
        "ours_overrides": list(ours_overrides),
        "latent_shape": list(shape),
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device_used),
        "gpu": torch.cuda.get_device_name(device_used) if device_used.type == "cuda" else None,
        "dtype": str(placement.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_s": {"original": load_original, "ours": load_ours},
        "weights": f"random (seed {seed}), the same float32 values copied into the original by key",
        "weights_not_equal_after_loading": unequal,
        **timing_summary(times, latents, num_steps),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "placeholder_modules": placeholders,
    }
    if device_used.type == "cuda":
        result["peak_allocated_gib_both_loaded"] = torch.cuda.max_memory_allocated(device_used) / 2**30
    return result


def format_report(result: dict) -> str:
    times = result["times_s"]
    rows = [("implementation", "median s", "min s", "max s", "s per step")]
    for name in ("original", "ours"):
        values = times[name]
        rows.append(
            (
                name,
                f"{result['median_s'][name]:.4f}",
                f"{min(values):.4f}",
                f"{max(values):.4f}",
                f"{result['seconds_per_step'][name]:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    where = result["gpu"] if result.get("gpu") else result["device"]
    lines = [
        f"{result['case']} ({result['mode']}): {result['num_steps']} steps, CFG batch {result['cfg_batch']}, "
        f"latent {tuple(result['latent_shape'])}, seed {result['seed']}, {result['dtype']} on {where}; "
        f"torch {result['torch']}, {result['torch_threads']} threads; median of {result['repeats']} "
        f"alternating runs after {result['warmup']} warm-up"
    ]
    lines += [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    ]
    lines.insert(2, "-" * len(lines[1]))
    if result["ours_overrides"]:
        lines.append("ours with: " + " ".join(result["ours_overrides"]))
    lines.append(
        f"ours / original: {result['ratio_ours_over_original']:.3f} (medians), "
        f"{result['median_of_paired_ratios']:.3f} (median of back-to-back pairs), "
        f"{result['ratio_of_minima']:.3f} (fastest runs); ours is "
        f"{result['speedup_original_over_ours']:.2f}x as fast as the original (medians)"
    )
    load = result["load_average_1_5_15min"]
    lines.append(
        f"load average (1 min) before {load['before'][0]:.2f}, after {load['after'][0]:.2f} "
        f"(a load above {result['torch_threads']} means other processes shared the cores)"
    )
    lines.append(
        f"max |ours - original| of the final latent: {result['max_abs_diff_final_latent']:.3e} "
        f"(max |original| {result['max_abs_final_latent']:.3e})"
    )
    differing = result.get("weights_not_equal_after_loading")
    if differing:
        merged = all(key.endswith("original.weight") for key in differing)
        lines.append(
            f"ours holds {len(differing)} weight tensors other than the copied ones ("
            + (
                "the projections its merged content LoRA changed"
                if merged
                else "WARNING: not only merged projections: " + ", ".join(differing[:4])
            )
            + ")"
        )
    if "load_s" in result:
        lines.append(f"load: original {result['load_s']['original']:.1f} s, ours {result['load_s']['ours']:.1f} s")
    if "peak_allocated_gib_both_loaded" in result:
        lines.append(f"peak allocated, both networks loaded: {result['peak_allocated_gib_both_loaded']:.2f} GiB")
    for name, diff in result.get("max_abs_diff_vs_recorded", {}).items():
        lines.append(f"max |{name} - recorded fixture|: {diff:.3e}")
    if result["placeholder_modules"]:
        lines.append("placeholder modules for the original: " + ", ".join(result["placeholder_modules"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare_original.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Example::", 1)[1],
    )
    parser.add_argument("--original", type=Path, required=True, help="a checkout of SihuiJi/LayerFlow")
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=DEFAULT_FIXTURES,
        help=f"the reference fixture folder (default {DEFAULT_FIXTURES})",
    )
    parser.add_argument(
        "--case",
        default="fg2bg_rgba",
        help="fixture case, or with --size the task config, e.g. gen_rgba (default fg2bg_rgba)",
    )
    parser.add_argument(
        "--size", choices=SIZES, help="no fixture: both networks at this size with the same random weights"
    )
    parser.add_argument(
        "--device", default="auto", help="with --size: cpu, cuda, cuda:N or auto (the GPU if there is one; default)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="with --size: seed of the weights, inputs and noise (default 0)"
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: the fixture's; 4 with --size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both (default: torch's choice)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="ours_set",
        help="override a key of our config, e.g. --set runtime.merge_lora=true (repeatable)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 2):
        parser.error("--repeats must be at least 1, --warmup at least 0 and --steps at least 2")
    if args.size is None and (args.device != "auto" or args.seed != 0):
        parser.error("--device and --seed go with --size (the fixture mode runs the fixture's seed on the CPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    case_dir = args.fixtures / args.case
    if args.size is None and not (case_dir / "config.json").is_file():
        print(f"error: {case_dir}: no config.json (not a fixture case)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.size is None:
            result = compare(args.original, case_dir, args.steps, args.repeats, args.warmup, args.ours_set)
        else:
            result = compare_random(
                args.original,
                args.case,
                args.size,
                args.device,
                args.steps or 4,
                args.repeats,
                args.warmup,
                args.ours_set,
                args.seed,
            )
    except (CompareError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
