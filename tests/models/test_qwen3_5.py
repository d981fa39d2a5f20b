"""Qwen3.5's hybrid decoder: per-layer state of Gated DeltaNet layers after a prune, and what is refused."""

from __future__ import annotations

import pytest
import torch

import luvc
from luvc import CompileError, ScheduleError, hf
from luvc.examples import build_model, model_config, vlm_inputs
from luvc.models.qwen3_5 import LinearAttentionLayerNode

FAMILY = "qwen3.5-tiny"


def _linear_layers(model) -> list[int]:
    return [i for i, kind in enumerate(model.config.text_config.layer_types) if kind == "linear_attention"]


@pytest.mark.parametrize("family", [FAMILY, "qwen3.5-moe-tiny"])
def test_a_linear_attention_layer_after_a_prune_caches_the_state_of_its_kept_tokens(family, astronaut, coffee):
    """After SPU drops visual tokens before a Gated DeltaNet layer, the conv and recurrent state that layer caches
    for each row equal running the layer alone, from an empty cache, over that row's kept tokens (no padding)."""
    model = build_model(family)
    at = _linear_layers(model)[1]
    luvc.compile(model, {"name": "prune-before-linear",
                         "llm": [{"transform": "spectrum_prune", "at": at, "params": {"keep": 0.25}}]})
    seen = []
    node = next(m for m in model.luvc_graph.modules() if isinstance(m, LinearAttentionLayerNode) and m.index == at)
    node.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    inputs = vlm_inputs([[astronaut], [coffee[:150, :300]]], prompts=[(10, 11), (12, 13, 14, 15, 16)],
                        pixels=160 * 160, config=model.config)
    out = model(**inputs, use_cache=True)
    cache, state = getattr(out, hf.CACHE_KWARG), seen[0]
    assert (state.valid.sum(1) < inputs["attention_mask"].sum(1)).all(), "the prune shortened every row"
    assert not state.valid.all(), "rows of different lengths: the layer ran on a left-padded batch"
    conv, recurrent = hf.linear_attention_state(cache, at)
    for b in range(state.hidden.shape[0]):
        alone = hf.DynamicCache(config=model.config.text_config)
        node.block(state.hidden[b:b + 1, state.valid[b]], position_embeddings=None, **{hf.CACHE_KWARG: alone})
        own_conv, own_recurrent = hf.linear_attention_state(alone, at)
        torch.testing.assert_close(conv[b], own_conv[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(recurrent[b], own_recurrent[0], rtol=1e-4, atol=1e-5)


def test_every_layer_type_gets_its_own_node():
    """Linear-attention layers run as ``LinearAttentionLayerNode``; the full-attention ones probe attention."""
    model = build_model(FAMILY, device="meta")
    nodes = dict(luvc.models.find_adapter(model).llm_nodes(model))
    linear = {i for i in range(len(model.model.language_model.layers))
              if isinstance(nodes[f"llm.layers.{i}"], LinearAttentionLayerNode)}
    assert linear == set(_linear_layers(model)) and 0 < len(linear) < 4, "the tiny model has both layer types"


def test_attention_ranked_pruning_before_a_linear_attention_layer_is_refused():
    model = build_model(FAMILY)
    with pytest.raises(ScheduleError, match=r"fastv ranks tokens by the attention.*layer 0 .*has no attention"):
        luvc.compile(model, {"name": "x", "llm": [{"transform": "fastv", "at": 0, "params": {"keep": 0.5}}]})
    full = model.config.text_config.layer_types.index("full_attention")
    luvc.compile(model, {"name": "x", "llm": [{"transform": "fastv", "at": full, "params": {"keep": 0.5}}]})


def test_proportional_llm_attention_is_refused():
    model = build_model(FAMILY)
    with pytest.raises(CompileError, match="proportional_llm_attention is not supported on Qwen3.5"):
        luvc.compile(model, {"name": "x", "proportional_llm_attention": True,
                             "vision": [{"transform": "orthogonal_merge", "at": 1.0, "params": {"ratio": 0.25}}]})
    assert getattr(model, "_luvc", None) is None


def test_moe_router_logits_are_refused_not_dropped(astronaut):
    model = build_model("qwen3.5-moe-tiny")
    luvc.compile(model, "luvc-default")
    inputs = vlm_inputs([[astronaut]], prompts=[(10, 11)], config=model_config("qwen3.5-moe-tiny"))
    with pytest.raises(CompileError, match="output_router_logits is not available"):
        model(**inputs, output_router_logits=True)
