"""The task layout table: round trips and agreement with what the reference recorded."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_cases
from reference import case_config, case_layout

from layerflow.geometry import latent_frames_for
from layerflow.tasks import LAYOUTS, Task, Variant, insert_condition, remove_condition, split_condition

CONDITIONAL = [layout for layout in LAYOUTS.values() if layout.condition is not None]


@pytest.mark.parametrize("layout", CONDITIONAL, ids=lambda layout: layout.name)
def test_insert_then_remove_gives_back_the_generated_frames(layout):
    generated = torch.randn(2, layout.generated_frames, 3, 2, 2)
    condition = torch.randn(2, layout.condition_frames, 3, 2, 2)
    full = insert_condition(generated, condition, layout)
    assert full.shape[1] == layout.latent_frames
    assert torch.equal(split_condition(full, layout), condition)
    assert torch.equal(remove_condition(full, layout), generated)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=lambda layout: layout.name)
def test_spans_tile_the_clip_and_match_the_vae_frame_rule(layout):
    spans = layout.spans
    assert spans[0].latent_start == 0 and spans[0].pixel_start == 0
    for left, right in zip(spans, spans[1:], strict=False):
        assert left.latent_stop == right.latent_start and left.pixel_stop == right.pixel_start
    assert latent_frames_for(layout.pixel_frames) == layout.latent_frames


@pytest.mark.parametrize("case", reference_cases())
def test_layout_matches_the_recorded_reference_layout(reference_dir, case):
    """Layer ranges, condition range, generated ranges and prompts as the reference recorded them."""
    frames = case_config(reference_dir / case)["frames"]
    layout = case_layout(reference_dir / case)
    recorded = {name: tuple(r) for name, r in frames["latent_frame_ranges_per_layer"].items()}
    ours = {
        ("first_frame_copy" if s.name == "first_frame_copy" else s.name): (s.latent_start, s.latent_stop)
        for s in layout.spans
    }
    assert ours == recorded
    assert layout.latent_frames == frames["latent_frames_total"]
    assert layout.pixel_frames == frames["pixel_frames_into_vae"]
    assert layout.repeats_first_frame == frames["first_pixel_frame_duplicated_before_vae"]
    recorded_cond = frames.get("cond_latent_range")
    assert layout.condition == (tuple(recorded_cond) if recorded_cond else None)
    assert layout.generated_frames == frames.get("n_generated_latent_frames", frames["latent_frames_total"])
    prefixes = [p.split("+")[0].strip().strip("'\"") for p in frames["prompts_in_order"]]
    assert len(prefixes) == len(layout.prompt_layers)
    for k, name in enumerate(layout.prompt_layers):
        assert f"{name}_prompt" in frames["prompts_in_order"][k]
        assert prefixes[k] == f"{k}, "


def test_given_inputs_follow_the_layer_table():
    for layout in LAYOUTS.values():
        rgba = layout.variant.value == "rgba"
        given = {g.layer: g for g in layout.given_inputs}
        assert set(given) == set(layout.given_layers) - {"alpha"}
        for name, rule in given.items():
            assert rule.pixel_frames == layout.span(name).pixel_frames
            assert rule.needs_alpha == rule.takes_mask == (rgba and name == "fg")
        assert ("mask" in layout.accepted_inputs) == (rgba and "fg" in given)
        assert layout.check_input_names(set(given)) == ([], [])
        assert layout.check_input_names({"alpha", *given}) == ([], ["alpha"]), "alpha comes with the fg file"


def test_a_layer_is_its_short_name_in_every_use():
    """Layer members meet code that still says "fg": equal, same hash, and shown as fg in text and JSON."""
    import json

    from layerflow.tasks import Layer

    assert Layer.FG == "fg" and {"fg": 1}[Layer.FG] == 1 and {Layer.BG: 2}["bg"] == 2
    assert f"{Layer.BLEND}.txt" == "blend.txt" and str(Layer.ALPHA) == "alpha"
    assert json.dumps({Layer.FG: [Layer.BG]}) == '{"fg": ["bg"]}'
    assert f"takes {[Layer.FG, Layer.BG]}" == "takes ['fg', 'bg']"  # messages read as before
    layout = LAYOUTS[(Task.DECOMPOSITION, Variant.RGBA)]
    names = layout.video_layers + layout.prompt_layers + layout.given_layers
    assert set(names) <= set(Layer) and all(type(name) is str for name in names)  # the table's data: plain names


def test_layer_videos_keyed_by_the_layout_load_with_weights_only(tmp_path):
    layout = LAYOUTS[(Task.FOREGROUND_TO_BACKGROUND, Variant.RGBA)]
    torch.save({span.name: torch.zeros(1) for span in layout.spans}, tmp_path / "layers.pt")
    assert list(torch.load(tmp_path / "layers.pt", weights_only=True)) == [
        "first_frame_copy",
        "fg",
        "alpha",
        "bg",
        "blend",
    ]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=lambda layout: layout.name)
def test_each_task_config_points_at_its_release_folder(layout):
    import yaml
    from conftest import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "configs" / "tasks" / f"{layout.name}.yaml").read_text())
    assert config["model"]["checkpoint"] == f"ckpts_2b_lora/{layout.release_folder}"
    assert layout.release_folder in layout.download and layout.download.startswith("https://")
