"""The fixed geometry of CogVideoX-2B as LayerFlow uses it, named once.

Every number that ties pixels, latents, patches and text tokens together lives here, with
checks that say what is wrong when a size does not fit.
"""

from __future__ import annotations

VAE_TEMPORAL_COMPRESSION = 4  # 4 pixel frames -> 1 latent frame (the first frame of an odd clip alone)
VAE_SPATIAL_COMPRESSION = 8  # 8x8 pixels -> 1 latent pixel
LATENT_CHANNELS = 16
PATCH_SIZE = 2  # 2x2 latent pixels -> 1 transformer token
TOKENS_PER_PROMPT = 226  # T5 tokens per layer prompt
VAE_SCALE_FACTOR = 1.15258426  # latent = VAE_SCALE_FACTOR * posterior sample
PIXEL_FRAMES_PER_LAYER = 16  # every layer is a 16-frame sub-clip


def latent_frames_for(pixel_frames: int) -> int:
    """Latent frames the causal VAE makes from a clip: odd counts keep frame 0 alone."""
    if pixel_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {pixel_frames}")
    if pixel_frames % 2 == 1:
        if (pixel_frames - 1) % VAE_TEMPORAL_COMPRESSION:
            raise ValueError(f"an odd clip needs 1 + 4k frames, got {pixel_frames}")
        return 1 + (pixel_frames - 1) // VAE_TEMPORAL_COMPRESSION
    if pixel_frames % VAE_TEMPORAL_COMPRESSION:
        raise ValueError(f"an even clip needs 4k frames, got {pixel_frames}")
    return pixel_frames // VAE_TEMPORAL_COMPRESSION


def pos_embed_frames(num_frames: int) -> int:
    """Latent frames covered by the position table for a config's ``num_frames``."""
    return (num_frames - 1) // VAE_TEMPORAL_COMPRESSION + 1
