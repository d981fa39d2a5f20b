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

from luvc.registry import TransformSpec, hookimpl
from luvc.transforms.selection import KeepParams, keep_most_attended, pruning_spec


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [pruning_spec(
        "pyramid_drop", KeepParams, keep_most_attended, needs_layer=True,
        summary="PyramidDrop: keep lambda of the visual tokens at each stage boundary, by last-token attention")]
