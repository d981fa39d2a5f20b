"""Qwen3-VL's DeepStack under luvc: identity injects transformers' features; after merging and pruning each
kept visual token gets its own feature and a pruned one none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luvc
from luvc import CompileError
from luvc.examples import build_model, model_config, sample_image, vlm_inputs
from luvc.models.qwen3_vl import DeepstackLayerNode


def _inputs(family: str, video: bool = True) -> dict:
    astronaut, coffee = sample_image("astronaut"), sample_image("coffee")
    videos = [[], [np.stack([sample_image("chelsea")[:200, :200]] * 4)]] if video else []
    return vlm_inputs([[astronaut], [coffee[:150, :300]]], prompts=[(10, 11), (12, 13, 14)], videos=videos,
                      pixels=160 * 160, config=model_config(family))


def _spy_injections(monkeypatch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Record, per DeepStack layer call, (layer, sources of the visual tokens, the features they get)."""
    calls = []
    features = DeepstackLayerNode.features

    def spy(node, state):
        out = features(node, state)
        visual = state.visual & state.valid
        calls.append((node.index, state.source[visual], out[visual]))
        return out

    monkeypatch.setattr(DeepstackLayerNode, "features", spy)
    return calls


@pytest.mark.parametrize("family", ["qwen3-vl-tiny", "qwen3-vl-moe-tiny"])
def test_identity_injects_the_features_transformers_injects(family, monkeypatch):
    model = build_model(family)
    inputs = _inputs(family)
    text_model = type(model.model.language_model)
    reference = []
    process = text_model._deepstack_process

    def record(self, hidden, mask, embeds):
        reference.append(embeds)
        return process(self, hidden, mask, embeds)

    monkeypatch.setattr(text_model, "_deepstack_process", record)
    model(**inputs)
    assert len(reference) == 2
    luvc.compile(model, "identity")
    injected = _spy_injections(monkeypatch)
    model(**inputs)
    assert [layer for layer, _, _ in injected] == [0, 1]
    for (_, _, ours), theirs in zip(injected, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_merged_and_pruned_tokens_get_their_own_features_or_none(monkeypatch):
    model = build_model("qwen3-vl-tiny")
    inputs = vlm_inputs([[sample_image("astronaut")]], prompts=[(10, 11, 12)], config=model_config("qwen3-vl-tiny"))
    luvc.compile(model, "luvc-default")
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    (features,), (tokens,) = out.luvc_deepstack, out.pooler_output
    assert features.shape[:2] == (len(tokens), 2) and len(tokens) < out.luvc_source_counts[0]
    injected = _spy_injections(monkeypatch)
    model(**inputs)
    ledger = {row.node: row.visual[0] for row in luvc.ledger(model)}
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    row_of = {int(p): j for j, p in enumerate(placeholders[:len(tokens)])}  # the kept placeholders, in order
    sources = []
    for layer, source, got in injected:
        assert len(source) == ledger[f"llm.layers.{layer}"] > 0
        rows = torch.tensor([row_of[int(s)] for s in source])
        assert torch.equal(got, features[rows, layer])
        sources.append(set(source.tolist()))
    assert sources[1] < sources[0]  # SPU pruned before layer 1: those tokens get no second injection


def test_moe_refuses_router_logits():
    model = build_model("qwen3-vl-moe-tiny")
    luvc.compile(model, "identity")
    with pytest.raises(CompileError, match="output_router_logits"):
        model(**_inputs("qwen3-vl-moe-tiny", video=False), output_router_logits=True)
