"""VisionZip: keep the dominant visual tokens and merge the rest into a few contextual tokens.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025 (arXiv 2412.04467). At the vision encoder's
output: *dominant* tokens are those receiving the most attention in the last
block (from the class token where there is one, otherwise on average); of the
rest, every ``R // C``-th token becomes a *contextual* target, each other
remaining token is assigned to its most key-similar target, and a contextual
token is its target plus the mean of the tokens assigned to it. Dominant
tokens come first in their original order, contextual tokens after them.

How luvc reads it:

* Place it at the vision tower's exit (``at: 1.0``); the block before it
  reports the attention each token received (recomputed from that block's
  queries and keys, so any attention kernel works) and its keys.
* Whole units are kept or merged (Qwen2-VL's 2x2 merger still gets 4-token
  groups); a unit's score is its sub-tokens' mean; frames of a video are
  handled independently.
* ``keep`` is the fraction of units kept in all, ``contextual`` the share of
  those that are contextual (VisionZip's 54 + 10 of 576 is keep 0.111,
  contextual 0.16). The image stops being a grid: the LLM sees its tokens as
  one row, each at the M-RoPE position of the cell it comes from (a
  contextual token: its size-weighted centre), as the reference keeps the
  position ids of the tokens it keeps; LLaVA's 1-D positions are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.errors import CompileError
from luvc.registry import TransformSpec, hookimpl
from luvc.state import VisionState, round_half_up
from luvc.transforms.merging import ImageTokens, map_images


class VisionZipParams(BaseModel):
    """Parameters of VisionZip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(gt=0.0, le=1.0, description="fraction of each frame's units kept (dominant + contextual)")
    contextual: float = Field(0.16, ge=0.0, lt=1.0, description="share of the kept units that are contextual")


def split_counts(n: int, params: VisionZipParams) -> tuple[int, int]:
    """``(dominant, contextual)`` units kept of a frame of ``n`` units."""
    kept = max(1, min(n, round_half_up(params.keep * n)))
    contextual = min(round_half_up(params.contextual * kept), kept - 1)
    return kept - contextual, contextual


def plan_grid(params: VisionZipParams, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    t, h, w = grid
    return t, 1, sum(split_counts(h * w, params))


def zip_frame(x: Tensor, sizes: Tensor, positions: Tensor, scores: Tensor, keys: Tensor, dominant: int,
              contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """One frame: ``x`` [n, U, D], ``sizes`` [n, U], ``positions`` [n, U, 2], unit ``scores`` [n] and ``keys``
    [n, M] -> the dominant units in order, then the contextual units."""
    n = x.shape[0]
    top = scores.argsort(descending=True, stable=True)[:dominant].sort().values
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[top] = False
    rest_idx = rest.nonzero()[:, 0]
    out_x, out_s, out_p = [x[top]], [sizes[top]], [positions[top]]
    if contextual and len(rest_idx):
        step = max(1, len(rest_idx) // contextual)
        targets = rest_idx[::step][:contextual]
        others = rest_idx[~torch.isin(rest_idx, targets)]
        unit = F.normalize(keys.float(), dim=-1)
        assigned = (unit[others] @ unit[targets].T).argmax(dim=1) if len(others) else others
        counts = torch.bincount(assigned, minlength=len(targets)).clamp(min=1).to(x.dtype)
        summed = torch.zeros_like(x[targets]).index_add_(0, assigned, x[others])
        has = torch.bincount(assigned, minlength=len(targets)) > 0
        out_x.append(x[targets] + summed / counts[:, None, None] * has[:, None, None])
        weight = sizes.float()[..., None]
        moved_s = torch.zeros_like(sizes[targets]).index_add_(0, assigned, sizes[others])
        moved_p = torch.zeros_like(positions[targets]).index_add_(0, assigned, positions[others] * weight[others])
        new_s = sizes[targets] + moved_s
        out_p.append((positions[targets] * weight[targets] + moved_p) / new_s[..., None])
        out_s.append(new_s)
    return torch.cat(out_x), torch.cat(out_s), torch.cat(out_p)


def visionzip(state: VisionState, params: VisionZipParams) -> VisionState:
    """Dominant plus contextual units of every frame of every image."""
    if state.attention is None or state.keys is None:
        raise CompileError("visionzip needs the attention and keys of the vision block before it; "
                           "place it after a block (at: 1.0 runs it at the tower's exit)")

    def zip_image(image: ImageTokens):
        t, h, w = image.grid
        frame = (t, h * w)
        x = image.hidden.reshape(*frame, state.unit, -1)
        s, p = image.sizes.reshape(*frame, state.unit), image.positions.reshape(*frame, state.unit, 2)
        scores = image.attention.reshape(*frame, state.unit).mean(dim=2)
        keys = image.metric().reshape(*frame, -1)
        dominant, contextual = split_counts(h * w, params)
        frames = [zip_frame(x[f], s[f], p[f], scores[f], keys[f], dominant, contextual) for f in range(t)]
        return (*(torch.cat([fr[i] for fr in frames]) for i in range(3)), (t, 1, dominant + contextual))

    return map_images(state, zip_image, as_rows=True)


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("visionzip", "vision", VisionZipParams, visionzip, plan_grid, needs_layer=True,
                          summary="VisionZip: dominant units by encoder attention plus merged contextual units "
                                  "(vision exit)")]
