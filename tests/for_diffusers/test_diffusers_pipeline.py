"""LayerFlowPipeline (diffusers) from an exported tiny folder against our pipeline, for the same seed.

The noise matches because both draw the same stream: ours seeds the global generator with the seed and
draws the starting noise, then every step's noise; the diffusers pipeline draws the same tensors in the
same order from ``generator=torch.Generator().manual_seed(seed)``. The given layers' posterior sample
draws from a copy of that generator as it comes in, as ours draws it from a fresh generator of the seed.
"""

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("diffusers")

from layerflow.for_diffusers import sat_state_from_transformer  # noqa: E402
from layerflow.for_diffusers.export import export_to_diffusers  # noqa: E402
from layerflow.for_diffusers.pipeline import LayerFlowPipeline  # noqa: E402
from layerflow.for_diffusers.vae_keys import vae_from_diffusers  # noqa: E402
from layerflow.io.pixels import layer_to_alpha  # noqa: E402
from layerflow.models.dit import LayerFlowDiT  # noqa: E402
from layerflow.pipeline import InputError  # noqa: E402
from layerflow.pipeline import LayerFlowPipeline as OurPipeline  # noqa: E402
from layerflow.tasks import LAYOUTS, remove_condition, split_condition  # noqa: E402
from layerflow.weights.checkpoint import NETWORK_PREFIX, save_safetensors  # noqa: E402

STEPS, SEED = 3, 11
LATENT_TOLERANCE = 1e-4
# the foreground/background-conditioned cases encode a 64/65-frame clip with both VAEs: over 10 s on a busy CPU
CONFIGS = [
    pytest.param(layout.name, marks=[pytest.mark.slow] if layout.given_layers and layout.task.value != "seg" else [])
    for layout in LAYOUTS.values()
]


def given_layers(layout, video_size, seed=5):
    height, width = video_size
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(layout.span(name).pixel_frames, 3, height, width, generator=generator) * 2 - 1
        for name in layout.given_layers
    }


def prompts_for(layout):
    return {name: f"a {name} layer, in the video" for name in layout.prompt_layers}


class Case:
    """Our tiny pipeline (seeded random weights) and the diffusers pipeline exported from its network."""

    def __init__(self, name, folder):
        self.config = tiny_config(name, f"sampling.num_steps={STEPS}")
        self.ours = OurPipeline(self.config)
        self.layout = self.config.layout
        checkpoint = folder / "network.safetensors"
        state = {NETWORK_PREFIX + key: value for key, value in self.ours.network.state_dict().items()}
        save_safetensors(state, checkpoint, self.layout)
        export_to_diffusers(self.config, checkpoint, folder / "exported")
        self.pipe = LayerFlowPipeline.from_pretrained(folder / "exported")
        self.pipe.set_progress_bar_config(disable=True)
        self.given = given_layers(self.layout, self.config.video_size) if self.layout.condition else None

    def our_latents(self):
        with torch.no_grad():
            context = self.ours.encode_prompts(prompts_for(self.layout))
            condition = self.ours.encode_given_layers(self.given, SEED) if self.given else None
            return self.ours.sample_latents(context, condition, SEED), condition

    def run(self, **kwargs):
        options = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent")
        return self.pipe(prompts_for(self.layout), given=self.given, **{**options, **kwargs})


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = Case(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.mark.parametrize("name", CONFIGS)
def test_final_latents_equal_ours(cases, name):
    case = cases(name)
    ours, condition = case.our_latents()
    out = case.run()
    assert out.layers == {}
    assert out.latents.shape[1] == case.layout.latent_frames
    generated = remove_condition(out.latents, case.layout)
    assert generated.shape == ours.shape
    assert (generated - ours).abs().max() <= LATENT_TOLERANCE
    if condition is not None:
        assert (split_condition(out.latents, case.layout) - condition).abs().max() <= LATENT_TOLERANCE
    other = case.run(generator=torch.Generator().manual_seed(SEED + 1))
    assert (remove_condition(other.latents, case.layout) - ours).abs().max() > 1e-2, "the generator decides the noise"


@pytest.mark.slow
def test_layers_decode_like_ours_with_alpha_on_the_foreground(cases):
    case = cases("gen_rgba")
    ours, _ = case.our_latents()
    with torch.no_grad():
        reference = case.ours.decode_layers(ours, None)  # {layer: (F, 3, H, W) in [-1, 1]}
    out = case.run(output_type="np")
    assert set(out.layers) == {"fg", "bg", "blend"}
    for name in ("bg", "blend"):
        decoded = torch.from_numpy(out.layers[name]).permute(0, 3, 1, 2) * 2 - 1  # (F, 3, H, W)
        assert (decoded - reference[name]).abs().max() <= LATENT_TOLERANCE
    fg = torch.from_numpy(out.layers["fg"])  # (F, H, W, 4)
    assert fg.shape[-1] == 4
    assert (fg[..., 3] - layer_to_alpha(reference["alpha"])[:, 0]).abs().max() <= LATENT_TOLERANCE


def test_callback_sees_every_step_and_may_change_the_latents(cases):
    case = cases("gen_rgb")
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    out = case.run(callback_on_step_end=callback)
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == case.pipe.scheduler.timesteps.tolist()
    assert torch.count_nonzero(out.latents) == 0


def test_round_trip_to_ours_loads_strictly(cases):
    case = cases("fg2bg_rgba")
    state = sat_state_from_transformer(case.pipe.transformer)
    network = LayerFlowDiT(case.config.network)
    network.load_state_dict(state, strict=True)
    for key, value in case.ours.network.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key
    vae = vae_from_diffusers(case.pipe.vae)
    for key, value in case.ours.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key


def test_bad_inputs_are_one_line(cases):
    case = cases("gen_rgb")
    with pytest.raises(InputError, match=r"missing or empty: \['blend'\]"):
        case.pipe({"fg": "a", "bg": "b"}, num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(InputError, match="takes no given layer"):
        case.pipe(prompts_for(case.layout), given={"fg": torch.zeros(1)}, num_inference_steps=STEPS)
    with pytest.raises(InputError, match="output_type"):
        case.pipe(prompts_for(case.layout), num_inference_steps=STEPS, output_type="pil")


def test_model_cpu_offload_gives_the_same_latents(cases):
    """diffusers' offload hooks (model_cpu_offload_seq) on the CPU as the execution device: same result."""
    case = cases("gen_rgb")
    plain = case.run().latents
    case.pipe.enable_model_cpu_offload(device="cpu")
    try:
        offloaded = case.run().latents
        assert all(hasattr(getattr(case.pipe, name), "_hf_hook") for name in ("text_encoder", "transformer", "vae"))
    finally:
        case.pipe.remove_all_hooks()
    assert torch.equal(offloaded, plain)


@pytest.mark.slow
def test_vae_tiling_goes_through_diffusers_tiled_decode(cases):
    """With ``pipe.vae.enable_tiling()`` the layers are diffusers' tiled decode of the whole stack (in time at once)."""
    from layerflow.for_diffusers.vae_keys import whole_clip

    case = cases("gen_rgb")
    height, width = case.config.video_size
    # tiles of 3/4 of each side with 1/3 overlap cover the tiny 64x96 frame exactly (diffusers' tiling arithmetic)
    case.pipe.vae.enable_tiling(height * 3 // 4, width * 3 // 4, 1 / 3, 1 / 3)
    try:
        out = case.run(output_type="pt")
        vae = case.pipe.vae
        latent = out.latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor  # (1, c, T, h, w)
        with torch.no_grad(), whole_clip(vae, case.layout.pixel_frames, case.layout.latent_frames):
            tiled = vae.tiled_decode(latent).sample[0].clamp(-1, 1).permute(1, 0, 2, 3)  # (F, 3, H, W)
        with torch.no_grad():
            one_call = case.ours.decode_layers(out.latents, None)
    finally:
        case.pipe.vae.disable_tiling()
    span = case.layout.span("blend")
    expected = (tiled[span.pixel_start : span.pixel_stop] + 1) / 2
    assert out.layers["blend"].shape == expected.shape == (span.pixel_frames, 3, height, width)
    assert (out.layers["blend"] - expected).abs().max() <= 1e-5  # 1/s x or x/s: rounding
    assert ((out.layers["blend"] * 2 - 1) - one_call["blend"]).abs().max() > 1e-4, (
        "tiles blend: not the one-call decode"
    )
