"""Every adapter's examples build, and the released-geometry ones give the released visual-token counts."""

from __future__ import annotations

import pytest

from luvc.examples import build_model, examples
from luvc.models import find_adapter

#: Tokens per image (per tile) each released model's tower makes: the point of the *-tiny geometry configs.
RELEASED_TOKENS = {"llava-336-tiny": 576, "internvl-448-tiny": 256, "idefics3-364-tiny": 169,
                   "gemma3-896-tiny": 256, "llava-onevision-384-tiny": 729}


@pytest.mark.parametrize("name", sorted(examples()))
def test_every_config_builds_and_has_an_adapter(name):
    model = build_model(name, device="meta")
    grid, unit = find_adapter(model).input_grid(model, 448, 448)
    assert grid[0] * grid[1] * grid[2] > 0 and unit >= 1


@pytest.mark.parametrize("name", sorted(RELEASED_TOKENS))
def test_released_geometry_gives_the_released_token_count(name):
    model = build_model(name, device="meta")
    (t, h, w), _ = find_adapter(model).input_grid(model, 448, 448)
    assert t * h * w == RELEASED_TOKENS[name]


def test_example_inputs_come_from_the_family_adapter(astronaut):
    from luvc.examples import model_config, vlm_inputs

    config = model_config("gemma3-tiny")
    inputs = vlm_inputs([[astronaut]], config=config)
    assert (inputs["token_type_ids"] == (inputs["input_ids"] == config.image_token_id)).all()
    assert inputs["input_ids"][0].tolist().count(config.image_token_id) == config.image_seq_length


def test_an_unknown_example_name_suggests_the_closest():
    from luvc.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="did you mean 'qwen2-vl-tiny'"):
        build_model("qwen2-vl-tinny")
