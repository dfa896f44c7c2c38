"""LayerFlow inference: prompts (and given layer videos) in, one video per layer out.

``LayerFlowPipeline.generate`` is a chain of small steps:

1. encode the per-layer prompts with T5 (226 tokens each, concatenated in layout order);
2. stack the given layer videos into one clip, encode it with the VAE and keep the latent frames
   the layout marks as given (they enter the network clean);
3. sample the other latent frames with the VP-SDE DPM-Solver++(2M) sampler and dynamic CFG;
4. put the given latents back, decode the whole stack and split it into layers.

The sampler knows nothing about layers and the network nothing about given layers: step 3 closes
the given latents and the task layout into the denoise function it hands to the sampler
(:func:`conditioned_denoiser`), which puts them in place and keeps the generated frames' output.

Legend: b batch, T latent frames, c latent channels (16), h/w latent size, F pixel frames,
H/W pixel size, L text tokens, e T5 width.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from layerflow.config import LayerFlowConfig, SamplingSection
from layerflow.models.dit import LayerFlowDiT
from layerflow.models.text_encoder import T5TextEncoder, layer_prompt, unconditional_states
from layerflow.models.vae import CausalVideoVAE
from layerflow.runtime.devices import Placement, SpeedPlan, resolve_placement, resolve_speed
from layerflow.runtime.distributed import ensure_model_parallel
from layerflow.runtime.parallel import groups_for
from layerflow.runtime.parallel.guidance import split_guidance_batch
from layerflow.runtime.parallel.vae_decode import decode_arguments
from layerflow.sampling import DynamicCFG, ModelFn, StepCallback, ZeroSNRSchedule, sample_vpsde_dpmpp_2m
from layerflow.tasks import (
    FIRST_FRAME_COPY,
    TaskLayout,
    insert_condition,
    remove_condition,
    split_condition,
    stack_layers,
)
from layerflow.weights.build import build_inference_network, build_text_encoder, build_vae
from layerflow.weights.resolve import Weights, resolve_weights

if TYPE_CHECKING:
    from layerflow.runtime.parallel.ulysses import UlyssesGroup

log = logging.getLogger(__name__)

StageCallback = Callable[[str], None]  # called with a stage's name as it starts (progress display)


class InputError(ValueError):
    """A user input that does not fit the task (one line naming what was expected)."""


@dataclass
class LayerVideos:
    """Decoded layers, each (F, 3, H, W) in [-1, 1], plus what produced them."""

    layers: dict[str, torch.Tensor]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, in the order they ran
    peak_bytes: dict[str, int] = field(default_factory=dict)  # peak allocated per stage (CUDA only; empty on CPU)


class LayerFlowPipeline:
    """Owns the network, text encoder and VAE of one task and runs :meth:`generate`.

    ``placement``, ``weights`` and ``speed`` are the run's decisions (the command line makes them once,
    before any model loads, and passes them down); left out, they are made here from the config.
    """

    def __init__(
        self,
        config: LayerFlowConfig,
        placement: Placement | None = None,
        weights: Weights | None = None,
        speed: SpeedPlan | None = None,
    ):
        self.config = config
        self.layout: TaskLayout = config.layout
        self.placement = placement or resolve_placement(config.runtime)
        self.weights = weights or resolve_weights(config)
        self.groups = groups_for(config.runtime.parallel)  # the other ranks making the same video, if any
        self.speed = speed or resolve_speed(config.runtime, self.placement, config.network.head_dim)
        ensure_model_parallel()  # SAT's layers need its model-parallel group before the network is built
        self.network = self._load_network()
        self.vae = self._load_vae()
        self.text_encoder: T5TextEncoder | None = None
        self.memory: PeakMemory | None = (
            CudaPeakMemory(self.placement.compute_device) if self.placement.compute_device.type == "cuda" else None
        )

    # -- loading -------------------------------------------------------------------------------

    def _load_network(self) -> LayerFlowDiT:
        return build_inference_network(self.config, self.weights, self.placement, self.speed)

    def _load_vae(self) -> CausalVideoVAE:
        return build_vae(self.config, self.placement.storage_device, self.placement.dtype, self.weights)

    def _text_encoder(self) -> T5TextEncoder:
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(self.weights, self.placement.compute_device, self.placement.dtype)
        return self.text_encoder

    # -- the steps -------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Mapping[str, str]) -> torch.Tensor:
        """Prompts by layer name -> text states (1, L, e) in the layout's prompt order."""
        missing = [name for name in self.layout.prompt_layers if not prompts.get(name, "").strip()]
        if missing:
            raise InputError(
                f"{self.layout.name} needs a prompt for each of {list(self.layout.prompt_layers)}; "
                f"missing or empty: {missing}"
            )
        encoder = self._text_encoder()
        if encoder.width != self.config.network.text_hidden_size:
            raise InputError(
                f"{self.weights.text_encoder}: T5 width {encoder.width} does not match "
                f"model.network.text_hidden_size {self.config.network.text_hidden_size}"
            )
        for index, name in enumerate(self.layout.prompt_layers):
            count = encoder.token_count(layer_prompt(index, prompts[name]))
            if count > encoder.max_length:
                log.warning(
                    "the %s prompt has %d T5 tokens; only the first %d are used (the rest is cut): %.60s...",
                    name,
                    count,
                    encoder.max_length - 1,
                    prompts[name],
                )
        keep = self.config.runtime.keep_text_encoder
        states = encoder.encode_layers([prompts[name] for name in self.layout.prompt_layers], keep=keep)  # (1, L, e)
        if not keep:
            self.text_encoder = None
        return states.to(self.placement.compute_device, self.placement.dtype)

    def stack_given_layers(self, given: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Given layer videos (F_layer, 3, H, W) -> the stacked clip (1, 3, F, H, W) the VAE encodes
        (:func:`stack_given_layers`)."""
        return stack_given_layers(given, self.layout, self.config.video_size)

    def encode_given_layers(self, given: Mapping[str, torch.Tensor], seed: int) -> torch.Tensor:
        """Clean latents of the given frames (1, T_cond, c, h, w), scaled like the engine's."""
        clip = self.stack_given_layers(given)
        generator = torch.Generator().manual_seed(seed)
        vae = self.vae
        with self.placement.on_compute(vae):
            clip = clip.to(self.placement.compute_device, self.placement.dtype)
            latent = vae.encode_to_latent(clip, generator, **self.config.runtime.vae_streaming)  # (1, c, T, h, w)
        latent = latent.permute(0, 2, 1, 3, 4)  # (1, T, c, h, w)
        if latent.shape[1] != self.layout.latent_frames:
            raise InputError(
                f"{self.layout.name}: the stacked clip gave {latent.shape[1]} latent frames, "
                f"expected {self.layout.latent_frames}"
            )
        return split_condition(latent, self.layout).to(self.placement.compute_device, self.placement.dtype)

    def sample_latents(
        self,
        context: torch.Tensor,
        condition: torch.Tensor | None,
        seed: int,
        on_step: StepCallback | None = None,
        sampling: SamplingSection | None = None,
    ) -> torch.Tensor:
        """Denoise the generated frames: (1, T_gen, c, h, w). Seeds the global generator like the original."""
        sampling = sampling or self.config.sampling
        layout, net = self.layout, self.config.network
        shape = (1, layout.generated_frames, net.in_channels, net.latent_height, net.latent_width)
        torch.manual_seed(seed)
        noise = torch.randn(shape).to(self.placement.compute_device)
        uncond = unconditional_states(context)
        network = self.network
        model_fn = conditioned_denoiser(
            network, layout, condition, lora_scale=sampling.lora_scale, sequence_parallel=self.groups.ulysses
        )
        batched = sampling.guidance_batched
        if self.groups.layout.cfg == 2:  # each rank of the guidance pair runs one half of the batch
            model_fn, batched = split_guidance_batch(model_fn, self.groups.cfg_index, self.groups.cfg_group), True

        schedule = ZeroSNRSchedule(num_steps=sampling.num_steps)
        guidance = DynamicCFG(scale=sampling.guidance_scale, exponent=sampling.guidance_exponent)
        with self.placement.on_compute(network):
            return sample_vpsde_dpmpp_2m(
                model_fn,
                noise,
                context,
                uncond,
                schedule,
                guidance,
                faithful_rng=sampling.faithful_rng,
                batched_guidance=batched,
                callback=on_step,
            )

    def decode_layers(self, generated: torch.Tensor, condition: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Generated (1, T_gen, c, h, w) + given latents -> {layer: (F_layer, 3, H, W) in [-1, 1]}."""
        full = insert_condition(generated, condition, self.layout) if condition is not None else generated
        streaming = self.config.runtime.vae_streaming  # region sizes, CPU memory beyond the device budget
        chunking = decode_arguments(streaming, full.shape[1], self.groups)  # regions dealt out over the group
        vae = self.vae
        with self.placement.on_compute(vae):
            latent = full.permute(0, 2, 1, 3, 4).to(self.placement.compute_device, self.placement.dtype)
            video = vae.decode_from_latent(latent, **chunking)[0]  # (3, F, H, W)
        video = video.float().clamp(-1, 1).permute(1, 0, 2, 3).cpu()  # (F, 3, H, W)
        return {
            span.name: video[span.pixel_start : span.pixel_stop]
            for span in self.layout.spans
            if span.name != FIRST_FRAME_COPY
        }

    @torch.no_grad()
    def generate(
        self,
        prompts: Mapping[str, str],
        given: Mapping[str, torch.Tensor] | None = None,
        seed: int | None = None,
        on_step: StepCallback | None = None,
        sampling: SamplingSection | None = None,
        on_stage: StageCallback | None = None,
    ) -> LayerVideos:
        """Run the whole chain for one sample (``sampling`` overrides the config's); see the module docstring.

        ``on_step`` is called after each denoising step, ``on_stage(name)`` as each stage starts
        (``text_encoder``, ``vae_encode``, ``denoise``, ``vae_decode``: the keys of ``timings``).
        """
        seed = self.config.sampling.seed if seed is None else seed
        timings: dict[str, float] = {}
        peaks: dict[str, int] = {}
        clock = _StageClock(self.placement, timings, peaks, self.memory, on_stage)
        with clock("text_encoder"):
            context = self.encode_prompts(prompts)
        condition = None
        if self.layout.condition is not None:
            with clock("vae_encode"):
                condition = self.encode_given_layers(given or {}, seed)
        elif given:
            raise InputError(f"{self.layout.name} generates every layer; it takes no given layer video")
        with clock("denoise"):
            generated = self.sample_latents(context, condition, seed, on_step, sampling)
        with clock("vae_decode"):
            layers = self.decode_layers(generated, condition)
        return LayerVideos(layers=layers, seed=seed, timings=timings, peak_bytes=peaks)


def stack_given_layers(
    given: Mapping[str, torch.Tensor], layout: TaskLayout, video_size: tuple[int, int]
) -> torch.Tensor:
    """Given layer videos (F_layer, 3, H, W) -> the stacked clip (1, 3, F, H, W) the VAE encodes.

    Layers the user does not give are filled with a copy of the first given layer; with the
    causal VAE only frames before the given latents can influence them. ``video_size`` is (H, W).
    """
    unknown = sorted(set(given) - set(layout.given_layers))
    absent = [name for name in layout.given_layers if name not in given]
    if unknown or absent:
        raise InputError(
            f"{layout.name} takes the layers {list(layout.given_layers)}; missing {absent}, not used {unknown}"
        )
    height, width = video_size
    filler = given[layout.given_layers[0]]
    layers = {}
    for span in layout.spans:
        if span.name == FIRST_FRAME_COPY:
            continue
        video = given.get(span.name, filler)
        if tuple(video.shape) != (span.pixel_frames, 3, height, width):
            raise InputError(
                f"layer {span.name}: expected frames of shape "
                f"{(span.pixel_frames, 3, height, width)}, got {tuple(video.shape)}"
            )
        layers[span.name] = video
    return stack_layers(layers, layout)  # (1, 3, F, H, W)


def conditioned_denoiser(
    network: LayerFlowDiT,
    layout: TaskLayout,
    condition: torch.Tensor | None,
    *,
    lora_scale: float = 0,
    sequence_parallel: UlyssesGroup | None = None,
) -> ModelFn:
    """The sampler's ``model_fn(x, timesteps, text) -> v`` for the generated frames x (n, T_gen, c, h, w).

    The clean latents of the given layers, ``condition`` (1 or n, T_cond, c, h, w), go in at the place
    the layout names; the network predicts every frame of the stack and the given frames' predictions
    are dropped. With no given layer (``layout.condition`` is None) x is the whole stack.
    """
    if (condition is None) != (layout.condition is None):
        raise ValueError(f"{layout.name}: given latents {'missing' if condition is None else 'not used'}")

    def model_fn(x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = network.dtype
        x = x.to(dtype)
        if condition is not None:
            given = condition.to(dtype).expand(x.shape[0], *condition.shape[1:])  # (n, T_cond, c, h, w)
            x = insert_condition(x, given, layout)  # (n, T, c, h, w)
        v = network(x, timesteps, text, lora_scale=lora_scale, sequence_parallel=sequence_parallel)  # (n, T, ...)
        return remove_condition(v, layout).float()  # (n, T_gen, c, h, w)

    return model_fn


class PeakMemory(Protocol):
    """Where :class:`_StageClock` reads peak memory: ``reset()`` starts a stage, ``peak()`` is its high-water mark."""

    def reset(self) -> None: ...

    def peak(self) -> int: ...


class CudaPeakMemory:
    """Peak bytes allocated by PyTorch's caching allocator on one CUDA device since the last reset.

    The reset lowers the mark to what is allocated at that moment, so a stage's peak includes the
    models and tensors that stay resident through it.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class _StageClock:
    """``with clock("name"):`` records the seconds of a stage, waiting for the GPU at both ends, and,
    given a memory source, the stage's peak allocated bytes (the mark is reset when a stage starts);
    ``on_stage(name)`` is told when it starts."""

    def __init__(
        self,
        placement: Placement,
        timings: dict[str, float],
        peaks: dict[str, int] | None = None,
        memory: PeakMemory | None = None,
        on_stage: StageCallback | None = None,
    ):
        self.placement = placement
        self.timings = timings
        self.peaks = peaks if peaks is not None else {}
        self.memory = memory
        self.on_stage = on_stage

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.on_stage is not None:
            self.on_stage(name)
        self.placement.synchronize()
        if self.memory is not None:
            self.memory.reset()
        start = time.perf_counter()
        yield
        self.placement.synchronize()
        self.timings[name] = time.perf_counter() - start
        if self.memory is not None:
            self.peaks[name] = self.memory.peak()
