"""The prepare step: VAE- and T5-encode every training sample once, so training steps run neither.

The cache folder holds one file per sample and an index::

    <cache>/index.json                  format, fingerprint (task, variant, sizes, encoders), sample files
    <cache>/samples/<id>-<digest>.pt    posterior mean and std (T, c, h, w), text states (L, e)

Mean and std are stored multiplied by the VAE scale factor, so each training step draws a fresh
latent ``mean + std * eps`` from the posterior, as the original does with its cached VAE moments.
The digest covers the sample's prompts and input paths: an edited manifest line is encoded anew.
Files are written atomically and never through a link below the cache folder (or below
``training.save`` for the default ``<save>/cache``); an interrupted prepare resumes where it stopped,
a full disk stops it with one line, and a cache made for another task, size or encoder is refused
with one line. Under torchrun rank r encodes
samples r, r+N, ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layerflow.io import links
from layerflow.io.atomic import atomic_path, save_torch, write_text_atomic
from layerflow.runtime import distributed
from layerflow.runtime.devices import resolve_placement
from layerflow.training.config import TrainConfig
from layerflow.training.dataset import SampleError, TrainingSample, stack_clip
from layerflow.weights.build import build_text_encoder, build_vae
from layerflow.weights.resolve import resolve_weights

log = logging.getLogger(__name__)

CACHE_FORMAT = "layerflow-training-cache-1"
INDEX_FILE = "index.json"
SAMPLES_DIR = "samples"
WHERE = "training.cache"  # the setting a user changes when something is in the way (named in messages)


class CacheError(ValueError):
    """A cache that does not belong to this config, or a missing/corrupt cache file (one line)."""


@dataclass(frozen=True)
class CachedSample:
    """One encoded sample, in CPU memory."""

    id: str
    mean: torch.Tensor  # (T, c, h, w)
    std: torch.Tensor  # (T, c, h, w)
    context: torch.Tensor  # (L, e)
    still: bool  # from the manifest: still clips switch the motion LoRA on


def fingerprint(config: TrainConfig) -> dict:
    """What the encodings depend on; a cache made with other values cannot be used."""
    net, weights = config.network, resolve_weights(config, check=False)
    return {
        "task": config.layout.name,
        "latent_frames": config.layout.latent_frames,
        "latent_size": [net.latent_height, net.latent_width],
        "text_length": net.text_length,
        "text_width": net.text_hidden_size,
        "vae": "random" if weights.random else str(Path(weights.vae).resolve()),
        "text_encoder": str(weights.text_encoder.resolve()),
    }


def sample_digest(sample: TrainingSample) -> str:
    """What a sample's encodings depend on besides the config: its prompts and input files."""
    blob = json.dumps({"prompts": dict(sample.prompts), "inputs": dict(sample.inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _root(config: TrainConfig) -> Path:
    """The folder the user named, below which the cache follows no link: ``training.cache``, else ``training.save``."""
    return Path(config.training.cache or config.training.save)


def _sample_path(cache: Path, sample: TrainingSample) -> Path:
    return cache / SAMPLES_DIR / f"{sample.id}-{sample_digest(sample)}.pt"


def _check_no_links(config: TrainConfig) -> None:
    """Before anything is encoded: the cache's folders are real folders (made if missing), its index no link."""
    root, cache = _root(config), config.training.cache_dir
    with links.folder(root, (cache / SAMPLES_DIR).relative_to(root), create=True, where=WHERE):
        pass
    links.refuse_link(cache / INDEX_FILE, WHERE)


def _check_index(cache: Path, expected: dict) -> None:
    index = cache / INDEX_FILE
    if not index.is_file():
        return
    try:
        found = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CacheError(f"{index}: unreadable cache index ({error})") from None
    if found.get("format") != CACHE_FORMAT or found.get("fingerprint") != expected:
        differ = sorted(k for k in expected if found.get("fingerprint", {}).get(k) != expected[k])
        raise CacheError(
            f"{index}: this cache was made for another config (differs in {differ}); use another training.cache folder"
        )


@torch.no_grad()
def prepare_cache(config: TrainConfig, samples: Sequence[TrainingSample], show_progress: bool = False) -> Path:
    """Encode this rank's share of ``samples`` that are not cached yet; rank 0 writes the index.

    Raises :class:`SampleError` for the first bad sample (after every rank finished its share).
    """
    cache = config.training.cache_dir
    expected = fingerprint(config)
    _check_no_links(config)
    _check_index(cache, expected)
    rank, world = distributed.rank(), distributed.world_size()
    todo = [s for s in samples[rank::world] if not _sample_path(cache, s).is_file()]
    error: SampleError | None = None
    if todo:
        placement = resolve_placement(config.runtime)
        device, dtype = placement.compute_device, placement.dtype
        weights = resolve_weights(config, check=False)
        vae = build_vae(config, device, dtype, weights)  # the sampling pipeline's VAE, the same tiny one
        encoder = build_text_encoder(weights, device, dtype)
        layout, scale = config.layout, config.model.vae.scale_factor
        for number, sample in enumerate(todo, start=1):
            try:
                clip = stack_clip(sample, layout, config.video_size)  # (1, 3, F, H, W)
                posterior = vae.posterior(clip.to(device, dtype))
                mean = posterior.mean[0].permute(1, 0, 2, 3).float().cpu()  # (T, c, h, w)
                if mean.shape[0] != layout.latent_frames:
                    raise SampleError(f"{sample.where}: {mean.shape[0]} latent frames, expected {layout.latent_frames}")
                std = posterior.std[0].permute(1, 0, 2, 3).float().cpu()
                context = encoder.encode_layers([sample.prompts[name] for name in layout.prompt_layers])[0]
            except SampleError as failure:
                error = failure
                break
            record = {"mean": mean * scale, "std": std * scale, "context": context.float().cpu().contiguous()}
            size = sum(value.numel() * value.element_size() for value in record.values())
            with atomic_path(
                _sample_path(cache, sample), within=_root(config), where=WHERE, expected_bytes=size
            ) as tmp:
                save_torch(record, tmp)
            if show_progress:
                print(f"prepare: {number}/{len(todo)} samples encoded on rank {rank}", file=sys.stderr, flush=True)
    failed = distributed.sum_over_ranks(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise SampleError(f"{failed} rank(s) met a bad sample while preparing {cache}; see their errors")
    if distributed.is_main_process():
        index = {
            "format": CACHE_FORMAT,
            "fingerprint": expected,
            "samples": [_sample_path(cache, s).name for s in samples],
        }
        write_text_atomic(cache / INDEX_FILE, json.dumps(index, indent=2) + "\n", _root(config), WHERE)
    distributed.sum_over_ranks(0)  # every rank waits until the index is written
    return cache


class LatentCache:
    """Read access to a prepared cache, checked against the config and the manifest's samples."""

    def __init__(self, config: TrainConfig, samples: Sequence[TrainingSample]):
        self.folder = config.training.cache_dir
        index = self.folder / INDEX_FILE
        if not index.is_file():
            raise CacheError(f"{index}: missing; run the prepare step first (train_video.py --prepare-only)")
        _check_index(self.folder, fingerprint(config))
        absent = [s.id for s in samples if not _sample_path(self.folder, s).is_file()]
        if absent:
            raise CacheError(
                f"{self.folder}: samples {absent[:5]} of the manifest are not cached (or changed since); "
                f"rerun the prepare step"
            )
        self.samples = list(samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, position: int) -> CachedSample:
        sample = self.samples[position]
        path = _sample_path(self.folder, sample)
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            return CachedSample(sample.id, record["mean"], record["std"], record["context"], sample.still)
        except (OSError, RuntimeError, KeyError, EOFError) as error:
            raise CacheError(
                f"{path}: unreadable cached sample {sample.id} ({error}); delete it and rerun the prepare step"
            ) from None
