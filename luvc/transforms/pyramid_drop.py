"""PyramidDrop: staged drops through the LLM, each ranked by attention from the last instruction token.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247). The LLM is
cut into stages; at each boundary the visual tokens are re-ranked by the
attention the last instruction token gives them, computed with the *next*
layer's own norm, projections and rotary, and a fraction ``lambda`` (default
0.5) is kept, so stage s sees ``N * lambda^s`` tokens.

How luvc reads it: one schedule step with ``at: [b1, b2, ...]`` is the whole
pyramid (each occurrence keeps ``keep`` of what arrives). The attention row
is recomputed (one query per sample), so it runs under SDPA and
FlashAttention. Position ids are kept (the official code renumbers them);
this matches every other luvc transform and keeps M-RoPE grids intact.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from luvc.registry import AttentionProbe, TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.fastv import last_token_attention
from luvc.transforms.selection import keep_count, prune_visual


class PyramidDropParams(BaseModel):
    """Parameters of one PyramidDrop stage boundary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(0.5, ge=0.0, le=1.0, description="lambda: fraction of arriving visual tokens each stage keeps")


def pyramid_drop(state: LLMState, params: PyramidDropParams, layer: AttentionProbe) -> LLMState:
    """Keep ``lambda`` of the visual tokens, ranked by the next layer's last-token attention."""
    return prune_visual(state, params.keep, lambda visual: last_token_attention(layer, state))


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [
        TransformSpec(
            name="pyramid_drop",
            site="llm",
            params=PyramidDropParams,
            run=pyramid_drop,
            plan=lambda params, n: keep_count(params.keep, n),
            eliminates=lambda params: params.keep == 0.0,
            needs_layer=True,
            summary="PyramidDrop: keep lambda of the visual tokens at each stage boundary, by last-token attention",
        )
    ]
