"""Model-family adapters: all model-specific code lives in one module per family."""

from __future__ import annotations

from torch import nn

from luvc.errors import UnsupportedModelError
from luvc.registry.adapter import ModelAdapter


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The registered adapter that handles ``model``.

    Raises:
        UnsupportedModelError: listing the supported families.
    """
    from luvc.registry import get_registry

    adapters = get_registry().adapters
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    supported = ", ".join(f"{a.name} ({', '.join(a.architectures)})" for a in adapters)
    raise UnsupportedModelError(
        f"no adapter for {type(model).__name__}\n"
        f"  supported: {supported}\n"
        "  add one with the luvc_model_adapters hook (docs/adapters.md)"
    )


__all__ = ["ModelAdapter", "find_adapter"]
