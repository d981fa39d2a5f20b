"""The one seam between luvc and transformers' private or version-dependent names.

luvc reaches into transformers in places its public API does not cover: the
attention implementation a config selected, a decoder layer's cache slot, the
cache's per-layer storage, Qwen2-VL's cached rotary offsets, the keyword the
KV cache travels under, generate's per-beam expansion of encoder outputs, and
helpers and output classes that live only in ``transformers.models.<family>``;
and in accelerate, the hook a dispatched module carries (``_hf_hook``) and the
forward it calls (``_old_forward``).
Every such access is a named function or constant here, so a transformers
upgrade that moves one breaks this module (and ``tests/runtime/test_hf_seam.py``)
instead of a scattered handful of call sites. Public top-level names
(``from transformers import X``) are imported where they are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as MultimodalOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as _clip
from transformers.models.gemma3.modeling_gemma3 import Gemma3ModelOutputWithPast
from transformers.models.idefics3.modeling_idefics3 import Idefics3BaseModelOutputWithPast
from transformers.models.internvl.modeling_internvl import InternVLModelOutputWithPast
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModelOutputWithPast,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.qwen2_vl import modeling_qwen2_vl as _qwen2_vl
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeBaseModelOutputWithPast
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeBaseModelOutputWithPast
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMBaseModelOutputWithPast
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import (
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

__all__ = [
    "BaseModelOutputWithPast", "BaseModelOutputWithPooling", "CACHE_KWARG", "CLIP_EAGER_ATTENTION", "DynamicCache",
    "DynamicLayer", "Gemma3ModelOutputWithPast", "Idefics3BaseModelOutputWithPast", "InternVLModelOutputWithPast",
    "LlavaModelOutputWithPast", "LlavaOnevisionModelOutputWithPast", "MultimodalExpansionHook", "MultimodalOutput",
    "QWEN_VISION_EAGER_ATTENTION", "QWEN_VISION_ROTARY", "Qwen3VLMoeBaseModelOutputWithPast",
    "Qwen3_5MoeBaseModelOutputWithPast", "SmolVLMBaseModelOutputWithPast", "attention_function",
    "attn_implementation", "cache_layer_index", "direct_weights", "execution_device", "follow_class",
    "full_attention_cache", "get_anyres_image_grid_shape", "get_vision_position_ids", "get_vision_window_index",
    "image_size_to_num_patches", "inner_output_class", "is_flash_attention_requested", "learned_position_taps",
    "linear_attention_state", "reset_rope_deltas", "restore_forward", "rotary_function", "set_attn_implementation",
    "smart_resize", "unpad_image", "vision_position_embeddings", "vision_rotary_function",
]

def smart_resize(height: int, width: int, factor: int, **bounds: int) -> tuple[int, int]:
    """Qwen2-VL's processor sizing, transformers' own ``smart_resize``. Its module imports PIL, which the core
    install leaves out, so it loads on first use (sizing inputs), never when luvc is imported."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as resize

    return resize(height, width, factor=factor, **bounds)


#: The keyword transformers' decoder layers and models take the KV cache under (``past_key_values`` before 5.24,
#: the oldest release luvc admits).
CACHE_KWARG = "cache"

#: Eager attention of Qwen2-VL's vision tower (``[1, H, N, d]`` heads): the fallback ``attention_function`` gets
#: for size-weighted Qwen-style vision attention.
QWEN_VISION_EAGER_ATTENTION: Callable = _qwen2_vl.eager_attention_forward
#: Qwen2-VL's 2-D vision rotary, ``(q, k, cos, sin) -> (q, k)`` on ``[N, H, d]`` heads.
QWEN_VISION_ROTARY: Callable = _qwen2_vl.apply_rotary_pos_emb_vision
#: CLIP's eager attention (``[B, H, S, d]`` heads): the fallback for size-weighted CLIP-style attention.
CLIP_EAGER_ATTENTION: Callable = _clip.eager_attention_forward


def attn_implementation(config) -> str | None:
    """The attention implementation ``config`` selected (``eager``, ``sdpa``, ``flash_attention_2``...).

    Private (``config._attn_implementation``): the public ``attn_implementation``
    is only what the caller asked for, not what the model resolved it to.
    """
    return config._attn_implementation


def set_attn_implementation(config, impl: str) -> None:
    """Make ``config`` select attention ``impl`` before a model is built from it (the zoo and fidelity
    models set it per sub-config, which ``from_pretrained(attn_implementation=...)`` does for released ones)."""
    config._attn_implementation = impl


def attention_function(config, eager: Callable) -> Callable:
    """The attention kernel ``config`` selects, ``eager`` for eager attention: what transformers' own
    attention modules call, so luvc's copies run the same kernel (``ALL_ATTENTION_FUNCTIONS``)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation(config), eager)


def rotary_function(attention: nn.Module) -> Callable:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` of the ``modeling_*`` file defining an LLM attention module's
    class: luvc recomputes a layer's post-rotary queries and keys with its family's own rotary."""
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb


def vision_rotary_function(attention: nn.Module) -> Callable:
    """``apply_rotary_pos_emb_vision(q, k, cos, sin)`` of the ``modeling_*`` file defining a Qwen-style
    vision attention module's class (Qwen2-VL's or Qwen2.5-VL's own)."""
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision


def inner_output_class(inner_class: type) -> type:
    """The output class an inner VLM model's ``forward`` returns, read from its return annotation
    (``tuple | <Family>ModelOutputWithPast``); ``MultimodalOutput`` where the annotation names none."""
    hints = typing.get_type_hints(inner_class.forward)
    for candidate in typing.get_args(hints.get("return")) or (hints.get("return"),):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate) \
                and "last_hidden_state" in {f.name for f in dataclasses.fields(candidate)}:
            return candidate
    return MultimodalOutput


def cache_layer_index(attention: nn.Module) -> int:
    """The cache slot a decoder layer's attention (or linear-attention token mixer) writes (``layer_idx``);
    luvc keys its per-layer cache bookkeeping by it, so it matches the cache's own layers."""
    return attention.layer_idx


def linear_attention_state(cache, layer_idx: int) -> tuple[Tensor | None, Tensor | None]:
    """The convolution and recurrent state a linear-attention layer (Gated DeltaNet) keeps in ``cache``
    (None before its first forward): transformers >= 5.x hybrid caches' per-layer state accessors."""
    return cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)


def learned_position_taps(grid_thw: Tensor, visual: nn.Module) -> tuple[Tensor, Tensor]:
    """[N, taps] indices into and weights of a Qwen3-VL-style tower's learned position table (``pos_embed``)
    that resample it to each image's patch grid, in the tower's block-major patch order: what its forward
    adds to the patch embeddings (``get_vision_interpolation_indices_and_weights`` and the tower's settings)."""
    return get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)


def full_attention_cache(cache) -> None:
    """Make every layer of a ``DynamicCache`` keep all its keys, in place.

    Sliding-window layers (``DynamicSlidingWindowLayer``) evict keys by count;
    luvc masks windows by position instead, and a pruned sequence's kept keys
    must stay. Reaches ``cache.layers``, transformers' per-layer storage.
    """
    cache.layers = [layer if type(layer) is DynamicLayer else DynamicLayer() for layer in cache.layers]


def vision_position_embeddings(visual: nn.Module, grid_thw: Tensor) -> Tensor:
    """[N, D] the learned position embeddings a Qwen3-VL vision tower adds to its patch embeddings before the
    first block: its square table resampled to each grid, patches in 2x2-block order. Reads the tower's
    interpolation settings (``num_grid_per_side``, ``interpolation_mode``, ``interpolation_align_corners``)."""
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
    return (visual.pos_embed(indices) * weights[:, :, None]).sum(1)


def reset_rope_deltas(inner: nn.Module) -> None:
    """Forget the rotary offsets a Qwen2-VL inner model cached from its last prefill (``rope_deltas``):
    a compiled or uncompiled model must not decode with offsets the other computed."""
    inner.rope_deltas = None


class MultimodalExpansionHook:
    """Mixin for an outer model: routes ``generate``'s private ``_expand_multimodal_outputs`` (how encoder
    outputs are repeated for beams and ``num_return_sequences``) to ``luvc_expand_outputs``."""

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        return self.luvc_expand_outputs(input_ids, mm_encoder_output, expand_size)

    def luvc_expand_outputs(self, input_ids, mm_encoder_output: dict, expand_size: int) -> dict[str, Any]:
        raise NotImplementedError


def follow_class(module: nn.Module, was: type) -> Callable | None:
    """Make the forward an accelerate hook calls on ``module`` its current class's, after its class changed from
    ``was``; return the forward the hook called before (None: no hook, or it calls something else).

    ``add_hook_to_module`` keeps the module's bound ``forward`` as ``_old_forward`` and calls that, so a
    hooked module whose class is swapped would keep running ``was.forward``. ``forward`` itself is checked
    too: ``remove_hook_from_module`` leaves ``_old_forward`` behind as the instance's ``forward``.
    """
    before = None
    for name in ("_old_forward", "forward"):
        bound = module.__dict__.get(name)
        if getattr(bound, "__self__", None) is module and getattr(bound, "__func__", None) is was.forward:
            module.__dict__[name] = types.MethodType(type(module).forward, module)
            before = bound if name == "_old_forward" else before
    return before


def restore_forward(module: nn.Module, forward: Callable) -> None:
    """Give an accelerate hook on ``module`` back the forward ``follow_class`` returned."""
    module.__dict__["_old_forward"] = forward


def execution_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` computes on: its accelerate hook's execution device (its weights may be offloaded,
    on the meta device between calls), else that of its first parameter or buffer not on the meta device;
    None when neither says (all offloaded, no hook)."""
    hook = module.__dict__.get("_hf_hook")
    for each in getattr(hook, "hooks", (hook,)):
        device = getattr(each, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


@contextlib.contextmanager
def direct_weights(module: nn.Module) -> Iterator[None]:
    """While active, ``module``'s own parameters hold their weights even if accelerate offloaded them.

    An offloading hook loads a module's weights only around a call of that module; luvc code that reads a
    parameter without calling its module (a projection weight, a layer scale) must load them itself, or it
    would compute with the meta placeholders.
    """
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)
