"""Per-sample top-k selection of visual tokens, shared by every pruning transform.

A pruning transform only says how it scores tokens; the count rule
(``round(keep * n)`` of each sample's ``n`` visual tokens), the order (kept
tokens keep their order), text (never dropped) and positions (never
renumbered) are the same for all of them and live here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from luvc.state import LLMState, compact, round_half_up


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
