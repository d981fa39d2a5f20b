"""The seam with transformers (``luvc.hf``): each access still reaches what luvc expects on the
installed transformers, and no private transformers name is reached from anywhere else in luvc."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from transformers.generation.utils import GenerationMixin

import luvc
from luvc import hf
from luvc.examples import build_model, model_config, vlm_inputs
from luvc.models import find_adapter
from luvc.runtime.llm import DecoderLayerNode

LUVC = Path(__file__).resolve().parents[2] / "luvc"
SEAM = LUVC / "hf.py"


def _decoder_layers(family: str) -> list[torch.nn.Module]:
    """The LLM's decoder layers of a (meta) tiny model, found by its adapter."""
    model = build_model(family, device="meta")
    return [node.block for _, node in find_adapter(model).stack_nodes(model) if isinstance(node, DecoderLayerNode)]


def _sdpa(q, k, v, scale, mask=None):
    """Reference bidirectional attention on ``[B, H, S, d]`` heads, output ``[B, S, H, d]``."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def test_cache_kwarg_is_the_decoder_layer_and_output_cache_name():
    model = build_model("qwen2-vl-tiny")
    layer = model.model.language_model.layers[0]
    assert hf.CACHE_KWARG in inspect.signature(type(layer).forward).parameters
    out = model(input_ids=torch.tensor([[10, 11, 12]]), use_cache=True)
    assert isinstance(getattr(out, hf.CACHE_KWARG), hf.DynamicCache)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reads_what_set_attn_implementation_wrote(attn):
    model = build_model("llava-tiny", attn=attn)  # the zoo sets it through the seam
    text, vision = model.model.language_model, model.model.vision_tower
    assert hf.attn_implementation(text.layers[0].self_attn.config) == attn
    assert hf.attn_implementation(vision.encoder.layers[0].self_attn.config) == attn
    assert hf.attn_implementation(model.config.get_text_config()) == attn


def test_attention_function_is_the_kernel_the_config_selects():
    config = model_config("qwen2-vl-tiny").vision_config
    hf.set_attn_implementation(config, "eager")
    assert hf.attention_function(config, hf.QWEN_VISION_EAGER_ATTENTION) is hf.QWEN_VISION_EAGER_ATTENTION
    hf.set_attn_implementation(config, "sdpa")
    sdpa = hf.attention_function(config, hf.QWEN_VISION_EAGER_ATTENTION)
    assert sdpa is not hf.QWEN_VISION_EAGER_ATTENTION
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    out, _ = sdpa(module, q, k, v, None, scaling=0.3, dropout=0.0, is_causal=False)
    torch.testing.assert_close(out, _sdpa(q, k, v, 0.3))


@pytest.mark.parametrize("eager", ["QWEN_VISION_EAGER_ATTENTION", "CLIP_EAGER_ATTENTION"])
def test_eager_attention_takes_module_heads_mask_and_scaling(eager):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 6, 8).unbind(0)  # [B, H, S, d]
    mask = torch.randn(2, 1, 6, 6)
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    out, weights = getattr(hf, eager)(module, q, k, v, mask, scaling=0.25, dropout=0.0)
    torch.testing.assert_close(out, _sdpa(q, k, v, 0.25, mask))
    assert weights.shape == (2, 3, 6, 6)


def test_qwen_vision_rotary_is_the_qwen2_vl_towers_own():
    model = build_model("qwen2-vl-tiny", device="meta")
    attn = model.model.visual.blocks[0].attn
    assert hf.vision_rotary_function(attn) is hf.QWEN_VISION_ROTARY
    q, k = torch.randn(2, 5, 2, 8).unbind(0)
    angle = torch.rand(5, 8)
    rq, rk = hf.QWEN_VISION_ROTARY(q, k, angle.cos(), angle.sin())
    rotated = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)  # rotate_half
    torch.testing.assert_close(rq, q * angle.cos()[:, None] + rotated * angle.sin()[:, None])
    assert rk.shape == k.shape


#: Families whose LLM rotates interleaved pairs (Cohere's), not the two halves of each head.
INTERLEAVED_ROTARY = {"aya-vision-tiny"}


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_function_rotates_every_llms_heads(family):
    q, k = torch.randn(2, 1, 2, 5, 8).unbind(0)  # [B, H, S, d]
    angle = torch.rand(1, 5, 8)
    rq, rk = hf.rotary_function(_decoder_layers(family)[0].self_attn)(q, k, angle.cos(), angle.sin())
    for x, rx in ((q, rq), (k, rk)):
        if family in INTERLEAVED_ROTARY:
            rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
        else:
            rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
        torch.testing.assert_close(rx, x * angle.cos()[:, None] + rotated * angle.sin()[:, None])


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_layer_index_is_the_layers_position(family):
    """Every attention layer's cache slot is its position in the stack (hybrid models: among all layers)."""
    model = build_model(family, device="meta")
    nodes = [node for _, node in find_adapter(model).stack_nodes(model) if isinstance(node, DecoderLayerNode)]
    assert [hf.cache_layer_index(node.block.self_attn) for node in nodes] == [node.index for node in nodes]
    assert nodes[-1].index == len(find_adapter(model).language_model(model).layers) - 1


def test_full_attention_cache_replaces_sliding_window_layers():
    config = model_config("gemma3-tiny").text_config
    cache = hf.DynamicCache(config=config)
    assert any(type(layer) is not hf.DynamicLayer for layer in cache.layers), "gemma3-tiny has sliding layers"
    count = len(cache.layers)
    hf.full_attention_cache(cache)
    assert len(cache.layers) == count and all(type(layer) is hf.DynamicLayer for layer in cache.layers)
    assert cache.get_seq_length() == 0


def test_reset_rope_deltas_forgets_the_offsets_a_prefill_cached(astronaut):
    model = build_model("qwen2-vl-tiny")
    model(**vlm_inputs([[astronaut]], prompts=[(10, 11)], config=model.config))
    assert isinstance(model.model.rope_deltas, torch.Tensor), "Qwen2-VL caches its rotary offsets there"
    hf.reset_rope_deltas(model.model)
    assert model.model.rope_deltas is None


def test_expansion_hook_overrides_generates_own_method():
    ours = inspect.signature(hf.MultimodalExpansionHook._expand_multimodal_outputs).parameters
    theirs = inspect.signature(GenerationMixin._expand_multimodal_outputs).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    source = inspect.getsource(GenerationMixin)
    assert "self._expand_multimodal_outputs(" in source, "generate still calls it"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_returns_the_output_class_luvc_builds(family):
    model = build_model(family)
    inner = model.model(input_ids=torch.tensor([[10, 11, 12]]), use_cache=True)
    luvc.compile(model, "identity")
    declared = model.model._luvc_output_class
    assert type(inner) is declared
    fields = {f.name for f in dataclasses.fields(declared)}
    assert {"last_hidden_state", hf.CACHE_KWARG} <= fields


def test_inner_output_class_is_what_the_inner_forward_is_annotated_to_return():
    from transformers import LlavaNextModel, SmolVLMModel

    assert hf.inner_output_class(LlavaNextModel).__name__ == "LlavaNextModelOutputWithPast"
    assert hf.inner_output_class(SmolVLMModel) is hf.SmolVLMBaseModelOutputWithPast

    class Unannotated(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert hf.inner_output_class(Unannotated) is hf.MultimodalOutput


def test_vision_output_class_has_pooled_features():
    fields = {f.name for f in dataclasses.fields(hf.BaseModelOutputWithPooling)}
    assert {"last_hidden_state", "pooler_output"} <= fields
    assert {"last_hidden_state", hf.CACHE_KWARG} <= {f.name for f in dataclasses.fields(hf.MultimodalOutput)}


def test_smart_resize_rounds_to_the_merge_factor_within_the_pixel_budget():
    assert hf.smart_resize(224, 224, factor=28, max_pixels=14 * 14 * 4 * 1280) == (224, 224)
    h, w = hf.smart_resize(1000, 600, factor=28, max_pixels=200_000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 200_000


def test_vision_position_ids_are_block_major_rows_and_columns():
    ids = hf.get_vision_position_ids(torch.tensor([[1, 4, 4]]), 2)
    assert ids[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert ids.shape == (16, 2)


def test_vision_position_embeddings_are_what_the_qwen3_vl_tower_adds_before_its_first_block(astronaut):
    model = build_model("qwen3-vl-tiny")
    visual = model.model.visual
    inputs = vlm_inputs([[astronaut[:120, :200]]], config=model.config)
    received = []
    visual.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: received.append(args[0]),
                                               with_kwargs=True)
    model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    patches = visual.patch_embed(inputs["pixel_values"])
    embeddings = hf.vision_position_embeddings(visual, inputs["image_grid_thw"])
    assert embeddings.shape == patches.shape
    torch.testing.assert_close(patches + embeddings, received[0], rtol=0, atol=0)


def test_vision_window_index_permutes_units_into_windows():
    visual = build_model("qwen2.5-vl-tiny", device="meta").model.visual
    grid = torch.tensor([[1, 8, 12]])
    index, cu_windows = hf.get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                   visual.patch_size)
    units = 8 * 12 // visual.spatial_merge_size ** 2
    assert sorted(index.tolist()) == list(range(units))
    assert int(cu_windows[-1]) == units * visual.spatial_merge_size ** 2


def test_anyres_helpers_agree_on_the_tile_grid():
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    rows, cols = hf.get_anyres_image_grid_shape((20, 50), pinpoints, 28)
    assert (rows, cols) == (1, 2)
    assert hf.image_size_to_num_patches((20, 50), pinpoints, 28) == 1 + rows * cols
    assert hf.unpad_image(torch.zeros(3, 28, 56), (20, 50)).shape == (3, 22, 56)


@pytest.mark.parametrize(("impl", "flash"), [("sdpa", False), ("eager", False), ("flash_attention_2", True)])
def test_is_flash_attention_requested_reads_the_config(impl, flash):
    config = model_config("qwen2-vl-tiny").vision_config
    hf.set_attn_implementation(config, impl)
    assert hf.is_flash_attention_requested(config) is flash


class _Doubled(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_follow_class_makes_an_accelerate_hook_call_the_new_class_and_restore_forward_undoes_it():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    layer = add_hook_to_module(torch.nn.Linear(2, 2), AlignDevicesHook(execution_device="cpu"))
    x = torch.ones(1, 2)
    plain = layer(x)
    layer.__class__ = _Doubled
    before = hf.follow_class(layer, torch.nn.Linear)
    torch.testing.assert_close(layer(x), 2 * plain)
    layer.__class__ = torch.nn.Linear
    hf.follow_class(layer, _Doubled)
    hf.restore_forward(layer, before)
    assert layer._old_forward is before
    torch.testing.assert_close(layer(x), plain)


def test_follow_class_leaves_an_unhooked_module_alone():
    layer = torch.nn.Linear(2, 2)
    layer.__class__ = _Doubled
    assert hf.follow_class(layer, torch.nn.Linear) is None
    assert "forward" not in vars(layer)


def test_execution_device_is_the_hooks_even_when_weights_are_offloaded():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    layer = torch.nn.Linear(2, 2)
    assert hf.execution_device(layer) == torch.device("cpu")
    weights = dict(layer.state_dict())
    add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))
    assert layer.weight.device.type == "meta"
    assert hf.execution_device(layer) == torch.device("cpu")
    assert hf.execution_device(torch.nn.Linear(2, 2, device="meta")) is None


#: Private transformers and accelerate names; only the seam may reach them.
PRIVATE = [
    r"\._attn_implementation\b", r"\.rope_deltas\b", r"\.layer_idx\b", r"cache\.layers\b", r"\bDynamicLayer\b",
    r"_expand_multimodal_outputs", r"\bALL_ATTENTION_FUNCTIONS\b", r"\bsys\.modules\b",
    r"\bapply_rotary_pos_emb(_vision)?\b", r"\beager_attention_forward\b", r"\b_old_forward\b", r"\b_hf_hook\b",
]


def _transformers_submodules(tree: ast.AST) -> list[str]:
    """Modules below the top-level ``transformers`` package that ``tree`` imports."""
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [n for n in names if n.startswith("transformers.")]
    return found


def test_private_transformers_names_are_reached_only_through_the_seam():
    offences = []
    for path in sorted(LUVC.rglob("*.py")):
        if path == SEAM:
            continue
        text = path.read_text()
        where = path.relative_to(LUVC.parent)
        offences += [f"{where}: imports {m}" for m in _transformers_submodules(ast.parse(text))]
        offences += [f"{where}: {p}" for p in PRIVATE if re.search(p, text)]
    assert not offences, "route these through luvc/hf.py:\n" + "\n".join(offences)


def test_learned_position_taps_resample_the_position_table_in_block_major_order():
    visual = build_model("qwen3.5-tiny").model.visual
    index, weight = hf.learned_position_taps(torch.tensor([[1, 4, 6]]), visual)
    ours = (visual.pos_embed(index) * weight[:, :, None]).sum(1)
    side = visual.num_grid_per_side
    table = visual.pos_embed.weight.T.reshape(1, -1, side, side)
    raster = torch.nn.functional.interpolate(table, size=(4, 6), mode="bilinear", align_corners=True)[0]
    block_major = raster.reshape(-1, 2, 2, 3, 2).permute(1, 3, 2, 4, 0).reshape(24, -1)  # 2x2 merge units
    torch.testing.assert_close(ours, block_major, rtol=1e-5, atol=1e-6)


def test_linear_attention_state_is_the_conv_window_and_recurrent_state_a_layer_caches():
    model = build_model("qwen3.5-tiny")
    text = model.config.text_config
    cache = hf.DynamicCache(config=text)
    assert hf.linear_attention_state(cache, 0) == (None, None)
    model(input_ids=torch.tensor([[10, 11, 12, 13, 14, 15]]), use_cache=True, **{hf.CACHE_KWARG: cache})
    conv, recurrent = hf.linear_attention_state(cache, 0)
    mixer = model.model.language_model.layers[0].linear_attn
    assert conv.shape == (1, mixer.conv_dim, text.linear_conv_kernel_dim)
    assert recurrent.shape == (1, text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim)
    assert recurrent.abs().sum() > 0
