"""Every built-in config builds, and the released-geometry configs give the released visual-token counts."""

from __future__ import annotations

import pytest

from luvc.models import find_adapter
from luvc.zoo import CONFIGS, build_model

#: Tokens per image (per tile) each released model's tower makes: the point of the *-tiny geometry configs.
RELEASED_TOKENS = {"llava-336-tiny": 576, "internvl-448-tiny": 256, "idefics3-364-tiny": 169,
                   "gemma3-896-tiny": 256, "llava-onevision-384-tiny": 729}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_builds_and_has_an_adapter(name):
    model = build_model(name, device="meta")
    grid, unit = find_adapter(model).input_grid(model, 448, 448)
    assert grid[0] * grid[1] * grid[2] > 0 and unit >= 1


@pytest.mark.parametrize("name", sorted(RELEASED_TOKENS))
def test_released_geometry_gives_the_released_token_count(name):
    model = build_model(name, device="meta")
    (t, h, w), _ = find_adapter(model).input_grid(model, 448, 448)
    assert t * h * w == RELEASED_TOKENS[name]
