"""The one seam between luvc and transformers' private or version-dependent names.

luvc reaches into transformers in places its public API does not cover: the
attention implementation a config selected, a decoder layer's cache slot, the
cache's per-layer storage, Qwen2-VL's cached rotary offsets, the keyword the
KV cache travels under, generate's per-beam expansion of encoder outputs, and
helpers and output classes that live only in ``transformers.models.<family>``.
Every such access is a named function or constant here, so a transformers
upgrade that moves one breaks this module (and ``tests/runtime/test_hf_seam.py``)
instead of a scattered handful of call sites. Public top-level names
(``from transformers import X``) are imported where they are used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
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
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

try:  # transformers >= 5.24: multimodal inner models return their encoder outputs too
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as MultimodalOutput
except ImportError:
    MultimodalOutput = BaseModelOutputWithPast

__all__ = [
    "BaseModelOutputWithPast", "BaseModelOutputWithPooling", "CACHE_KWARG", "CLIP_EAGER_ATTENTION", "DynamicCache",
    "DynamicLayer",
    "Gemma3ModelOutputWithPast", "Idefics3BaseModelOutputWithPast", "InternVLModelOutputWithPast",
    "LlavaModelOutputWithPast", "LlavaOnevisionModelOutputWithPast", "MultimodalExpansionHook", "MultimodalOutput",
    "QWEN_VISION_EAGER_ATTENTION", "QWEN_VISION_ROTARY", "attention_function", "attn_implementation",
    "cache_layer_index", "full_attention_cache", "get_anyres_image_grid_shape", "get_vision_position_ids",
    "get_vision_window_index", "image_size_to_num_patches", "is_flash_attention_requested", "reset_rope_deltas",
    "rotary_function", "set_attn_implementation", "smart_resize", "unpad_image", "vision_rotary_function",
]

def smart_resize(height: int, width: int, factor: int, **bounds: int) -> tuple[int, int]:
    """Qwen2-VL's processor sizing, transformers' own ``smart_resize``. Its module imports PIL, which the core
    install leaves out, so it loads on first use (sizing inputs), never when luvc is imported."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as resize

    return resize(height, width, factor=factor, **bounds)


#: The keyword transformers' decoder layers and models take the KV cache under (renamed ``cache`` in 5.24).
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"

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


def cache_layer_index(attention: nn.Module) -> int:
    """The KV-cache slot a decoder layer's attention writes (``self_attn.layer_idx``); luvc keys its per-layer
    cache bookkeeping by it, so it matches the cache's own layers."""
    return attention.layer_idx


def full_attention_cache(cache) -> None:
    """Make every layer of a ``DynamicCache`` keep all its keys, in place.

    Sliding-window layers (``DynamicSlidingWindowLayer``) evict keys by count;
    luvc masks windows by position instead, and a pruned sequence's kept keys
    must stay. Reaches ``cache.layers``, transformers' per-layer storage.
    """
    cache.layers = [layer if type(layer) is DynamicLayer else DynamicLayer() for layer in cache.layers]


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
