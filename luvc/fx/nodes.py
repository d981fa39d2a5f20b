"""The leaf modules an FX stack graph is made of."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from luvc import hf
from luvc.registry.spec import TransformSpec
from luvc.state import LedgerRow, to_device


class StackNode(nn.Module):
    """A leaf of the stack graph: one block, layer, projector or transform.

    ``forward(state) -> state``. Subclasses set ``site`` (``vision`` or
    ``llm``) and ``kind`` (``block``, ``transform`` or ``io``); block nodes
    carry ``index``, their position in their stack.
    """

    site: str = ""
    kind: str = "block"
    index: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_place_state)

    def placed_by(self) -> nn.Module | None:
        """The model module whose device this node runs on: its block (None: wherever the state is)."""
        return getattr(self, "block", None)


def _place_state(node: StackNode, args: tuple) -> tuple:
    """Move the state a node is called on to the device its ``placed_by`` module computes on (a model split
    across devices by accelerate runs each block where its weights are)."""
    module = node.placed_by()
    device = None if module is None else hf.execution_device(module)
    return args if device is None else (to_device(args[0], device), *args[1:])


@contextlib.contextmanager
def captured_output(module: nn.Module | None, reduce: Callable[[Tensor], Tensor]) -> Iterator[list[Tensor]]:
    """While active, append ``reduce(output)`` of each ``module`` call to the yielded list.

    A block node uses it to keep an internal tensor (attention keys for the
    merge that follows) without changing the block; ``None`` captures nothing.
    """
    captured: list[Tensor] = []
    hook = None if module is None else module.register_forward_hook(lambda m, a, out: captured.append(reduce(out)))
    try:
        yield captured
    finally:
        if hook is not None:
            hook.remove()


class TransformNode(StackNode):
    """Runs one scheduled transform on the state."""

    kind = "transform"

    def __init__(self, spec: TransformSpec, params: Any, label: str, layer: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.params = params
        self.site = spec.site
        self.label = label
        self.layer = [layer]  # a list keeps the next block out of this node's children

    def placed_by(self) -> nn.Module | None:
        """The layer the transform reads (it computes with that layer's weights), else none."""
        return self.layer[0]

    def forward(self, state):
        if self.spec.needs_layer and self.site == "llm":
            out = self.spec.run(state, self.params, layer=self.layer[0])
        else:
            out = self.spec.run(state, self.params)
        if not state.decoding:
            if self.site == "llm":
                row = state.ledger_row(self.label)
                row.removed = row.visual - (out.visual & out.valid).sum(dim=1)
            else:
                before, after = state.tokens_per_image(), out.tokens_per_image()
                row = LedgerRow(self.label, self.site, before, [b - a for b, a in zip(before, after)])
            row.transform = self.spec.name
            state.log.append(row)
        return out

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{self.spec.name}({fields})"

