"""Plugin registry: hook specifications, the plugin manager, transform specs."""

import pluggy

hookimpl = pluggy.HookimplMarker("luvc")

from luvc.registry.manager import (  # noqa: E402
    PluginInfo,
    Registry,
    get_registry,
    register_plugin,
    reset_registry,
    unregister_plugin,
)
from luvc.registry.spec import AttentionProbe, TransformSpec  # noqa: E402

__all__ = [
    "AttentionProbe", "PluginInfo", "Registry", "TransformSpec", "get_registry", "hookimpl", "register_plugin",
    "reset_registry", "unregister_plugin",
]
