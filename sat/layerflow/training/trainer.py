"""The training loop: data-parallel over ranks, reproducible from (seed, step), resumable.

Every step is a function of the seed and the step number only, never of the rank count:

* the sample order is a fresh permutation of the cache per epoch (``seed``, epoch);
* the global batch of step s is the positions ``s*G ... s*G + G - 1`` of that stream, with
  G = batch_size x grad_accumulation x ranks; rank r takes its micro-batches from it;
* each sample's random draws (posterior latent, prompt dropout, timestep, noise, in the order
  the original draws them) come from a generator seeded by (seed, step, position).

So 1 rank with batch 2 and 2 ranks with batch 1 train on the same data with the same noise, and a
resumed run continues exactly where the killed one stopped. Gradients are averaged over ranks
with one all-reduce per optimizer step (plain ``torch.distributed``; see the README for why not
DeepSpeed ZeRO-2), clipped by global norm, and applied with AdamW.

Legend: b batch, T latent frames, T_gen generated frames, c channels, h/w latent size, L text tokens,
e text width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from layerflow.geometry import TOKENS_PER_PROMPT
from layerflow.io import links
from layerflow.io.atomic import append_text, write_text_atomic
from layerflow.models.dit import LayerFlowDiT
from layerflow.runtime import distributed
from layerflow.runtime.devices import Placement, resolve_placement
from layerflow.sampling import DDPM_STEPS
from layerflow.training.cache import CachedSample, LatentCache
from layerflow.training.checkpointing import (
    WHERE,
    load_resume_state,
    remove_stale_staging,
    run_identity,
    save_checkpoint,
)
from layerflow.training.config import TrainConfig
from layerflow.training.dataset import TrainingSample
from layerflow.training.loss import NoisedBatch, diffusion_loss
from layerflow.training.params import describe_trainable, load_checkpoint_weights, select_trainable
from layerflow.weights import build
from layerflow.weights.resolve import resolve_weights

TRAIN_LOG_FILE = "train_log.jsonl"

log = logging.getLogger("layerflow.training")

StepCallback = Callable[[dict], None]


def draw_seed(*parts: object) -> int:
    """A 63-bit seed from integers, the same on every machine and rank."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(draw_seed(seed, "order", epoch)))


def sample_position(
    step: int, micro: int, rank: int, index: int, batch_size: int, world: int, accumulation: int
) -> int:
    """Position in the sample stream of item ``index`` of rank ``rank``'s micro-batch ``micro`` at ``step``."""
    global_batch = batch_size * world * accumulation
    return step * global_batch + micro * batch_size * world + rank * batch_size + index


@dataclass
class SampleDraws:
    """One sample's random draws for one step."""

    latents: torch.Tensor  # (T, c, h, w)
    context: torch.Tensor  # (L, e)
    timestep: int
    noise: torch.Tensor  # (T_gen, c, h, w)


def draw_sample(sample: CachedSample, seed: int, text_dropout: float, generated_frames: int) -> SampleDraws:
    """Posterior latent, prompt dropout, timestep and noise from one generator, in the original's order."""
    generator = torch.Generator().manual_seed(seed)
    latents = sample.mean + sample.std * torch.randn(sample.mean.shape, generator=generator)  # (T, c, h, w)
    prompts = sample.context.shape[0] // TOKENS_PER_PROMPT
    keep = torch.bernoulli(torch.full((prompts,), 1.0 - text_dropout), generator=generator)  # (prompts,)
    context = sample.context * keep.repeat_interleave(TOKENS_PER_PROMPT)[:, None]  # (L, e)
    timestep = int(torch.randint(0, DDPM_STEPS, (1,), generator=generator))
    noise = torch.randn((generated_frames, *sample.mean.shape[1:]), generator=generator)  # (T_gen, c, h, w)
    return SampleDraws(latents, context, timestep, noise)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_network(config: TrainConfig, load_weights: bool = True) -> tuple[LayerFlowDiT, list[str]]:
    """The float32 network with the chosen groups trainable (names returned) and, with ``load_weights``,
    its starting weights (a resumed run fills it from its checkpoint instead)."""
    distributed.ensure_model_parallel()  # SAT's layers need its model-parallel group
    network = build.build_network(config, load=False)
    if load_weights:
        load_starting_weights(network, config)
    trainable = select_trainable(network, config.training.trainable, config.training.layers)
    return network, trainable


def load_starting_weights(network: LayerFlowDiT, config: TrainConfig) -> None:
    """Seeded random weights or the release checkpoint, as sampling loads them, or CogVideoX-2B SAT
    weights (``training.init: cogvideox``: LoRA and layer embedding start fresh)."""
    weights = resolve_weights(config, check=False)
    if weights.random or config.training.init == "release":
        build.load_weights(network, config, weights)
    else:
        load_checkpoint_weights(network, weights.checkpoint, config.training.init, config.layout)


def _place(network: LayerFlowDiT, placement: Placement) -> None:
    """Frozen weights in the run dtype (bfloat16 on GPU), trainable ones in float32, all on the device."""
    with torch.no_grad():
        for param in network.parameters():
            if not param.requires_grad:
                param.data = param.data.to(placement.dtype)
    network.to(placement.compute_device)


class Trainer:
    """One training run; :meth:`run` trains from the last checkpoint in ``training.save`` (if any) on."""

    def __init__(self, config: TrainConfig, samples: list[TrainingSample], show_progress: bool = True):
        self.config = config
        self.training = config.training
        self.layout = config.layout
        self.placement = resolve_placement(config.runtime)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.cache = LatentCache(config, samples)
        self.save_dir = Path(self.training.save)
        self.show_progress = show_progress and distributed.is_main_process()
        self.network, self.trainable_names = build_network(config, load_weights=False)
        self.identity = run_identity(config, self.trainable_names, self.world)
        log.info("%s trainable: %s", self.layout.name, describe_trainable(self.network, self.training.trainable))
        resume = load_resume_state(self.save_dir, self.identity)
        self.start_step = 0 if resume is None else resume.step
        if resume is None:
            load_starting_weights(self.network, config)
        else:
            self.network.load_state_dict(resume.model, strict=True)
        _place(self.network, self.placement)
        self.network.transformer.checkpoint_activations = self.training.gradient_checkpointing
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.training.learning_rate,
            betas=tuple(self.training.betas),
            eps=self.training.eps,
            weight_decay=self.training.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        if resume is not None:
            self.optimizer.load_state_dict(resume.optimizer)
            self.scheduler.load_state_dict(resume.scheduler)
        self.history: list[dict] = []

    def _lr_lambda(self, step: int) -> float:
        t = self.training
        return lr_factor(step, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr_ratio)

    # -- one step ---------------------------------------------------------------------------------

    def micro_batch(self, step: int, micro: int) -> NoisedBatch:
        """This rank's micro-batch ``micro`` of optimizer step ``step``, on the compute device."""
        t, size = self.training, len(self.cache)
        draws, scales = [], []
        for index in range(t.batch_size):
            position = sample_position(step, micro, self.rank, index, t.batch_size, self.world, t.grad_accumulation)
            sample = self.cache.load(int(epoch_order(t.seed, position // size, size)[position % size]))
            draws.append(
                draw_sample(sample, draw_seed(t.seed, step, position), t.text_dropout, self.layout.generated_frames)
            )
            scales.append(t.still_lora_scale if sample.still else 0.0)
        device = self.placement.compute_device
        return NoisedBatch(
            latents=torch.stack([d.latents for d in draws]).to(device),  # (b, T, c, h, w)
            context=torch.stack([d.context for d in draws]).to(device),  # (b, L, e)
            timesteps=torch.tensor([d.timestep for d in draws], device=device),  # (b,)
            noise=torch.stack([d.noise for d in draws]).to(device),  # (b, T_gen, c, h, w)
            lora_scale=torch.tensor(scales, device=device),  # (b,)
        )

    def _autocast(self):
        device = self.placement.compute_device
        enabled = self.placement.dtype != torch.float32
        return torch.autocast(device_type=device.type, dtype=self.placement.dtype, enabled=enabled)

    def train_step(self, step: int) -> dict:
        """Forward, backward, all-reduce, clip and update for optimizer step ``step``; returns its log record."""
        t = self.training
        self.network.train()
        losses = []
        for micro in range(t.grad_accumulation):
            batch = self.micro_batch(step, micro)
            with self._autocast():
                per_sample = diffusion_loss(self.network, batch, self.layout)  # (b,)
            (per_sample.mean() / t.grad_accumulation).backward()
            losses.append(per_sample.detach().float())
        self._average_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._global_mean(torch.cat(losses))
        return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}

    def _average_gradients(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()

    def _global_mean(self, values: torch.Tensor) -> float:
        total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, on_step: StepCallback | None = None) -> list[dict]:
        """Train from the resumed step to ``training.steps``, saving every ``save_interval`` steps and at the end."""
        t = self.training
        if distributed.is_main_process():
            self.save_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_staging(self.save_dir)
            if removed:
                log.info("removed leftovers of a run killed while saving: %s", ", ".join(removed))
            self._drop_logged_steps_after(self.start_step)
        writer = self._tensorboard()
        bar = tqdm(
            total=t.steps,
            initial=self.start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.show_progress,
        )
        samples_per_step = t.batch_size * t.grad_accumulation * self.world
        try:
            for step in range(self.start_step, t.steps):
                start = time.perf_counter()
                record = self.train_step(step)
                self.placement.synchronize()
                record["samples_per_s"] = samples_per_step / (time.perf_counter() - start)
                self.history.append(record)
                self._log(record, writer, bar)
                iteration = step + 1
                if iteration % t.save_interval == 0 or iteration == t.steps:
                    self._save(iteration)
                if on_step is not None:
                    on_step(record)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.history

    def _save(self, iteration: int) -> None:
        if distributed.is_main_process():
            save_checkpoint(
                self.save_dir,
                iteration,
                self.network,
                self.optimizer,
                self.scheduler,
                self.identity,
                keep=self.training.keep_checkpoints,
            )
            log.info("saved iteration %d to %s", iteration, self.save_dir)
        if self.world > 1:
            dist.barrier()

    def _drop_logged_steps_after(self, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint; they are redone, so forget them."""
        text = links.read_text(self.save_dir, TRAIN_LOG_FILE, WHERE)  # a link there is refused
        if text is None:
            return
        kept = [line for line in text.splitlines() if _logged_step(line) <= step]
        write_text_atomic(self.save_dir / TRAIN_LOG_FILE, "".join(line + "\n" for line in kept), self.save_dir, WHERE)

    def _tensorboard(self):
        """The TensorBoard writer; ``purge_step`` hides the steps a killed run logged after its checkpoint."""
        if not (self.training.tensorboard and distributed.is_main_process()):
            return None
        from torch.utils.tensorboard import SummaryWriter

        with links.folder(self.save_dir, "tensorboard", create=True, where=WHERE):  # a real folder, not a link
            pass
        return SummaryWriter(log_dir=str(self.save_dir / "tensorboard"), purge_step=self.start_step + 1)

    def _log(self, record: dict, writer, bar: tqdm) -> None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.2f}"
        )
        if not distributed.is_main_process():
            return
        if writer is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s"):
                writer.add_scalar(f"train/{key}", record[key], record["step"])
        if record["step"] % self.training.log_interval == 0:
            log.info(
                "step %d loss %.6f lr %.3e samples/s %.2f",
                record["step"],
                record["loss"],
                record["lr"],
                record["samples_per_s"],
            )
            append_text(self.save_dir, TRAIN_LOG_FILE, json.dumps(record) + "\n", WHERE)


def _logged_step(line: str) -> float:
    """The step of a ``train_log.jsonl`` line; a line torn by a kill (or not a record) counts as never logged."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf
