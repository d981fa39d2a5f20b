"""What a plugin hands the registry for one transform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

Site = Literal["vision", "llm"]


def _unchanged(params: Any, occurrence: int) -> Any:
    return params


@dataclass(frozen=True)
class TransformSpec:
    """A registered transform: a params model plus pure functions of token state.

    Attributes:
        name: The name schedules use, e.g. ``spectrum_prune``.
        site: ``vision`` (runs between vision-encoder blocks on a
            ``VisionState``) or ``llm`` (runs before decoder layers on an
            ``LLMState``).
        params: Pydantic model validating the schedule entry's ``params``.
        run: ``run(state, params) -> state``; never mutates its input.
        plan: Static count rule. For ``llm`` transforms ``plan(params, n)``
            is the visual tokens left of ``n`` arriving; for ``vision``
            transforms ``plan(params, (t, h, w))`` is the unit grid after.
        eliminates: ``eliminates(params)`` is True when the step leaves no
            visual token whatever arrives; the verifier relies on it to prove
            a schedule reaches zero for any input size.
        bind: ``bind(params, occurrence)`` fixes per-occurrence choices when
            the schedule is lowered (OIM alternates its axis this way).
        summary: One line for listings.
        needs_keys: ``vision`` transforms: ``needs_keys(params)`` is True when
            the step compares tokens by the attention keys of the block right
            before it (before the first block, the patch embeddings); the
            lowering refuses such a step right after another transform, whose
            tokens those keys no longer describe.
        requires: ``requires(params)`` is ``{capability: fix}`` for what the
            step needs from the model's adapter beyond the basics (see
            ``luvc.registry.adapter.CAPABILITIES``); ``luvc.compile`` refuses a
            schedule whose adapter lacks one, naming the step and the fix.
        needs_layer: ``llm`` transforms: ``run(state, params, layer=node)``
            also gets the decoder-layer node it runs before, to recompute what
            that layer would compute (attention rows, keys) without changing
            the attention kernel. ``vision`` transforms: the block before it
            fills ``state.attention`` (attention each token received there).
    """

    name: str
    site: Site
    params: type[BaseModel]
    run: Callable[[Any, Any], Any]
    plan: Callable[[Any, Any], Any]
    eliminates: Callable[[Any], bool] = field(default=lambda params: False)
    bind: Callable[[Any, int], Any] = field(default=_unchanged)
    summary: str = ""
    needs_layer: bool = False
    needs_keys: Callable[[Any], bool] = field(default=lambda params: False)
    requires: Callable[[Any], dict[str, str]] = field(default=lambda params: {})
