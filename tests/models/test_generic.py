"""The generic adapter: any standard-layout VLM gets LLM-side compression, family adapters win over it,
and what it cannot compile is refused with the fix. (The family-parametrised suites run its examples.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luvc
from luvc import CompileError, ScheduleError
from luvc.examples import build_model, model_config, sample_image, vlm_inputs
from luvc.models import find_adapter
from luvc.models.generic import GenericAdapter, feature_keywords
from luvc.models.generic_examples import TINY
from luvc.registry import get_registry, hookimpl, register_plugin, unregister_plugin


def test_a_vision_step_on_a_generic_model_names_the_line_the_adapter_and_the_fix():
    model = build_model("llava-next-tiny")
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ScheduleError, match=r"(?s)^preset:luvc-default:\d+: vision\[0\]: orthogonal_merge runs in the "
                       r"vision stage, which the generic adapter that handles LlavaNextForConditionalGeneration does "
                       r"not compile \(it supports: llm\).*without vision steps \(e.g. luvc-llm.*add a family "
                       r"adapter for LlavaNextForConditionalGeneration"):
        luvc.compile(model, "luvc-default")
    assert {name: type(m) for name, m in model.named_modules()} == classes and getattr(model, "_luvc", None) is None
    luvc.compile(model, "luvc-llm")  # the same cascade without the merge compiles


@pytest.mark.parametrize(("name", "adapter", "standard"), [
    ("llava-tiny", "llava", True), ("llava-onevision-tiny", "llava_onevision", True),
    ("mistral3-tiny", "generic", True),
    ("smolvlm-tiny", "smolvlm", False),  # its LLM is .text_model: a family adapter's job
])
def test_family_adapters_win_over_the_generic_one(name, adapter, standard):
    model = build_model(name, device="meta")
    assert find_adapter(model).name == adapter
    assert GenericAdapter().matches(model) == standard
    assert get_registry().adapters[-1].name == "generic"


class _LlavaNextPlugin:
    """A third-party adapter for an architecture the generic adapter lists: registered after it, tried first."""

    @hookimpl
    def luvc_model_adapters(self):
        adapter = GenericAdapter()
        adapter.name, adapter.fallback, adapter.architectures = "plugin_llava_next", False, (
            "LlavaNextForConditionalGeneration",)
        return [adapter]


def test_a_plugin_adapter_registered_later_still_wins_over_the_fallback():
    plugin = _LlavaNextPlugin()
    register_plugin(plugin)
    try:
        names = [a.name for a in get_registry().adapters]
        assert names[-1] == "generic" and names.index("plugin_llava_next") < names.index("generic")
        assert find_adapter(build_model("llava-next-tiny", device="meta")).name == "plugin_llava_next"
    finally:
        unregister_plugin(plugin)


def test_the_layout_is_checked_by_attributes():
    assert not GenericAdapter().matches(build_model("qwen2-vl-tiny", device="meta")), "its tower is .visual"
    assert not GenericAdapter().matches(torch.nn.Linear(2, 2))
    model = build_model("aya-vision-tiny", device="meta")
    model.config.image_token_id = None
    assert not GenericAdapter().matches(model), "no placeholder id: nothing to fill"


def test_what_the_generic_path_would_run_differently_is_refused():
    model = build_model("mistral3-tiny", device="meta")
    model.config.text_config.sliding_window = 16
    with pytest.raises(CompileError, match="(?s)sliding-window layers.*needs an adapter"):
        luvc.compile(model, "luvc-llm")
    model.config.text_config.sliding_window = None
    model.model.get_rope_index = lambda *args: None
    with pytest.raises(CompileError, match=r"multi-axis rotary positions \(get_rope_index\)"):
        luvc.compile(model, "luvc-llm")


@pytest.mark.parametrize("name", TINY)
def test_example_placeholders_are_what_the_models_own_features_give(name):
    """Each image's placeholders in the example inputs (and ``input_grid``'s count) equal the features the
    model's own ``get_image_features`` returns for it, at several sizes and aspect ratios."""
    model = build_model(name)
    photo = sample_image("astronaut")
    crops = [photo[:h, :w] for h, w in ((224, 224), (100, 300), (300, 90), (57, 61))]
    inputs = vlm_inputs([[crop] for crop in crops], prompts=[(10,)] * len(crops), config=model_config(name))
    pixels, _ = feature_keywords(type(model.model), model.config)
    features = model.model.get_image_features(*(inputs[k] for k in pixels)).pooler_output
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    adapter = find_adapter(model)
    assert [len(f) for f in features] == placeholders
    assert [int(np.prod(adapter.input_grid(model, *crop.shape[:2])[0])) for crop in crops] == placeholders
