"""Estimate the peak GPU memory of every stage of a full-size run, with no GPU and no weights.

The real model code runs under torch's ``FakeTensorMode`` (tensors with shapes, dtypes and devices
but no data), and :class:`LiveBytes`, a dispatch mode, follows every storage an operator creates on
the compute device until it is garbage (a weakref finalizer on the storage). A stage's peak is the
largest sum of live bytes on the compute device during the stage: the resident weights (all models
the pipeline keeps there, or only the running one under ``runtime.model_cpu_offload``), the stage's
inputs and every activation, in the order the code allocates and frees them. Host<->device copies
are counted in bytes, the speed proxy of a run that parks activations in CPU memory, and the
stage's floating-point operations (``FlopCounterMode``) show what recomputation costs.

In the fake world the compute device is ``cpu`` and CPU memory is ``meta`` (fake CUDA tensors cannot be
indexed without a CUDA build). What this does not see: the caching allocator's rounding and
fragmentation (``max_memory_reserved`` is higher than the allocated peak), cuDNN/cuBLAS workspaces,
and kernels that allocate scratch space internally; attention is counted as PyTorch's fused
kernels allocate it (output plus log-sum-exp, no L x L matrix). The text encoder is T5 v1.1 XXL
built from its published sizes (4.76e9 parameters).

Examples::

    python benchmarks/memory_estimate.py --base configs/model.yaml configs/tasks/fg2bg_rgba.yaml
    python benchmarks/memory_estimate.py --base configs/model.yaml configs/tasks/fg2bg_rgba.yaml \\
        configs/memory_24gb.yaml --json outputs/memory/fg2bg_rgba_24gb.json
    python benchmarks/memory_estimate.py --all-tasks --preset configs/memory_24gb.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sat"))

from layerflow.config import ConfigError, LayerFlowConfig, load_config  # noqa: E402
from layerflow.geometry import TOKENS_PER_PROMPT  # noqa: E402
from layerflow.runtime.devices import DTYPES  # noqa: E402

GIB = 2**30
COMPUTE = torch.device("cpu")  # the fake world's GPU
HOST = torch.device("meta")  # the fake world's CPU memory
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
STAGES = ("text_encoder", "vae_encode", "denoise", "vae_decode")
# T5 v1.1 XXL (google/t5-v1_1-xxl config.json): the encoder CogVideoX conditions on
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages on ``device``, and bytes copied to and from it.

    A storage counts from the first operator output (or :meth:`adopt`) that holds it until Python frees
    it; views share their base's storage and count once.
    """

    def __init__(self, device: torch.device = COMPUTE):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self.to_device = 0
        self.from_device = 0
        self._held: set[int] = set()

    def adopt(self, tensors: Iterator[torch.Tensor]) -> None:
        """Count tensors made before the mode was entered (weights, inputs)."""
        for tensor in tensors:
            self._hold(tensor)

    def _hold(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._held:
            return
        nbytes = storage.nbytes()
        self._held.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._held.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in COPIES:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0] if func is torch.ops.aten.copy_.default else out
            nbytes = source.numel() * source.element_size()
            if source.device != self.device and target.device == self.device:
                self.to_device += nbytes
            elif source.device == self.device and target.device != self.device:
                self.from_device += nbytes
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._hold(tensor)
        return out


@dataclasses.dataclass
class StageEstimate:
    name: str
    peak_bytes: int
    weights_bytes: int
    to_device_bytes: int
    from_device_bytes: int
    flops: int  # floating-point operations of the matmuls and convolutions (FlopCounterMode)

    def as_dict(self) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k.endswith("_bytes")}
        gib = {k.replace("_bytes", "_gib"): round(v / GIB, 2) for k, v in fields.items()}
        return {"name": self.name, **gib, "tflop": round(self.flops / 1e12, 1), **fields}


def _weights(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


class Estimator:
    """Builds the models of ``config`` as fake tensors and runs each stage's code under :class:`LiveBytes`."""

    def __init__(self, config: LayerFlowConfig):
        self.config = config
        runtime = config.runtime
        self.dtype = torch.bfloat16 if runtime.dtype == "auto" else DTYPES[runtime.dtype]  # auto on a GPU: bf16
        self.offload = runtime.model_cpu_offload
        self.fake = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        with torch.device("meta"):
            self.network = self._faked(self._network())
            self.vae = self._faked(self._vae())
            self.t5 = self._faked(self._t5())

    def _faked(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (built on meta) with every parameter and buffer a fake tensor on the compute device."""
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        with self.fake:
                            fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=COMPUTE)
                        table[name] = (
                            torch.nn.Parameter(fake, requires_grad=False) if sub._parameters is table else fake
                        )
        return module

    def _network(self) -> torch.nn.Module:
        from layerflow.models.dit import LayerFlowDiT
        from layerflow.runtime.distributed import ensure_model_parallel

        ensure_model_parallel()
        network = LayerFlowDiT(self.config.network, device="meta", dtype=torch.float32)
        if self.config.runtime.merge_lora:
            network.merge_lora_content()
        return network.to(self.dtype).eval().requires_grad_(False)

    def _vae(self) -> torch.nn.Module:
        from layerflow.models.vae import CausalVideoVAE

        return CausalVideoVAE(self.config.model.vae.sizes).to(self.dtype).eval().requires_grad_(False)

    def _t5(self) -> torch.nn.Module:
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**T5_XXL)).to(self.dtype).eval().requires_grad_(False)

    def _resident(self, running: torch.nn.Module) -> list[torch.nn.Module]:
        """The models on the compute device while ``running`` runs, as the pipeline places them: the
        network and the VAE unless offloaded; T5 while it runs, and after that with keep_text_encoder
        (it is loaded onto the compute device and never offloaded)."""
        resident = [running] if self.offload else [running, self.network, self.vae]
        if self.config.runtime.keep_text_encoder:
            resident.append(self.t5)
        return list({id(m): m for m in resident}.values())

    @contextlib.contextmanager
    def _stage(self, name: str, running: torch.nn.Module, results: list[StageEstimate]):
        tracker = LiveBytes()
        modules = self._resident(running)
        with self.fake, torch.no_grad():
            tracker.adopt(iter(_weights(modules)))
            weights = tracker.live
            with FlopCounterMode(display=False) as counter, tracker:
                yield
        results.append(
            StageEstimate(
                name, tracker.peak, weights, tracker.to_device, tracker.from_device, counter.get_total_flops()
            )
        )

    def _streaming(self) -> dict:
        streaming = dict(self.config.runtime.vae_streaming)
        if "buffer_device" in streaming:
            streaming["buffer_device"] = HOST
        return streaming

    def run(self, stages: tuple[str, ...] = STAGES) -> list[StageEstimate]:
        config, layout, net = self.config, self.config.layout, self.config.network
        results: list[StageEstimate] = []
        prompts = len(layout.prompt_layers)
        guidance_batch = 2 if config.sampling.guidance_batched else 1
        if "text_encoder" in stages:
            with self._stage("text_encoder", self.t5, results):
                ids = torch.zeros(prompts, TOKENS_PER_PROMPT, dtype=torch.long, device=COMPUTE)  # (n, L)
                states = self.t5(input_ids=ids).last_hidden_state  # (n, L, e)
                del states
        if "vae_encode" in stages and layout.condition is not None:
            height, width = config.video_size
            with self._stage("vae_encode", self.vae, results):
                clip = torch.empty(1, 3, layout.pixel_frames, height, width, dtype=self.dtype, device=COMPUTE)
                latent = self.vae.encode_to_latent(clip, torch.Generator(), **self._streaming())  # (1, c, T, h, w)
                del clip, latent
        latent_shape = (1, layout.latent_frames, net.in_channels, net.latent_height, net.latent_width)
        if "denoise" in stages:
            with self._stage("denoise", self.network, results):
                x = torch.empty(guidance_batch, *latent_shape[1:], dtype=self.dtype, device=COMPUTE)
                text = torch.empty(
                    guidance_batch, prompts * TOKENS_PER_PROMPT, net.text_hidden_size, dtype=self.dtype, device=COMPUTE
                )
                timesteps = torch.zeros(guidance_batch, dtype=torch.long, device=COMPUTE)
                v = self.network(x, timesteps, text)  # (n, T, c, h, w)
                del x, text, v
        if "vae_decode" in stages:
            with self._stage("vae_decode", self.vae, results):
                latent = torch.empty(latent_shape, dtype=self.dtype, device=COMPUTE).permute(0, 2, 1, 3, 4)
                video = self.vae.decode_from_latent(latent, **self._streaming())[0]  # (3, F, H, W)
                video = video.to(COMPUTE).float().clamp(-1, 1)  # as decode_layers, before the copy to the CPU
                del latent, video
        return results


def config_for(task: str, preset: str | None, overrides: list[str]) -> LayerFlowConfig:
    files = [ROOT / "configs" / "model.yaml", ROOT / "configs" / "tasks" / f"{task}.yaml"]
    return load_config([*files, *([preset] if preset else [])], overrides)


def table(rows: list[tuple[str, list[StageEstimate]]]) -> str:
    head = "| config | " + " | ".join(STAGES) + " | largest | to GPU / from GPU (GiB) |"
    lines = [head, "|" + "---|" * (len(STAGES) + 3)]
    for label, stages in rows:
        peaks = {s.name: s.peak_bytes / GIB for s in stages}
        cells = [f"{peaks[name]:.1f}" if name in peaks else "-" for name in STAGES]
        moved = (
            "; ".join(
                f"{s.name} {s.to_device_bytes / GIB:.1f}/{s.from_device_bytes / GIB:.1f}"
                for s in stages
                if s.to_device_bytes or s.from_device_bytes
            )
            or "0"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(peaks.values()):.1f} | {moved} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memory_estimate.py", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", nargs="+", metavar="YAML", help="config files, as for sample_video.py")
    which.add_argument("--all-tasks", action="store_true", help="every configs/tasks/*.yaml (with --preset)")
    parser.add_argument("--preset", metavar="YAML", help="with --all-tasks: a preset merged after each task")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--json", metavar="FILE", help="write the estimates as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.all_tasks:
            tasks = sorted(path.stem for path in (ROOT / "configs" / "tasks").glob("*.yaml"))
            configs = [(task, config_for(task, args.preset, args.set)) for task in tasks]
        else:
            configs = [(Path(args.base[-1]).stem, load_config(args.base, args.set))]
    except ConfigError as error:
        print(f"memory_estimate.py: {error}", file=sys.stderr)
        return 2
    rows = []
    for label, config in configs:
        rows.append((label, Estimator(config).run(tuple(args.stages))))
        print(
            f"{label}: " + ", ".join(f"{s.name} {s.peak_bytes / GIB:.2f} GiB" for s in rows[-1][1]),
            file=sys.stderr,
            flush=True,
        )
    print(table(rows))
    if args.json:
        from layerflow.io.atomic import write_text_atomic

        data = {
            "unit": "GiB = 2**30 bytes; peak allocated on the compute device, estimated (no timings)",
            "configs": {label: [s.as_dict() for s in stages] for label, stages in rows},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
