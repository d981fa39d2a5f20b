"""ToMe: bipartite soft matching merges between vision-encoder blocks, size-weighted.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv
2210.09461). Tokens alternate into sets A and B; each A token finds its most
similar B token (cosine of the attention keys, mean over heads); the ``r``
best-matched A tokens are merged into their partners by a size-weighted
average, and later attention is weighted by token size (proportional
attention).

How luvc reads it:

* It runs between blocks on the keys the previous block computed (ToMe
  merges inside each block, after attention and before the MLP); before the
  first block the patch embeddings are the metric.
* Whole *units* merge (the 2x2 blocks Qwen2-VL's merger consumes), matched by
  their mean key, so the projector still gets whole units; frames of a video
  are merged independently; a class token is never merged.
* ``r = min(round(ratio * n), n // 2, n - min_size)`` units per frame.
* Surviving tokens keep their original order (the reference orders them
  ``[unmerged A, B]``). The image stops being a grid: the LLM sees each image
  as one row of tokens, each at the M-RoPE position of the cell holding its
  size-weighted centre (LLaVA's 1-D positions are unaffected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import TransformSpec, hookimpl
from luvc.state import VisionState, round_half_up
from luvc.transforms.merging import ImageTokens, map_images, merge_units


class ToMeParams(BaseModel):
    """Parameters of one ToMe step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0.0, le=0.5, description="fraction of each frame's units merged away at this step")
    min_size: int = Field(1, ge=1, description="never leave a frame with fewer units than this")


def merges(n: int, params: ToMeParams) -> int:
    """Units a frame of ``n`` units loses at this step."""
    return max(0, min(round_half_up(params.ratio * n), n // 2, n - params.min_size))


def plan_grid(params: ToMeParams, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    t, h, w = grid
    return t, 1, h * w - merges(h * w, params)


def bipartite_pairs(metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(src, dst)`` [L, r]: the ``r`` even-indexed units best matched to an odd-indexed one, per line."""
    lines, width = metric.shape[:2]
    if r == 0:
        empty = torch.zeros(lines, 0, dtype=torch.long, device=metric.device)
        return empty, empty
    a_idx = torch.arange(0, width, 2, device=metric.device)
    b_idx = torch.arange(1, width, 2, device=metric.device)
    m = F.normalize(metric.float(), dim=-1)
    similarity = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # [L, |A|, |B|]
    best, partner = similarity.max(dim=-1)
    chosen = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
    return a_idx[chosen], b_idx[partner.gather(1, chosen)]


def tome(state: VisionState, params: ToMeParams) -> VisionState:
    """One ToMe step over every frame of every image."""
    def merge(image: ImageTokens):
        t, h, w = image.grid
        frame = (t, h * w)
        r = merges(h * w, params)
        src, dst = bipartite_pairs(image.metric().reshape(*frame, -1), r)
        x, s, p = merge_units(image.hidden.reshape(*frame, state.unit, -1), image.sizes.reshape(*frame, state.unit),
                              image.positions.reshape(*frame, state.unit, 2), src, dst)
        return x, s, p, (t, 1, h * w - r)

    return map_images(state, merge, as_rows=True)


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("tome", "vision", ToMeParams, tome, plan_grid, needs_keys=lambda params: True,
                          summary="ToMe: bipartite soft matching merges of whole units between vision blocks, "
                                  "size-weighted")]
