"""DART: keep the visual tokens least duplicated by a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More" (DART), EMNLP 2025 (arXiv 2502.11494).
Before decoder layer K (default 2): pick pivot tokens, the ``pivots`` visual
tokens and ``pivots`` text tokens after the image with the largest L1 key
norm; then, pivot by pivot, take the remaining visual tokens *least* similar
(cosine of hidden states) to that pivot; keep the visual pivots plus the
tokens taken. No attention weights at all.

How luvc reads it: keys and normalised hidden states come from the layer the
pruned sequence enters (its ``input_layernorm`` and post-rotary ``k_proj``;
the paper's code uses layer K-1's keys and the final norm). The count is exact,
``round(keep * n)`` including the visual pivots (the official code overshoots
by the pivot count); each pivot takes an equal share, the first ones one more
when it does not divide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import AttentionProbe, TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.selection import keep_count, prune_visual, pruning_spec


class DARTParams(BaseModel):
    """Parameters of a DART cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(ge=0.0, le=1.0, description="fraction of arriving visual tokens kept, pivots included")
    pivots: int = Field(4, ge=1, description="pivot tokens taken from the image, and as many from the text after it")


def duplication_scores(hidden: Tensor, keys: Tensor, visual: Tensor, text: Tensor, k: int, pivots: int) -> Tensor:
    """[S] selection scores of one sample: the ``k`` kept visual tokens score > 0, the rest 0.

    Args:
        hidden: [S, D] normalised hidden states; keys: [S, Dk]; visual / text: [S] masks.
    """
    scores = torch.zeros(hidden.shape[0], device=hidden.device)
    norms = keys.float().abs().sum(dim=-1)
    vis = visual.nonzero()[:, 0]
    img_pivots = vis[norms[vis].argsort(descending=True, stable=True)[:min(pivots, k)]]
    txt = text.nonzero()[:, 0]
    txt_pivots = txt[norms[txt].argsort(descending=True, stable=True)[:pivots]]
    scores[img_pivots] = 2.0
    all_pivots = torch.cat([img_pivots, txt_pivots])
    pool = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    pool[:] = visual
    pool[img_pivots] = False
    need = k - len(img_pivots)
    unit = F.normalize(hidden.float(), dim=-1)
    for i, pivot in enumerate(all_pivots.tolist()):
        share = need // len(all_pivots) + (1 if i < need % len(all_pivots) else 0)
        if share == 0 or not pool.any():
            continue
        similarity = (unit @ unit[pivot]).masked_fill(~pool, float("inf"))
        taken = similarity.argsort(stable=True)[:min(share, int(pool.sum()))]
        scores[taken] = 1.0
        pool[taken] = False
    return scores


def dart(state: LLMState, params: DARTParams, layer: AttentionProbe) -> LLMState:
    """Keep each sample's visual pivots and the visual tokens least duplicated by its pivots."""
    def score(visual: Tensor) -> Tensor:
        keys = layer.keys(state)
        hidden = layer.normalized(state)
        after_image = torch.cumsum(visual.long(), dim=1) > 0
        text = state.valid & ~visual & after_image
        rows = [duplication_scores(hidden[b], keys[b], visual[b], text[b],
                                   keep_count(params.keep, int(visual[b].sum())), params.pivots)
                for b in range(visual.shape[0])]
        return torch.stack(rows)

    return prune_visual(state, params.keep, score)


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [pruning_spec(
        "dart", DARTParams, dart, needs_layer=True,
        summary="DART: keep visual pivots and the tokens least duplicated by pivots (attention-free)")]
