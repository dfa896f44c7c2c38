"""Loading the CogVideoX VAE checkpoint (``CogVideoX-2b-sat/vae/3d-vae.pt``) into :class:`CausalVideoVAE`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from layerflow.models.vae import CausalVideoVAE, VAEConfig
from layerflow.weights.checkpoint import load_pickled_tensors


class VAECheckpointError(ValueError):
    """A VAE checkpoint that cannot be read or does not fit the model."""


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_vae(
    path: str | Path,
    config: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CausalVideoVAE:
    """Load ``{'state_dict': {...}}`` (e.g. CogVideoX-2b-sat/vae/3d-vae.pt) strictly into a CausalVideoVAE.

    Keys starting with ``loss`` (the training discriminator) are dropped, as the original drops them; any
    other unknown key, a missing key or a wrong shape raises VAECheckpointError naming them. The file is
    read with ``weights_only=True``, so a pickle that would run code is refused. Stored tensors may share
    storage; each is cloned. The model comes back in eval mode with gradients off.
    """
    path = Path(path)
    config = config or VAEConfig.cogvideox_2b()
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    checkpoint = load_pickled_tensors(path, VAECheckpointError)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise VAECheckpointError(f"{path}: expected a dict {{'state_dict': {{...}}}} as in CogVideoX vae/3d-vae.pt")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss")}

    with torch.device("meta"):
        model = CausalVideoVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VAECheckpointError(
            f"{path}: does not fit the config ({config.ch=}, {config.num_res_blocks=}): "
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise VAECheckpointError(f"{path}: {key} is not a floating-point tensor")
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise VAECheckpointError(f"{path}: wrong shapes: {_listing(wrong)}")
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
