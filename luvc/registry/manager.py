"""The plugin manager: loads built-ins and entry points, indexes what they offer."""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pluggy

from luvc.errors import PluginError
from luvc.registry import hookspecs
from luvc.registry.spec import TransformSpec

ENTRY_POINT_GROUP = "luvc"
AUTOLOAD_ENV = "LUVC_DISABLE_PLUGIN_AUTOLOAD"

#: Registered like any third-party plugin, in this order (pytest's default_plugins).
BUILTIN_PLUGINS = (
    "luvc.transforms.orthogonal_merge",
    "luvc.transforms.spectrum_prune",
    "luvc.transforms.fastv",
    "luvc.transforms.pyramid_drop",
    "luvc.transforms.dart",
    "luvc.transforms.tome",
    "luvc.transforms.visionzip",
    "luvc.transforms.random_drop",
    "luvc.transforms.uniform_pool",
    "luvc.models.qwen2_vl",
    "luvc.models.qwen2_5_vl",
    "luvc.models.qwen3_5",
    "luvc.models.qwen3_vl",
    "luvc.models.llava",
    "luvc.models.internvl",
    "luvc.models.idefics3",
    "luvc.models.gemma3",
    "luvc.models.llava_onevision",
    "luvc.models.smolvlm",
    "luvc.models.generic",
    "luvc.schedules.presets",
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin comes from, for listings and error messages."""

    name: str
    distribution: str
    version: str


class Registry:
    """Everything plugins registered: transforms, model adapters, presets."""

    def __init__(self, autoload: bool = True, extra: Sequence[object] = ()) -> None:
        """Register the built-ins, then entry points (if ``autoload``), then ``extra`` plugin objects."""
        self.pm = pluggy.PluginManager("luvc")
        self.pm.add_hookspecs(hookspecs)
        for module_name in BUILTIN_PLUGINS:
            module = __import__(module_name, fromlist=["_"])
            self.pm.register(module, name=module_name)
        if autoload:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in extra:
            self.pm.register(plugin)
        self.transforms = self._collect_unique("luvc_transforms", lambda spec: spec.name)
        self.adapters = self._collect_adapters()
        presets = self._collect_unique("luvc_schedule_presets", None)
        self.presets: dict[str, Path] = {name: Path(path) for name, path in presets.items()}

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution and version."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            dist = dists.get(id(plugin))
            if dist is None:
                infos.append(PluginInfo(name, "luvc (built-in)", _luvc_version()))
            else:
                infos.append(PluginInfo(name, dist.project_name, dist.version))
        return infos

    def plugin_of(self, transform_name: str) -> str:
        """The name of the plugin that registered ``transform_name``."""
        return self._owner[transform_name]

    def _per_plugin(self, hook_name: str) -> list[tuple[str, object]]:
        caller = getattr(self.pm.hook, hook_name)
        results = []
        for impl in caller.get_hookimpls():
            try:
                value = impl.function()
            except Exception as exc:  # a broken plugin must be named, not buried
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}") from exc
            if value is not None:
                results.append((impl.plugin_name, value))
        return results

    def _collect_adapters(self) -> list:
        """Every adapter, in registration order with ``fallback`` adapters (the generic one) last, but an
        adapter another one ``overrides`` (a tuple of adapter names) is dropped for it. A fallback adapter's
        architectures are the ones it is tested on, not a claim: a family adapter may list them too.

        Raises:
            PluginError: two adapters claim one architecture and neither overrides the other.
        """
        owned = [(plugin, adapter) for plugin, items in self._per_plugin("luvc_model_adapters") for adapter in items]
        overridden = {name for _, adapter in owned for name in getattr(adapter, "overrides", ())}
        kept = [(plugin, adapter) for plugin, adapter in owned if adapter.name not in overridden]
        claims: dict[str, tuple[str, object]] = {}
        kept = [pair for pair in kept if not getattr(pair[1], "fallback", False)] + \
            [pair for pair in kept if getattr(pair[1], "fallback", False)]
        for plugin, adapter in kept:
            if getattr(adapter, "fallback", False):
                continue
            for architecture in adapter.architectures:
                if architecture in claims:
                    other_plugin, other = claims[architecture]
                    raise PluginError(
                        f"luvc_model_adapters: {architecture} is claimed by adapter {other.name!r} "
                        f"(plugin {other_plugin!r}) and by {adapter.name!r} (plugin {plugin!r})\n"
                        f"  to replace the first, declare overrides = ({other.name!r},) on the second's adapter; "
                        "or uninstall one of them"
                    )
                claims[architecture] = (plugin, adapter)
        return [adapter for _, adapter in kept]

    def _collect_unique(self, hook_name: str, key_of) -> dict:
        collected: dict = {}
        owners: dict[str, str] = {}
        for plugin_name, items in self._per_plugin(hook_name):
            if hook_name == "luvc_transforms":
                for item in items:
                    if not isinstance(item, TransformSpec):
                        raise PluginError(
                            f"plugin {plugin_name!r} returned {type(item).__name__} from luvc_transforms; "
                            "return luvc.registry.TransformSpec objects"
                        )
            pairs = items.items() if isinstance(items, dict) else ((key_of(item), item) for item in items)
            for key, item in pairs:
                if key in collected:
                    raise PluginError(
                        f"{hook_name}: name {key!r} is registered by both {owners[key]!r} and {plugin_name!r}; "
                        "uninstall one of them or rename the transform"
                    )
                collected[key] = item
                owners[key] = plugin_name
        if hook_name == "luvc_transforms":
            self._owner = owners
        return collected


def _luvc_version() -> str:
    try:
        return importlib.metadata.version("luvc")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


_EXTRA_PLUGINS: list[object] = []


@functools.cache
def _cached_registry(autoload: bool) -> Registry:
    return Registry(autoload=autoload, extra=_EXTRA_PLUGINS)


def register_plugin(plugin: object) -> None:
    """Register a plugin object (module or instance with ``@hookimpl`` methods) in this process.

    For notebooks and tests; packages should declare a ``luvc`` entry point
    instead. The registry is rebuilt on next use, so clashes surface then.
    """
    _EXTRA_PLUGINS.append(plugin)
    _cached_registry.cache_clear()


def unregister_plugin(plugin: object) -> None:
    """Undo ``register_plugin``."""
    _EXTRA_PLUGINS.remove(plugin)
    _cached_registry.cache_clear()


def get_registry() -> Registry:
    """The process-wide registry, built on first use.

    Set ``LUVC_DISABLE_PLUGIN_AUTOLOAD=1`` to skip third-party entry points.
    """
    return _cached_registry(not os.environ.get(AUTOLOAD_ENV))


def reset_registry() -> None:
    """Forget the loaded registry so the next ``get_registry`` rebuilds it."""
    _cached_registry.cache_clear()
