"""Plugin registry: hook specifications, the plugin manager, transform specs."""

import pluggy

hookimpl = pluggy.HookimplMarker("luvc")

from luvc.registry.manager import PluginInfo, Registry, get_registry, reset_registry  # noqa: E402
from luvc.registry.spec import TransformSpec  # noqa: E402

__all__ = ["PluginInfo", "Registry", "TransformSpec", "get_registry", "hookimpl", "reset_registry"]
