"""What a model-family adapter provides: the protocol ``luvc_model_adapters`` returns.

One adapter module per family (``luvc.models``) holds all of that family's
assumptions: where the stacks are, how blocks are called on a token state, and
how placeholders and positions are rebuilt."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

#: What an adapter may give transforms beyond the basics, by name. An adapter lists the ones it
#: gives as ``capabilities`` (a frozenset; none when absent); a transform step that needs one it
#: lacks is refused at compile time (``TransformSpec.requires``).
CAPABILITIES = {
    "llm_grid": "each image's token grid in the LLM (encoder outputs carry luvc_llm_grids)",
}


@runtime_checkable
class ModelAdapter(Protocol):
    """A model family's glue, registered through ``luvc_model_adapters``.

    Nodes returned by ``stack_nodes`` are ``luvc.fx.nodes.StackNode`` leaves. Vision block
    nodes have a ``capture_keys`` attribute: when the lowering pass sets it, the block stores its attention
    keys on the state for the merge that follows. An adapter may also declare
    ``capabilities``, the names of ``CAPABILITIES`` it provides.
    """

    name: str
    architectures: tuple[str, ...]

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""

    def check(self, model: nn.Module) -> None:
        """Raise ``CompileError`` if this model instance cannot be compiled (e.g. an
        attention implementation the adapter cannot mask)."""

    def stack_nodes(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Vision blocks, projector, decoder layers and final norm as named leaf nodes,
        in running order; names look like ``vision.blocks.3`` and ``llm.layers.0``."""

    def input_grid(
        self, model: nn.Module, height: int, width: int, frames: int = 1
    ) -> tuple[tuple[int, int, int], int]:
        """The ``(t, h, w)`` unit grid and tokens per unit the vision tower makes of an
        image (``frames == 1``) or video of this size, as the family's processor resizes it."""

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        """Route the model's own ``forward`` (and so ``generate``) through ``graph``;
        return what ``uninstall`` needs to undo it exactly."""

    def uninstall(self, model: nn.Module, record: dict) -> None:
        """Undo ``install``."""
