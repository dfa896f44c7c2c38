"""``LayerFlowPipeline``: a diffusers ``DiffusionPipeline`` that runs one LayerFlow task from an exported folder.

    pipe = LayerFlowPipeline.from_pretrained("exported/gen_rgba")
    out = pipe({"fg": "...", "bg": "...", "blend": "..."}, generator=torch.Generator().manual_seed(0))
    out.layers["fg"]  # (F, H, W, 4) in [0, 1]: the foreground with its alpha

The steps are ours (:mod:`layerflow.pipeline`), on diffusers components: the prompts are prefixed and
encoded per layer by T5 (:class:`~layerflow.models.text_encoder.T5TextEncoder` over the pipeline's
tokenizer and encoder); the given layers are stacked by the task layout and encoded by the VAE; the
sampler's model function is :func:`layerflow.pipeline.conditioned_denoiser` (the given latents enter
clean, their predictions are dropped); guidance and the update are :func:`layerflow.sampling.guided_v`
and :class:`~layerflow.for_diffusers.scheduler.LayerFlowDPMScheduler`; the stack is decoded in one call
and split into layers by the layout.

Random numbers, so that ``generator=torch.Generator().manual_seed(s)`` gives ``sample_video.py``'s latents
for seed s (on the CPU): the posterior sample of the given layers draws from a copy of the generator as
it comes in (ours uses a fresh generator seeded s), then the starting noise and every step's noise draw
from the generator itself, in our sampler's order (ours: ``torch.manual_seed(s)``, the global stream).
With ``generator=None`` everything draws from the global generator (call ``torch.manual_seed`` first).

Legend: b batch, T latent frames (T_gen generated, T_cond given), c latent channels, h/w latent size,
F pixel frames, H/W pixel size, L text tokens, e T5 width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX, DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import T5EncoderModel, T5Tokenizer

from layerflow.for_diffusers import save_transformer, set_motion_scale
from layerflow.for_diffusers.lora import load_adapters
from layerflow.for_diffusers.scheduler import LayerFlowDPMScheduler
from layerflow.for_diffusers.vae_keys import whole_clip
from layerflow.geometry import TOKENS_PER_PROMPT
from layerflow.io.pixels import layer_to_alpha, unmatte_foreground
from layerflow.models.text_encoder import T5TextEncoder, unconditional_states
from layerflow.pipeline import InputError, conditioned_denoiser, stack_given_layers
from layerflow.sampling import guided_v
from layerflow.tasks import FIRST_FRAME_COPY, Layer, TaskLayout, get_layout, insert_condition, split_condition

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class LayerFlowPipelineOutput(BaseOutput):
    """``layers``: fg (with alpha in RGBA), bg, blend, each (F, H, W, C) numpy or (F, C, H, W) torch in [0, 1]
    (empty for ``output_type="latent"``); ``latents``: the whole stack (1, T, c, h, w), given latents in place."""

    layers: dict[str, np.ndarray | torch.Tensor]
    latents: torch.Tensor


class DiffusersNetwork:
    """The diffusers transformer with our network's call, ``network(x, timesteps, text) -> v``, for
    :func:`layerflow.pipeline.conditioned_denoiser`."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, **_) -> torch.Tensor:
        # x (n, T, c, h, w), timesteps (n,), text (n, L, e) -> v (n, T, c, h, w)
        return self.transformer(hidden_states=x, encoder_hidden_states=text, timestep=timesteps, return_dict=False)[0]


def set_lora_scale(transformer: torch.nn.Module, scale: float) -> None:
    """The motion-LoRA switch (``sampling.lora_scale``) on a transformer exported with its adapters."""
    if getattr(transformer, "peft_config", None):
        set_motion_scale(transformer, scale)
    elif scale:
        raise InputError("lora_scale needs the transformer's LoRA adapters (this one has none)")


class LayerFlowPipeline(DiffusionPipeline):
    """One LayerFlow task and variant (``task``, ``variant`` in the pipeline config) on diffusers components."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        transformer: torch.nn.Module,
        vae: AutoencoderKLCogVideoX,
        scheduler: LayerFlowDPMScheduler,
        task: str = "gen",
        variant: str = "rgb",
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.register_to_config(task=str(task), variant=str(variant))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading of a local folder, then the transformer's content and motion LoRA adapters
        attached from its folder (content on, motion off), as :func:`layerflow.for_diffusers.load_transformer` does."""
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "transformer" not in kwargs:
            load_adapters(pipeline.transformer, Path(pretrained_model_name_or_path) / "transformer")
        return pipeline

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Each component into its folder (the transformer and its LoRA adapters by our writer,
        :func:`layerflow.for_diffusers.save_transformer`) and ``model_index.json``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
            getattr(self, name).save_pretrained(folder / name)
        save_transformer(self.transformer, folder / "transformer")
        self.save_config(folder)

    @property
    def layout(self) -> TaskLayout:
        return get_layout(self.config.task, self.config.variant)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def video_size(self) -> tuple[int, int]:
        """(H, W) pixels of the transformer's latent grid."""
        config = self.transformer.config
        return config.sample_height * self.spatial_compression, config.sample_width * self.spatial_compression

    # -- the steps -------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Mapping[str, str]) -> torch.Tensor:
        """Prompts by layer name -> text states (1, L, e) in the layout's prompt order (226 tokens each)."""
        layout = self.layout
        missing = [name for name in layout.prompt_layers if not str(prompts.get(name, "")).strip()]
        unknown = sorted(set(prompts) - set(layout.prompt_layers))
        if missing or unknown:
            raise InputError(
                f"{layout.name} needs a prompt for each of {list(layout.prompt_layers)}; "
                f"missing or empty: {missing}, not used: {unknown}"
            )
        encoder = T5TextEncoder(
            self.tokenizer, self.text_encoder, self.text_encoder.device, Path("text_encoder"), TOKENS_PER_PROMPT
        )
        return encoder.encode_layers([prompts[name] for name in layout.prompt_layers])  # (1, L, e)

    def encode_given_layers(
        self, given: Mapping[str, torch.Tensor], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Given layer videos (F_layer, 3, H, W) in [-1, 1] -> their clean latents (1, T_cond, c, h, w), scaled."""
        layout = self.layout
        clip = stack_given_layers(given, layout, self.video_size)  # (1, 3, F, H, W)
        vae = self.vae
        with whole_clip(vae, layout.pixel_frames, layout.latent_frames):
            posterior = vae.encode(clip.to(device, vae.dtype)).latent_dist
        sample = posterior.mean + posterior.std * self._posterior_noise(posterior.mean, generator)
        latent = (vae.config.scaling_factor * sample).permute(0, 2, 1, 3, 4)  # (1, T, c, h, w)
        if latent.shape[1] != layout.latent_frames:
            raise InputError(
                f"{layout.name}: the stacked clip gave {latent.shape[1]} latent frames, expected {layout.latent_frames}"
            )
        return split_condition(latent, layout)

    @staticmethod
    def _posterior_noise(mean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """eps of the posterior sample: from a copy of ``generator`` (its stream is left for the sampler)."""
        if generator is None:
            return torch.randn(mean.shape, dtype=mean.dtype).to(mean.device)
        copy = torch.Generator(device=generator.device)
        copy.set_state(generator.get_state())
        return torch.randn(mean.shape, generator=copy, device=generator.device, dtype=mean.dtype).to(mean.device)

    def prepare_latents(
        self, generator: torch.Generator | None, device: torch.device, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """The starting noise of the generated frames (1, T_gen, c, h, w) in float32 (drawn on the CPU by default)."""
        config = self.transformer.config
        shape = (1, self.layout.generated_frames, config.in_channels, config.sample_height, config.sample_width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise InputError(f"latents must have shape {shape} for {self.layout.name}, got {tuple(latents.shape)}")
            return latents.to(device, torch.float32)
        where = generator.device if generator is not None else "cpu"
        return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)

    def decode_layers(self, full: torch.Tensor, output_type: str) -> dict[str, np.ndarray | torch.Tensor]:
        """The whole stack (1, T, c, h, w) -> {layer: video in [0, 1]}; fg gets the alpha layer as a 4th channel."""
        vae = self.vae
        latent = (1.0 / vae.config.scaling_factor) * full.permute(0, 2, 1, 3, 4).to(vae.dtype)  # (1, c, T, h, w)
        with whole_clip(vae, self.layout.pixel_frames, latent.shape[2]):
            video = vae.decode(latent).sample[0]  # (3, F, H, W)
        video = video.float().clamp(-1, 1).permute(1, 0, 2, 3).cpu()  # (F, 3, H, W) in [-1, 1]
        spans = {span.name: span for span in self.layout.spans if span.name != FIRST_FRAME_COPY}
        layers = {name: video[span.pixel_start : span.pixel_stop] for name, span in spans.items()}
        if Layer.ALPHA in layers:
            alpha = layer_to_alpha(layers.pop(Layer.ALPHA))  # (F, 1, H, W) in [0, 1]
            rgb = unmatte_foreground(layers[Layer.FG], alpha)  # straight colour (F, 3, H, W)
            layers[Layer.FG] = torch.cat([rgb, 2 * alpha - 1], dim=1)  # (F, 4, H, W)
        unit = {name: (frames + 1) / 2 for name, frames in layers.items()}
        if output_type == "pt":
            return unit
        return {name: frames.permute(0, 2, 3, 1).numpy() for name, frames in unit.items()}  # (F, H, W, C)

    # -- the call ---------------------------------------------------------------------------------

    def check_inputs(self, given: Mapping[str, torch.Tensor] | None, output_type: str, num_inference_steps: int):
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if self.layout.condition is None and given:
            raise InputError(f"{self.layout.name} generates every layer; it takes no given layer video")
        if self.layout.condition is not None and not given:
            raise InputError(f"{self.layout.name} needs the given layers {list(self.layout.given_layers)}")
        if not 2 <= num_inference_steps <= self.scheduler.config.num_train_timesteps:
            raise InputError(f"num_inference_steps must be from 2 to 1000, got {num_inference_steps}")

    @torch.no_grad()
    def __call__(
        self,
        prompts: Mapping[str, str],
        given: Mapping[str, torch.Tensor] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        lora_scale: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
    ) -> LayerFlowPipelineOutput | tuple:
        """Run the task: ``prompts`` by layer (fg, bg[, blend]), ``given`` layer videos (F_layer, 3, H, W) in
        [-1, 1] for fg2bg (fg, and alpha in RGBA), bg2fg (bg) and seg (blend); see the module docstring.

        ``guidance_scale`` is the dynamic CFG scale (6 as the release), ``lora_scale`` the motion-LoRA
        switch (0 as the release); ``callback_on_step_end(pipe, i, t, {"latents": x})`` may return new latents.
        """
        self.check_inputs(given, output_type, num_inference_steps)
        device = self._execution_device
        layout = self.layout

        # 1. text states per layer, and the zero states of the unconditional pass
        context = self.encode_prompts(prompts).to(device, self.transformer.dtype)  # (1, L, e)
        uncond = unconditional_states(context)

        # 2. the given layers' clean latents (they enter the transformer as they are)
        condition = self.encode_given_layers(given, generator, device) if layout.condition is not None else None

        # 3. noise, schedule and the model function of the generated frames
        x = self.prepare_latents(generator, device, latents)  # (1, T_gen, c, h, w)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        weights = self.scheduler.guidance_weights(guidance_scale)
        set_lora_scale(self.transformer, lora_scale)
        model_fn = conditioned_denoiser(DiffusersNetwork(self.transformer), layout, condition)

        # 4. denoise
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(self.scheduler.timesteps):
                timestep = t.to(device=device, dtype=torch.float32).reshape(1)
                v_uncond, v_cond = guided_v(model_fn, x, timestep, context, uncond, batched=True)
                v = v_uncond + weights[i] * (v_cond - v_uncond)
                x = self.scheduler.step(v, t, x, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    named = {"latents": x}
                    changed = callback_on_step_end(
                        self, i, t, {name: named[name] for name in callback_on_step_end_tensor_inputs}
                    )
                    x = (changed or {}).get("latents", x)
                progress.update()

        # 5. the whole stack, decoded and split into layers
        full = insert_condition(x, condition.float(), layout) if condition is not None else x  # (1, T, c, h, w)
        layers = {} if output_type == "latent" else self.decode_layers(full, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return layers, full
        return LayerFlowPipelineOutput(layers=layers, latents=full)
