"""Control: 2-D average pooling of each image's token grid.

The simplest spatial compression: every ``stride_h x stride_w`` block of
units becomes one unit (sub-token by sub-token, size-weighted, so
proportional attention stays exact); edges that do not divide are pooled over
what is there. Placed at the vision tower's exit (``at: 1.0``) it is plain
downsampling of the features the LLM receives; plain pooling is known to beat
several published methods on text-heavy inputs, so every comparison shows it.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from luvc.registry import TransformSpec, hookimpl
from luvc.state import VisionState
from luvc.transforms.merging import ImageTokens, map_images


class PoolParams(BaseModel):
    """Parameters of one pooling step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stride: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        (2, 2), description="[height, width] units pooled into one, each at least 1, e.g. [2, 2]")


def plan_grid(params: PoolParams, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    t, h, w = grid
    return t, math.ceil(h / params.stride[0]), math.ceil(w / params.stride[1])


def uniform_pool(state: VisionState, params: PoolParams) -> VisionState:
    """Average-pool every image's unit grid by ``stride``."""
    sh, sw = params.stride
    if (sh, sw) == (1, 1):
        return state
    def pool(image: ImageTokens):
        t, h, w = image.grid
        dim = image.hidden.shape[-1]
        weight = image.sizes.float()[..., None]
        values = torch.cat([image.hidden.float() * weight, image.positions * weight, weight], dim=-1)
        H, W = math.ceil(h / sh), math.ceil(w / sw)
        values = F.pad(values, (0, 0, 0, 0, 0, W * sw - w, 0, H * sh - h))
        pooled = values.reshape(t, H, sh, W, sw, state.unit, -1).sum(dim=(2, 4))
        sizes = pooled[..., -1]
        hidden = (pooled[..., :dim] / sizes[..., None]).to(state.hidden.dtype)
        return hidden, sizes, pooled[..., dim:dim + 2] / sizes[..., None], (t, H, W)

    return map_images(state, pool)


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("uniform_pool", "vision", PoolParams, uniform_pool, plan_grid,
                          summary="control: 2-D average pooling of each image's unit grid (size-weighted)")]
