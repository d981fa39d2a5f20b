"""An example luvc plugin: ``stride_pool``, average-pooling runs of visual tokens in the LLM.

A complete third-party transform: a pydantic params model, a pure function
over ``luvc.state.LLMState``, a static count rule, and one hook. Install this
package and ``stride_pool`` can be named in any schedule's ``llm:`` stage.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from luvc.registry import TransformSpec, hookimpl
from luvc.state import LLMState, compact


class StridePoolParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stride: int = Field(2, ge=1, le=64, description="visual tokens averaged into one, in reading order")


def stride_pool(state: LLMState, params: StridePoolParams) -> LLMState:
    """Replace each run of ``stride`` consecutive visual tokens of a sample by their mean.

    The pooled token takes the place (and position id) of the run's first token.
    """
    visual = state.visual & state.valid
    ordinal = torch.cumsum(visual.long(), dim=1) - 1
    group = torch.where(visual, ordinal // params.stride, 0)
    groups = int(group.max()) + 1 if visual.any() else 1
    sums = state.hidden.new_zeros(state.hidden.shape[0], groups, state.hidden.shape[-1])
    sums.scatter_add_(1, group[..., None].expand_as(state.hidden), state.hidden * visual[..., None])
    counts = torch.zeros(state.hidden.shape[0], groups, device=visual.device).scatter_add_(1, group, visual.float())
    means = sums / counts.clamp(min=1)[..., None].to(sums.dtype)
    leader = visual & (ordinal % params.stride == 0)
    pooled = torch.where(leader[..., None], torch.gather(means, 1, group[..., None].expand_as(state.hidden)),
                         state.hidden)
    return compact(state.replace(hidden=pooled), ~visual | leader)


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("stride_pool", "llm", StridePoolParams, stride_pool,
                          plan=lambda params, n: math.ceil(n / params.stride), eliminates=lambda params: False,
                          summary="average each run of `stride` visual tokens into one (example plugin)")]
