"""Every extension point of luvc, one documented hook each.

Plugins implement these with ``@luvc.registry.hookimpl``. Built-in transforms,
model adapters and presets are registered exactly like third-party plugins
(see ``luvc.registry.manager.BUILTIN_PLUGINS``); third parties declare an entry
point in the ``luvc`` group. Hooks are always called with keyword arguments:
parameters may be added in later versions, never reordered.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from luvc.registry.adapter import ModelAdapter
    from luvc.registry.spec import TransformSpec

hookspec = pluggy.HookspecMarker("luvc")

# --- transforms -------------------------------------------------------------


@hookspec
def luvc_transforms() -> list[TransformSpec]:
    """Return the token transforms this plugin provides.

    Called once when the registry loads. Each ``TransformSpec`` names the
    transform (the name schedules use), where it runs (``vision`` between
    vision-encoder blocks or ``llm`` before decoder layers), its pydantic
    params model, and a pure function over a token state. A name offered by
    two plugins is a ``PluginError`` naming both.
    """


# --- model families ---------------------------------------------------------


@hookspec
def luvc_model_adapters() -> list[ModelAdapter]:
    """Return adapters, one per model family, that know where a model's vision
    blocks and decoder layers are, how to call them on a token state, and how
    to rebuild placeholder tokens and positions after compression.

    ``luvc.compile`` asks each adapter in turn whether it ``matches`` the
    model; the first that does is used. All model-specific code lives in the
    adapter's module. Two adapters that list the same architecture are a
    ``PluginError`` naming both, unless one declares ``overrides``, a tuple
    of the adapter names it replaces (those are then dropped).
    """


# --- schedules --------------------------------------------------------------


@hookspec
def luvc_schedule_presets() -> dict[str, Path]:
    """Return preset schedules as ``{name: path to a YAML file}``.

    Presets load by name through ``luvc.load_schedule(name)``. A name offered
    by two plugins is a ``PluginError`` naming both.
    """
