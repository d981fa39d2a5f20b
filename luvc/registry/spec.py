"""What a plugin hands the registry for one transform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import Tensor

    from luvc.state import LLMState

Site = Literal["vision", "llm"]


@runtime_checkable
class AttentionProbe(Protocol):
    """What an ``llm`` transform with ``needs_layer`` gets as ``layer=``: the decoder layer it runs before,
    recomputing what that layer would see of a state without running it or changing its attention kernel.

    Transforms use only these methods, so they depend on no model glue; luvc's decoder-layer node
    (``luvc.runtime.llm.DecoderLayerNode``) implements them for every family.
    """

    def attention_rows(self, state: LLMState, rows: Tensor) -> Tensor:
        """[B, R, S] head-averaged attention probabilities from the queries at ``rows`` [B, R] (causal, padding
        keys and the layer's window masked)."""
        ...

    def keys(self, state: LLMState) -> Tensor:
        """[B, S, Hkv * d] the post-rotary attention keys the layer computes for ``state``'s tokens."""
        ...

    def normalized(self, state: LLMState) -> Tensor:
        """[B, S, D] ``state``'s hidden states after the layer's input norm (what its attention reads)."""
        ...


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
        needs_layer: ``llm`` transforms: ``run(state, params, layer=probe)``
            also gets an ``AttentionProbe`` of the decoder layer it runs
            before, to recompute what that layer would compute (attention
            rows, keys) without changing the attention kernel. ``vision`` transforms: the block before it
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
