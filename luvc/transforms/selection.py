"""Per-sample top-k selection of visual tokens, shared by every pruning transform.

A pruning transform only says how it scores tokens; the count rule
(``round(keep * n)`` of each sample's ``n`` visual tokens), the order (kept
tokens keep their order), text (never dropped) and positions (never
renumbered) are the same for all of them and live here, and so does the
spec those rules make (``pruning_spec``), and what FastV and PyramidDrop
share: their one parameter (``KeepParams``) and their ranking (attention
from the last token, ``keep_most_attended``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import AttentionProbe, TransformSpec
from luvc.state import LLMState, compact, round_half_up


class KeepParams(BaseModel):
    """Parameters of a cut that keeps a fraction of the arriving visual tokens (FastV, a PyramidDrop stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(0.5, ge=0.0, le=1.0, description="fraction of arriving visual tokens kept (FastV's 1 - R; "
                                                          "PyramidDrop's lambda at each stage)")


def keep_count(keep: float, n: int) -> int:
    """Visual tokens left of ``n`` arriving when a step keeps the fraction ``keep``."""
    return round_half_up(keep * n)


def keep_top(scores: Tensor, candidates: Tensor, keep_counts: Tensor) -> Tensor:
    """[B, S] mask: every non-candidate, plus the ``keep_counts[b]`` best candidates of row b."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return ~candidates | (rank < keep_counts[:, None])


def prune_visual(state: LLMState, keep: float, score: Callable[[Tensor], Tensor]) -> LLMState:
    """Keep ``round(keep * n)`` visual tokens of each sample, the highest by ``score``.

    ``score(visual)`` gets the [B, S] mask of visual tokens and returns [B, S]
    scores (only the visual entries are read). It is not called when nothing
    would be dropped or everything would be.
    """
    visual = state.visual & state.valid
    counts = visual.sum(dim=1).tolist()  # the one wait for the device this step needs
    keeps = [keep_count(keep, n) for n in counts]
    if keeps == counts:
        return state
    if not any(keeps):
        return compact(state, ~visual)
    return compact(state, keep_top(score(visual), visual, torch.tensor(keeps, device=visual.device)))


def last_token_attention(layer: AttentionProbe, state: LLMState) -> Tensor:
    """[B, S] attention each token receives from its row's last token (rows are right-aligned)."""
    last = torch.full((state.hidden.shape[0], 1), state.hidden.shape[1] - 1, device=state.hidden.device)
    return layer.attention_rows(state, last)[:, 0]


def keep_most_attended(state: LLMState, params: Any, layer: AttentionProbe) -> LLMState:
    """Keep ``params.keep`` of the visual tokens, those the last token attends to most in ``layer``."""
    return prune_visual(state, params.keep, lambda visual: last_token_attention(layer, state))


def pruning_spec(name: str, params: type, run: Callable, summary: str, needs_layer: bool = False) -> TransformSpec:
    """The spec of an ``llm`` transform that keeps ``params.keep`` of the arriving visual tokens via
    ``prune_visual``: its count rule is ``keep_count`` and ``keep == 0`` leaves none."""
    return TransformSpec(name=name, site="llm", params=params, run=run,
                         plan=lambda params, n: keep_count(params.keep, n),
                         eliminates=lambda params: params.keep == 0.0, needs_layer=needs_layer, summary=summary)
