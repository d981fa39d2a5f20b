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

from luvc.registry import TransformSpec, hookimpl
from luvc.transforms.selection import KeepParams, keep_most_attended, pruning_spec


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [pruning_spec(
        "fastv", KeepParams, keep_most_attended, needs_layer=True,
        summary="FastV: keep the visual tokens the last token attends to most (rows recomputed, any kernel)")]
