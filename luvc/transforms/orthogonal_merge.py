"""Orthogonal Iterative Merging (OIM): shrink each image's grid inside the vision encoder.

LUVC (arXiv 2512.09010), OIM. Between vision-encoder blocks, neighbouring
tokens are merged along one spatial axis, then (at the next step) the other:
within every row (or column), tokens at even positions form set A and tokens at
odd positions set B; each A token is matched to its more similar *adjacent* B
token by the attention keys of the preceding block (ToMe's bipartite soft
matching restricted to neighbours, so a merged token covers a contiguous
region), and the ``r`` best-matching pairs per line are merged by a
size-weighted average. Every line loses the same ``r`` tokens, so each image
stays a rectangle and every later block, and the projector, runs on fewer
tokens.

Choices the paper leaves open, made here:

* Merging acts on whole *units* (the 2x2 blocks Qwen2-VL's patch merger
  consumes): a unit is merged with a neighbouring unit sub-token by sub-token,
  and units are matched by their mean key. The projector therefore always
  receives whole units, and the LLM sees a smaller but regular grid.
* ``r = min(round(ratio * length), length // 2, length - min_size)`` per line.
* A merged token's rotary position is the size-weighted mean of the patch
  positions it covers; its ``size`` (patches it stands for) re-weights every
  later attention exactly as those patches would (the runtime's size-weighted attention:
  a log-size bias under SDPA and eager, the values under FlashAttention).
* Before the first block there are no keys; the patch embeddings themselves
  are the similarity metric there. ``metric: hidden`` uses the last block's
  output instead of its keys everywhere.
* ``axis: alternate`` merges width at the 1st, 3rd, ... occurrence in a
  schedule and height at the 2nd, 4th, ...; frames of a video are merged
  independently (no temporal merging).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.errors import LuvcWarning
from luvc.registry import TransformSpec, hookimpl
from luvc.state import VisionState, round_half_up
from luvc.transforms.merging import ImageTokens, map_images, merge_units


class OIMParams(BaseModel):
    """Parameters of one orthogonal merge step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(
        0.25, gt=0.0, le=0.5, description="fraction of a line's units merged away per step, at most 0.5"
    )
    axis: Literal["alternate", "width", "height"] = Field(
        "alternate", description="which axis shrinks: alternate starts with width and flips at each occurrence"
    )
    min_size: int = Field(2, ge=1, description="never shrink an axis below this many units")
    metric: Literal["keys", "hidden"] = Field(
        "keys", description="what similarity is measured on: the last block's attention keys, or its output"
    )


def merges_per_line(length: int, params: OIMParams) -> int:
    """How many units one line of ``length`` units loses at this step."""
    return max(0, min(round_half_up(params.ratio * length), length // 2, length - params.min_size))


def plan_grid(params: OIMParams, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ``(t, h, w)`` unit grid after one step (``params.axis`` must be bound)."""
    t, h, w = grid
    if params.axis == "width":
        return t, h, w - merges_per_line(w, params)
    return t, h - merges_per_line(h, params), w


def neighbor_merge(
    x: Tensor, metric: Tensor, sizes: Tensor, positions: Tensor, r: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` tokens into an adjacent token in every line.

    Args:
        x: [R, W, U, D] lines of W units of U sub-tokens.
        metric: [R, W, M] similarity features of each unit.
        sizes: [R, W, U] patches each sub-token stands for.
        positions: [R, W, U, 2] mean patch coordinates.
        r: units merged away per line, ``0 <= r <= W // 2``.

    Returns:
        ``(x, sizes, positions)`` with W - r units per line, order kept;
        sum of ``sizes * x`` and of ``sizes`` per line are unchanged.
    """
    lines, width = metric.shape[:2]
    if r == 0:
        return x, sizes, positions
    device = x.device
    a_idx = torch.arange(0, width, 2, device=device)
    m = F.normalize(metric.float(), dim=-1)
    left, right = a_idx - 1, a_idx + 1
    neg_inf = torch.tensor(float("-inf"), device=device)
    sim_left = (m[:, a_idx] * m[:, left.clamp(min=0)]).sum(-1).where(left >= 0, neg_inf)
    sim_right = (m[:, a_idx] * m[:, right.clamp(max=width - 1)]).sum(-1).where(right < width, neg_inf)
    best = torch.maximum(sim_left, sim_right)
    dst = torch.where(sim_right >= sim_left, right, left).expand(lines, -1)
    chosen = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]  # [R, r] into a_idx
    return merge_units(x, sizes, positions, a_idx[chosen], dst.gather(1, chosen))


def orthogonal_merge(state: VisionState, params: OIMParams) -> VisionState:
    """One OIM step over every image of ``state`` along ``params.axis`` (bound)."""
    u = state.unit

    def merge(image: ImageTokens):
        t = image.grid[0]
        x, s, p, k = image.hidden, image.sizes, image.positions, image.metric(params.metric)
        if params.axis == "height":  # lines run down the columns
            x, s, p, k = (v.transpose(1, 2) for v in (x, s, p, k))
        lines = x.shape[0] * x.shape[1]
        r = merges_per_line(x.shape[2], params)
        x, s, p = neighbor_merge(x.reshape(lines, x.shape[2], u, -1), k.reshape(lines, k.shape[2], -1),
                                 s.reshape(lines, -1, u), p.reshape(lines, -1, u, 2), r)
        x = x.reshape(t, -1, x.shape[1], u, x.shape[-1])
        s = s.reshape(t, -1, s.shape[1], u)
        p = p.reshape(t, -1, p.shape[1], u, 2)
        if params.axis == "height":
            x, s, p = (v.transpose(1, 2) for v in (x, s, p))
        return x, s, p, plan_grid(params, image.grid)

    out = map_images(state, merge)
    idle = [grid for grid in state.grids if merges_per_line(grid[2 if params.axis == "width" else 1], params) == 0]
    if idle:
        side = "rows" if params.axis == "width" else "columns"
        warnings.warn(
            f"orthogonal_merge merged nothing along the {side} of {len(idle)} of {len(state.grids)} images (unit grid "
            f"{idle[0][1]}x{idle[0][2]}): with ratio {params.ratio} and min_size {params.min_size}, lines of "
            f"{idle[0][2 if params.axis == 'width' else 1]} units lose none; give it larger images, a larger ratio "
            "or a smaller min_size", LuvcWarning, stacklevel=2)
    return out


def _bind(params: OIMParams, occurrence: int) -> OIMParams:
    if params.axis != "alternate":
        return params
    return params.model_copy(update={"axis": "width" if occurrence % 2 == 0 else "height"})


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("orthogonal_merge", "vision", OIMParams, orthogonal_merge, plan_grid, bind=_bind,
                          needs_keys=lambda params: params.metric == "keys",
                          summary="OIM: merge neighbouring units along rows, then columns, keeping each image a grid")]
