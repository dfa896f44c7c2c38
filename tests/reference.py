"""Readers for the reference fixtures: every size comes from the files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layerflow.models.dit import DiTConfig
from layerflow.models.lora import LoraConfig
from layerflow.models.vae import VAEConfig
from layerflow.tasks import TaskLayout, get_layout


def case_config(case_dir: Path) -> dict:
    return json.loads((case_dir / "config.json").read_text())


def case_layout(case_dir: Path) -> TaskLayout:
    task, variant = case_config(case_dir)["case"].split("_")
    return get_layout(task, variant)


def case_dit_config(case_dir: Path) -> DiTConfig:
    """The tiny network of a fixture case, from its config.json."""
    config = case_config(case_dir)
    sizes, options = config["sizes"], config["options"]
    lora = options["lora"]
    return DiTConfig(
        num_frames=sizes["num_frames"],
        text_length=config["text"]["text_length"],
        hidden_size=sizes["hidden_size"],
        num_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        time_embed_dim=sizes["time_embed_dim"],
        text_hidden_size=sizes["text_hidden_size"],
        in_channels=sizes["in_channels"],
        out_channels=sizes["out_channels"],
        patch_size=sizes["patch_size"],
        latent_height=sizes["latent_height"],
        latent_width=sizes["latent_width"],
        learnable_txt_embed=options["learnable_txt_embed"],
        learnable_pos_embed=options["learnable_pos_embed"],
        height_interpolation=options["height_interpolation"],
        width_interpolation=options["width_interpolation"],
        qk_ln=options["qk_ln"],
        elementwise_affine=options["elementwise_affine"],
        lora=LoraConfig(
            motion_r=lora["motion_r"],
            spatial_r=lora["spatial_r"],
            lora_alpha=lora["lora_alpha"],
            is_switch=lora["is_switch"],
            is_stage1=lora["is_stage1"],
        ),
    )


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def batch_major_context(context: torch.Tensor, batch: int) -> torch.Tensor:
    """(b*n, 226, e) batch-major, as the reference passes it -> (b, n*226, e)."""
    n = context.shape[0] // batch
    return context.reshape(batch, n * context.shape[1], context.shape[2])


def vae_config_from_json(path: Path) -> VAEConfig:
    """The VAE sizes of a fixture's ``vae.json`` (the original's encoder and decoder ``params``)."""
    data = json.loads(Path(path).read_text())
    encoder, decoder = data["encoder"]["params"], data["decoder"]["params"]
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels"):
        assert encoder[key] == decoder[key], f"{path}: encoder and decoder differ in {key}"
    return VAEConfig(
        ch=encoder["ch"],
        ch_mult=tuple(encoder["ch_mult"]),
        num_res_blocks=encoder["num_res_blocks"],
        z_channels=encoder["z_channels"],
        in_channels=encoder["in_channels"],
        out_channels=decoder["out_ch"],
        temporal_compress_times=encoder.get("temporal_compress_times", 4),
        encoder_gather_norm=bool(encoder.get("gather_norm", False)),
        decoder_gather_norm=bool(decoder.get("gather_norm", False)),
        scale_factor=data["scale_factor_used_by_engine"],
    )
