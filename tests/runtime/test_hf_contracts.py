"""Contracts for the transformers code luvc carries a copy of: with every token size 1 (nothing merged),
each copy equals the transformers module it re-implements, on the same input, in fp32.

Covered elsewhere: Qwen-style ``SizedVisionAttention`` (tests/models/test_sized_attention.py, sizes of
one against the model's own forward) and the recomputed attention rows (tests/transforms/test_baselines.py,
against eager attention's probabilities).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

import luvc
from luvc.examples import build_model
from luvc.hf import CACHE_KWARG, image_size_to_num_patches
from luvc.models import find_adapter
from luvc.models.gemma3 import PooledProjectorNode
from luvc.models.internvl import InternViTLayerNode, unit_major
from luvc.models.llava_onevision import pack_image
from luvc.runtime.llm import DecoderLayerNode
from luvc.state import LLMState, VisionState

TIGHT = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava-tiny", "idefics3-tiny", "gemma3-tiny", "llava-onevision-tiny"])
def test_sized_clip_attention_with_unit_sizes_is_the_models_attention(family, attn):
    """``SizedCLIPAttention`` (and ``batched_sized_attention`` under it) on CLIP, SigLIP and Idefics3 towers."""
    model = build_model(family, attn=attn)
    luvc.compile(model, "identity")
    layer = next(n for _, n in find_adapter(model).stack_nodes(model) if n.site == "vision").block
    attn_module = layer.self_attn
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, attn_module.embed_dim)
    theirs, _ = attn_module(hidden, None)  # no sizes: the model's own forward
    ours, _ = attn_module(hidden, None, luvc_sizes=torch.ones(2, 9))
    torch.testing.assert_close(ours, theirs, **TIGHT)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_internvit_layer_with_unit_sizes_is_the_models_layer(attn):
    """``InternViTLayerNode._sized_layer``: InternViT's layer re-run with size-weighted attention."""
    model = build_model("internvl-tiny", attn=attn)
    layer = model.model.vision_tower.encoder.layer[0]
    torch.manual_seed(0)
    torch.nn.init.normal_(layer.lambda_1, std=0.5)  # released checkpoints' layer scales are not all 1
    x = torch.randn(2, 17, layer.layernorm_before.normalized_shape[0])
    node = InternViTLayerNode(layer, 0)
    torch.testing.assert_close(node._run(x, torch.ones(2, 17)), layer(x), **TIGHT)


def test_gemma3_projector_node_is_the_models_pooling_projector():
    """``PooledProjectorNode`` on unit-major patches: SigLIP's final norm, then Gemma 3's average pooling,
    soft-token norm and projection, token for token."""
    model = build_model("gemma3-tiny")
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    side = projector.patches_per_image
    torch.manual_seed(0)
    x = torch.randn(2, side * side, tower.post_layernorm.normalized_shape[0])
    theirs = projector(tower.post_layernorm(x))
    block = projector.kernel_size
    patches, positions = unit_major(x, side, block)
    n = side // block
    state = VisionState(hidden=patches, sizes=torch.ones(len(patches)), positions=positions,
                        grids=((1, n, n),) * 2, unit=block * block, log=[])
    ours = PooledProjectorNode(tower.post_layernorm, projector)(state).hidden
    torch.testing.assert_close(ours, theirs.flatten(0, 1), **TIGHT)


@pytest.mark.parametrize("image_size", [(100, 100), (90, 200), (300, 120), (224, 224)])
@pytest.mark.parametrize("newline", [True, False])
def test_onevision_pack_image_is_the_models_pack_image_features(image_size, newline):
    """``pack_image``: stitch, unpad, downsample and newline-terminate the tiles as LLaVA-OneVision does."""
    model = build_model("llava-onevision-tiny")
    config = model.config
    tiles = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    torch.manual_seed(0)
    features = torch.randn(tiles, side * side, 12)
    line = torch.randn(12) if newline else None
    (theirs,), _ = model.model.pack_image_features([features], torch.tensor([image_size]), image_newline=line,
                                                   vision_aspect_ratio=config.vision_aspect_ratio)
    ours = pack_image(features.view(tiles, side, side, 12), torch.tensor(image_size), config, line)
    torch.testing.assert_close(ours, theirs, **TIGHT)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_keys_are_the_keys_the_layer_caches(family):
    """``DecoderLayerNode.keys`` (``_rotated``: norm, k projection, k norm, the family's rotary) equals the
    post-rotary keys transformers' own layer writes to the KV cache."""
    model = build_model(family)
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [0, 0, 16, 17, 18, 19]])
    mask = (ids != 0).long()
    planes = 3 if hasattr(model.model, "get_rope_index") else 1  # M-RoPE: (t, h, w) positions
    positions = (mask.cumsum(1) - 1).clamp(min=0).expand(planes, -1, -1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions if planes == 3 else positions[0],
                use_cache=True, output_hidden_states=True)
    cache = getattr(out, CACHE_KWARG)
    nodes = [n for _, n in find_adapter(model).stack_nodes(model) if isinstance(n, DecoderLayerNode)]
    valid = mask.bool()
    for node in (nodes[0], nodes[-1]):  # a hybrid model's attention layers are not all its layers
        state = LLMState(out.hidden_states[node.index], valid, torch.zeros_like(valid), positions,
                         torch.zeros_like(ids))
        theirs = cache.layers[node.index].keys.transpose(1, 2).flatten(2)
        torch.testing.assert_close(node.keys(state)[valid], theirs[valid], **TIGHT)
