"""The registry: built-ins load as plugins, the example package is discovered and runs, clashes are named."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import luvc
from luvc.errors import PluginError
from luvc.examples import build_model, vlm_inputs
from luvc.registry import Registry, TransformSpec, get_registry, hookimpl
from luvc.transforms.spectrum_prune import SPUParams


def _example_installed() -> bool:
    return any(ep.value == "luvc_example" for ep in importlib.metadata.entry_points(group="luvc"))


requires_example = pytest.mark.skipif(
    not _example_installed(), reason="run `pip install -e plugins/luvc-example` (the README's test command does)"
)


def test_builtins_are_registered_as_plugins():
    registry = Registry(autoload=False)
    assert {"orthogonal_merge", "spectrum_prune", "fastv", "pyramid_drop", "dart", "visionzip", "tome",
            "random_drop", "uniform_pool"} <= set(registry.transforms)
    assert [a.name for a in registry.adapters] == ["qwen2_vl", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl",
                                                   "qwen3_vl_moe", "llava", "internvl", "idefics3", "gemma3",
                                                   "llava_onevision", "smolvlm", "generic"]
    names = {p.name: p.distribution for p in registry.plugins()}
    assert names["luvc.transforms.spectrum_prune"] == "luvc (built-in)"


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("LUVC_DISABLE_PLUGIN_AUTOLOAD", "1")
    from luvc.registry.manager import _cached_registry

    _cached_registry.cache_clear()
    try:
        assert "stride_pool" not in get_registry().transforms
    finally:
        monkeypatch.delenv("LUVC_DISABLE_PLUGIN_AUTOLOAD")
        _cached_registry.cache_clear()


def test_example_plugin_is_a_real_installed_distribution():
    """The example plugin must be installed for the suite: the README's test command installs it."""
    assert _example_installed(), "pip install -e plugins/luvc-example"
    registry = get_registry()
    assert registry.plugin_of("stride_pool") == "example"
    assert {p.distribution for p in registry.plugins()} >= {"luvc-example"}


@requires_example
def test_example_plugin_runs_from_yaml(astronaut):
    """A YAML schedule names the plugin's transform; it pools the visual tokens, then SPU removes the rest."""
    schedule = """
name: pooled
eliminate_visual: true
llm:
  - transform: stride_pool
    at: 0
    params: {stride: 4}
  - transform: spectrum_prune
    at: 2
    params: {keep: 0.0}
"""
    model = build_model("qwen2-vl-tiny")
    luvc.compile(model, schedule)
    model.generate(**vlm_inputs([[astronaut]]), max_new_tokens=2, do_sample=False)
    counts = [(r.node, r.visual[0]) for r in luvc.ledger(model) if r.site == "llm"]
    assert counts[:2] == [("llm.transforms.stride_pool_0", 64), ("llm.layers.0", 16)]
    assert counts[-1] == ("llm.norm", 0)


class _Clash:
    @hookimpl
    def luvc_transforms(self):
        return [TransformSpec(name="spectrum_prune", site="llm", params=SPUParams, run=lambda s, p: s,
                              plan=lambda p, n: n)]


def test_name_clash_names_both_plugins():
    with pytest.raises(PluginError, match=r"'spectrum_prune' is registered by both 'luvc.transforms.spectrum_prune'"):
        Registry(autoload=False, extra=[_Clash()])


class _ShadowingAdapter:
    name = "my_qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    overrides: tuple[str, ...] = ()

    def matches(self, model):
        return type(model).__name__ in self.architectures


class _Shadow:
    def __init__(self, overrides: tuple[str, ...] = ()) -> None:
        self.adapter = _ShadowingAdapter()
        self.adapter.overrides = overrides

    @hookimpl
    def luvc_model_adapters(self):
        return [self.adapter]


def test_two_adapters_for_one_architecture_clash_loudly():
    with pytest.raises(PluginError, match=r"(?s)Qwen2VLForConditionalGeneration is claimed by adapter 'qwen2_vl' "
                                          r"\(plugin 'luvc.models.qwen2_vl'\) and by 'my_qwen2_vl'.*overrides = "
                                          r"\('qwen2_vl',\)"):
        Registry(autoload=False, extra=[_Shadow()])


def test_an_adapter_that_declares_it_overrides_replaces_the_built_in():
    shadow = _Shadow(overrides=("qwen2_vl",))
    registry = Registry(autoload=False, extra=[shadow])
    names = [a.name for a in registry.adapters]
    assert "my_qwen2_vl" in names and "qwen2_vl" not in names and "qwen2_5_vl" in names


class _Broken:
    @hookimpl
    def luvc_transforms(self):
        return ["not a spec"]


def test_a_plugin_returning_junk_is_named():
    with pytest.raises(PluginError, match="returned str from luvc_transforms"):
        Registry(autoload=False, extra=[_Broken()])


def test_stride_pool_counts():
    from luvc_example import StridePoolParams, stride_pool

    from luvc.state import LLMState

    visual = torch.tensor([[False, True, True, True, True, True, False]])
    state = LLMState(torch.arange(7.0).view(1, 7, 1), torch.ones_like(visual), visual,
                     torch.arange(7).expand(3, 1, 7), torch.arange(7)[None], log=[])
    out = stride_pool(state, StridePoolParams(stride=2))
    assert out.hidden.flatten().tolist() == [0.0, 1.5, 3.5, 5.0, 6.0]
    assert out.position_ids[0, 0].tolist() == [0, 1, 3, 5, 6]
