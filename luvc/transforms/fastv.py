"""FastV: drop the visual tokens the last prompt token attends to least, once, early in the LLM.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024
(arXiv 2403.06764). Before decoder layer K (default 2), each visual token is
scored by the attention it receives from the last prompt token, averaged over
heads, and the top ``round(keep * n)`` are kept; kept tokens keep their order
and position ids.

How luvc reads it: the official code takes the attention of layer K-1; here
the scores are recomputed with the projections, rotary and scale of layer K
itself (the layer the pruned sequence enters), on the hidden states entering
it, for one query row per sample, so FastV runs under SDPA and
FlashAttention with no eager attention and at O(S) extra cost.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import AttentionProbe, TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.selection import keep_count, prune_visual


class FastVParams(BaseModel):
    """Parameters of a FastV cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(0.5, ge=0.0, le=1.0, description="fraction of arriving visual tokens kept (FastV: 1 - R)")


def last_token_attention(layer: AttentionProbe, state: LLMState) -> Tensor:
    """[B, S] attention each token receives from its row's last token (rows are right-aligned)."""
    last = torch.full((state.hidden.shape[0], 1), state.hidden.shape[1] - 1, device=state.hidden.device)
    return layer.attention_rows(state, last)[:, 0]


def fastv(state: LLMState, params: FastVParams, layer: AttentionProbe) -> LLMState:
    """Keep the visual tokens the last token attends to most in ``layer``."""
    return prune_visual(state, params.keep, lambda visual: last_token_attention(layer, state))


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [
        TransformSpec(
            name="fastv",
            site="llm",
            params=FastVParams,
            run=fastv,
            plan=lambda params, n: keep_count(params.keep, n),
            eliminates=lambda params: params.keep == 0.0,
            needs_layer=True,
            summary="FastV: keep the visual tokens the last token attends to most (rows recomputed, any kernel)",
        )
    ]
