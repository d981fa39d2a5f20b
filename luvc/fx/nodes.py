"""The leaf modules an FX stack graph is made of."""

from __future__ import annotations

from typing import Any

from torch import nn

from luvc.registry.spec import TransformSpec
from luvc.state import LedgerRow


class StackNode(nn.Module):
    """A leaf of the stack graph: one block, layer, projector or transform.

    ``forward(state) -> state``. Subclasses set ``site`` (``vision`` or
    ``llm``) and ``kind`` (``block``, ``transform`` or ``io``); block nodes
    carry ``index``, their position in their stack.
    """

    site: str = ""
    kind: str = "block"
    index: int | None = None


class TransformNode(StackNode):
    """Runs one scheduled transform on the state."""

    kind = "transform"

    def __init__(self, spec: TransformSpec, params: Any, label: str) -> None:
        super().__init__()
        self.spec = spec
        self.params = params
        self.site = spec.site
        self.label = label

    def forward(self, state):
        out = self.spec.run(state, self.params)
        if not state.decoding:
            before, after = _counts(state), _counts(out)
            row = state.ledger_row(self.label) if self.site == "llm" else LedgerRow(self.label, self.site, before)
            row.removed = [b - a for b, a in zip(before, after)]
            row.transform = self.spec.name
            state.log.append(row)
        return out

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{self.spec.name}({fields})"


def _counts(state) -> list[int]:
    return state.tokens_per_image() if state.site == "vision" else state.visual_counts()
