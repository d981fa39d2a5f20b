"""Qwen2.5-VL adapter: Qwen2-VL's glue plus window attention in the vision tower.

What differs from Qwen2-VL, and lives here:

* Most vision blocks attend within windows of ``window_size`` px (8x8 patches,
  4x4 units); the blocks in ``fullatt_block_indexes`` attend per frame. The
  windows are rebuilt from the *current* unit grid, so they stay valid after
  every merge: a windowed block's tokens are put in window order for the call
  and back to grid order after it.
* ``get_rope_index`` takes ``second_per_grid_ts`` for video, which the caller
  passes to ``forward`` and luvc forwards.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from luvc.fx.nodes import StackNode
from luvc.hf import get_vision_window_index
from luvc.models.example_inputs import TINY_TEXT
from luvc.models.qwen2_vl import (
    QWEN_7B_TEXT,
    CompiledQwen2VLModel,
    Qwen2VLAdapter,
    VisionBlockNode,
    _cumulative,
    mrope,
)
from luvc.registry import hookimpl
from luvc.state import LedgerRow, VisionState


class WindowedVisionBlockNode(VisionBlockNode):
    """A Qwen2.5-VL vision block with window attention over the current unit grid."""

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow(f"vision.blocks.{self.index}", "vision", state.tokens_per_image()))
        scratch = self._layout(state)
        if "window_order" not in scratch:
            visual = self.visual[0]
            m = visual.spatial_merge_size
            grid = torch.tensor([(t, h * m, w * m) for t, h, w in state.grids])
            units, cu_windows = get_vision_window_index(grid, m, visual.window_size, visual.patch_size)
            order = (units[:, None] * state.unit + torch.arange(state.unit)).reshape(-1).to(state.hidden.device)
            scratch["window_order"] = order
            scratch["window_restore"] = torch.argsort(order)
            lengths = (cu_windows[1:] - cu_windows[:-1]).tolist()
            scratch["cu_windows"] = _cumulative(lengths, state.hidden.device)
            scratch["max_window"] = max(lengths)
            cos, sin = scratch["rope"]
            scratch["window_rope"] = (cos[order], sin[order])
            scratch["window_sizes"] = state.sizes[order] if scratch["sized"] else None
        order, restore = scratch["window_order"], scratch["window_restore"]
        hidden, keys, received = self._call(state.hidden[order], scratch["cu_windows"], scratch["max_window"],
                                            scratch["window_rope"], scratch["window_sizes"])
        return dataclasses.replace(state, hidden=hidden[restore], keys=keys[restore] if keys is not None else None,
                                   attention=received[restore] if received is not None else None)


class CompiledQwen2_5_VLModel(CompiledQwen2VLModel):
    """Compiled Qwen2.5-VL inner model: as Qwen2-VL, with video timing for M-RoPE."""

    _luvc_rope_kwargs = ("second_per_grid_ts",)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration``."""

    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    compiled_mixin = CompiledQwen2_5_VLModel
    _vision_out_key = "out_hidden_size"
    examples = {
        # Windowed vision attention (window 112 px) with full attention in a few blocks.
        "qwen2.5-vl-tiny": dict(
            text=TINY_TEXT | mrope([2, 3, 3], 1e4),
            vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, window_size=112,
                        fullatt_block_indexes=[1, 3], tokens_per_second=2),
        ),
        "qwen2.5-vl-7b": dict(
            text=QWEN_7B_TEXT,
            vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        ),
    }

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        visual = model.model.visual
        if index in visual.fullatt_block_indexes:
            return VisionBlockNode(visual.blocks[index], index, visual)
        return WindowedVisionBlockNode(visual.blocks[index], index, visual)


@hookimpl
def luvc_model_adapters() -> list:
    return [Qwen2_5_VLAdapter()]
