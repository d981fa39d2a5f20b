"""Qwen2-VL adapter: every Qwen2-VL-specific assumption luvc makes lives here.

* Vision tokens arrive block-major: per image ``(t, h/2, w/2, 2, 2)``, so a
  unit is the 2x2 block the ``PatchMerger`` consumes; OIM merges whole units.
* Vision attention runs per frame (``cu_seqlens`` from the unit grids) with
  2-D rotary positions (size-weighted means after a merge); merged tokens'
  sizes re-weight attention (``SizedVisionAttention``).
* The LLM sees ``t * h' * w'`` placeholders per image: the caller's
  placeholder runs are shortened to the merged grid and M-RoPE positions are
  computed by the model's own ``get_rope_index`` on that grid.
* An image a transform lays out as one row (``(t, 1, n)``: VisionZip, ToMe)
  is no longer a grid, so its tokens keep the height and width positions of
  the cells they come from (a merged token: the cell of its size-weighted
  centre), and the text after it keeps its uncompressed positions. A row's
  own positions would move that text by ``n`` instead of the image's side.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from luvc import hf
from luvc.fx.nodes import StackNode, captured_output
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, VIDEO_TOKEN, VISION_END, VISION_START, padded
from luvc.registry import hookimpl
from luvc.runtime.compiled import CompiledVLM, vision_output
from luvc.runtime.sized_attention import SizedVisionAttention
from luvc.runtime.vision_scores import received_attention
from luvc.state import LedgerRow, VisionState


class VisionBlockNode(StackNode):
    """One vision block, called on a ``VisionState`` with per-frame attention."""

    site = "vision"

    def __init__(self, block: nn.Module, index: int, visual: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.capture_keys = False
        self.capture_attention = False
        self.visual = [visual]  # a list keeps the tower out of this node's children

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow(f"vision.blocks.{self.index}", "vision", state.tokens_per_image()))
        scratch = self._layout(state)
        hidden, keys, received = self._call(state.hidden, scratch["cu_seqlens"], scratch["max_seqlen"],
                                            scratch["rope"], state.sizes if scratch["sized"] else None)
        return dataclasses.replace(state, hidden=hidden, keys=keys, attention=received)

    def _layout(self, state: VisionState) -> dict:
        """Per-frame segments, rotary embeddings and whether sizes matter: computed once per state."""
        scratch = state.scratch
        if "cu_seqlens" not in scratch:
            seqlens = [h * w * state.unit for t, h, w in state.grids for _ in range(t)]
            scratch["cu_seqlens"] = _cumulative(seqlens, state.hidden.device)
            scratch["max_seqlen"] = max(seqlens)
            scratch["rope"] = self.visual[0].rotary_pos_emb(state.hidden, state.positions)
            scratch["sized"] = bool((state.sizes != 1).any())
        return scratch

    def _call(self, hidden: Tensor, cu_seqlens: Tensor, max_seqlen: int, rope,
              sizes: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run the block; return its output and, if asked for, its attention keys (mean over heads) and the
        attention each token receives (mean over heads and over the queries of its segment)."""
        extra = {"luvc_sizes": sizes} if sizes is not None else {}
        attn = self.block.attn
        with captured_output(attn.qkv if self.capture_keys else None, lambda qkv: qkv) as captured:
            out = self.block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rope, **extra)
        if not captured:
            return out, None, None
        q, k, _ = captured[0].reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        received = None
        if self.capture_attention:
            apply_rotary = hf.vision_rotary_function(attn)
            q, k_rot = apply_rotary(q, k, *rope)
            received = received_attention(q, k_rot, cu_seqlens, attn.scaling)
        return out, k.mean(dim=1), received


def _cumulative(lengths: list[int], device) -> Tensor:
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


class VisionProjectNode(StackNode):
    """The 2x2 patch merger: each unit becomes one LLM token."""

    site = "vision"
    kind = "io"

    def __init__(self, merger: nn.Module) -> None:
        super().__init__()
        self.block = merger

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow("vision.merger", "vision", state.tokens_per_image()))
        u = state.unit
        return state.replace(
            hidden=self.block(state.hidden), unit=1, keys=None,
            sizes=state.sizes.view(-1, u).sum(dim=1),
            positions=state.positions.view(-1, u, 2).mean(dim=1),
        )


def mrope(sections: list[int], theta: float) -> dict:
    """Config keywords of M-RoPE with ``sections`` (temporal, height, width) of the rotary half-dimension."""
    return {"rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": theta}}


#: The released Qwen2-VL towers (2B and 7B alike), and the 7B LLM, which Qwen2.5-VL-7B shares.
_RELEASED_TOWER = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)
QWEN_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False) | mrope([16, 24, 24], 1e6)


class Qwen2VLAdapter(FamilyAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration``."""

    name = "qwen2_vl"
    capabilities = frozenset({"llm_grid"})
    model_class: type = Qwen2VLForConditionalGeneration
    compiled_mixin: type  # set below: CompiledQwen2VLModel
    sized_attention = SizedVisionAttention
    attention_attr = "attn"

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.visual.blocks

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        return VisionBlockNode(model.model.visual.blocks[index], index, model.model.visual)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        return "vision.merger", VisionProjectNode(model.model.visual.merger)

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1,
                   max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[tuple[int, int, int], int]:
        vision = model.config.vision_config
        m, patch = vision.spatial_merge_size, vision.patch_size
        h, w = hf.smart_resize(height, width, factor=patch * m, max_pixels=max_pixels)
        t = max(1, frames // vision.temporal_patch_size)
        return (t, h // patch // m, w // patch // m), m * m

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        hf.reset_rope_deltas(model.model)
        return super().install(model, graph)

    def uninstall(self, model: nn.Module, record: dict) -> None:
        super().uninstall(model, record)
        hf.reset_rope_deltas(model.model)

    examples = {
        # Small enough for property tests: 4 vision blocks, 4 decoder layers.
        "qwen2-vl-tiny": dict(text=TINY_TEXT | mrope([2, 3, 3], 1e4),
                              vision=dict(depth=4, embed_dim=32, num_heads=4, mlp_ratio=2)),
        # The demo's model: Qwen2-VL-2B's shape ratios at a size a laptop CPU runs in seconds.
        "qwen2-vl-demo": dict(
            text=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6,
                      num_key_value_heads=2) | mrope([8, 12, 12], 1e6),
            vision=dict(depth=8, embed_dim=256, num_heads=4, mlp_ratio=4),
        ),
        # Real dimensions of Qwen2-VL-2B-Instruct and Qwen2-VL-7B-Instruct (their config.json), for speed runs.
        "qwen2-vl-2b": dict(
            text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True) | mrope([16, 24, 24], 1e6),
            vision=_RELEASED_TOWER,
        ),
        "qwen2-vl-7b": dict(text=QWEN_7B_TEXT, vision=_RELEASED_TOWER),
    }

    def shorten_tower(self, vision: dict, layers: int) -> None:
        """Qwen towers count blocks as ``depth``; full-attention blocks past the cut move to its last block."""
        vision["depth"] = layers
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1]

    def example_config(self, text: dict, vision: dict, spec: dict):
        vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, **vision}
        vision[self._vision_out_key] = text["hidden_size"]
        tie = text.pop("tie_word_embeddings", True)
        return self.config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                 video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                                 vision_end_token_id=VISION_END, tie_word_embeddings=tie)

    _vision_out_key = "hidden_size"  # the vision config key of the width the merger projects to

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """What the Qwen2-VL processor gives: each image or video wrapped in vision start/end tokens with
        one placeholder per LLM token, ``mm_token_type_ids``, pixel tensors and grids."""
        processor = self._example_processor(config, pixels)
        out: dict = {}
        rows: list[list[int]] = [[1] for _ in prompts]
        start, end = config.vision_start_token_id, config.vision_end_token_id
        for kind, per_sample, token in (("image", images, config.image_token_id),
                                        ("video", videos, config.video_token_id)):
            items = [(i, item) for i, sample in enumerate(per_sample) for item in sample]
            if not items:
                continue
            if kind == "image":
                feats = processor(images=[item for _, item in items], return_tensors="pt")
                out["pixel_values"], grid = feats["pixel_values"], feats["image_grid_thw"]
                out["image_grid_thw"] = grid
            else:
                frames = [processor(images=list(v), return_tensors="pt") for _, v in items]
                out["pixel_values_videos"] = torch.cat([_as_video(f) for f in frames])
                grid = torch.tensor([[len(v) // 2, *f["image_grid_thw"][0, 1:].tolist()]
                                     for (_, v), f in zip(items, frames)])
                out["video_grid_thw"] = grid
            for (i, _), g in zip(items, grid.tolist()):
                rows[i] += self._example_placeholders(kind, g, [start, token, end])
        out.update(padded([row + list(prompt) for row, prompt in zip(rows, prompts)]))
        ids = out["input_ids"]
        out["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
        return out

    def _example_processor(self, config, pixels: int):
        """The image processor of the family's example inputs, resizing to at most ``pixels``."""
        patch = config.vision_config.patch_size
        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=pixels, patch_size=patch)

    def _example_placeholders(self, kind: str, grid: list[int], tokens: list[int]) -> list[int]:
        """The tokens one image or video of patch grid ``grid`` puts in the prompt; ``tokens`` are
        vision start, placeholder and vision end."""
        start, token, end = tokens
        return [start] + [token] * (grid[0] * grid[1] * grid[2] // 4) + [end]


def _as_video(features) -> Tensor:
    """Pair consecutive frames' patches into temporal patches (temporal_patch_size 2)."""
    pv = features["pixel_values"]
    t, h, w = len(features["image_grid_thw"]), *features["image_grid_thw"][0, 1:].tolist()
    per = pv.view(t, h * w, 3, 2, -1)[:, :, :, 0]  # each frame's first temporal copy
    pairs = per.view(t // 2, 2, h * w, 3, -1).permute(0, 2, 3, 1, 4)
    return pairs.reshape((t // 2) * h * w, -1)


def restore_cells(positions: Tensor, placed: Tensor, out, merge: int) -> None:
    """Give the tokens of each row-laid image (merged grid ``(t, 1, n)`` from a taller source grid)
    their own cells' height and width positions, in place, and move the rest of its sequence row to
    where the uncompressed image would have left it. ``placed``: [N, 2] (row, index) of the
    modality's placeholders in order; ``merge``: patches per LLM token along a side."""
    start = 0
    heights = (out.luvc_grid_thw[:, 1] // merge).tolist()
    for height, source, cells in zip(heights, out.luvc_source_grids, out.luvc_cells):
        n = len(cells)
        b, at = placed[start, 0], placed[start:start + n, 1]
        start += n
        if height != 1 or source[1] == 1:
            continue
        block = positions[:, b, at]
        first = block[1, 0]  # a one-row grid: every token's height position is the image's start
        before = block.max()
        block[1:] = first + cells.T.to(block)
        after = torch.maximum(block[0].max(), first + max(source[1], source[2]) - 1)
        positions[:, b, at] = block
        positions[:, b, at[-1] + 1:] += after - before


class CompiledQwen2VLModel(CompiledVLM):
    """Compiled Qwen2-VL inner model: encodes through the vision section, M-RoPE from merged grids."""

    _luvc_placeholders = {"image": "image_token_id", "video": "video_token_id"}
    _luvc_pixel_kwargs = {"image": ("pixel_values", "image_grid_thw"),
                          "video": ("pixel_values_videos", "video_grid_thw")}
    _luvc_rope_kwargs: tuple[str, ...] = ()  # forward kwargs that get_rope_index also needs

    def get_image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
        return self._luvc_encode(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs):
        return self._luvc_encode(pixel_values_videos, video_grid_thw)

    def _luvc_encode(self, pixels: Tensor, grid_thw: Tensor) -> hf.BaseModelOutputWithPooling:
        visual = self.visual
        m = visual.spatial_merge_size
        hidden = self._luvc_embed(pixels, grid_thw)
        grids = tuple((int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist())
        state = VisionState(
            hidden=hidden,
            sizes=torch.ones(hidden.shape[0], device=hidden.device),
            positions=hf.get_vision_position_ids(grid_thw, m).float(),
            grids=grids, unit=m * m, log=[],
        )
        return self._luvc_vision_output(self._luvc_sections[0](state), grids)

    def _luvc_embed(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        """[N, D] what the first vision block receives: the patch embeddings."""
        return self.visual.patch_embed(pixels.type(self.visual.dtype))

    def _luvc_vision_output(self, state: VisionState, grids: tuple) -> hf.BaseModelOutputWithPooling:
        """The encoder output of the vision section's final ``state``, ``grids`` the unit grids it started from."""
        m = self.visual.spatial_merge_size
        merged = torch.tensor([(t, h * m, w * m) for t, h, w in state.grids], device=state.hidden.device)
        cells = torch.split(torch.div(state.positions, m, rounding_mode="floor").long(),
                            [t * h * w for t, h, w in state.grids])
        return vision_output(state, [t * h * w for t, h, w in grids], luvc_grid_thw=merged,
                             luvc_source_grids=list(grids), luvc_cells=list(cells))

    def _luvc_embed(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        """[N, D] the patch tokens the first vision block receives (block-major, as the tower orders them)."""
        visual = self.visual
        return visual.patch_embed(pixels.type(visual.dtype))

    def _luvc_positions(self, ids, valid, encoded, position_ids, rebuilt, kwargs):
        batch = ids.shape[0]
        if encoded:
            token_type = (ids == self.config.image_token_id).int() + 2 * (ids == self.config.video_token_id).int()
            grids = {f"{kind}_grid_thw": out.luvc_grid_thw for kind, out in encoded.items()}
            rope = {k: kwargs[k] for k in self._luvc_rope_kwargs if kwargs.get(k) is not None}
            positions, _ = self.get_rope_index(ids, mm_token_type_ids=token_type, attention_mask=valid.long(),
                                               **grids, **rope)
            for kind, out in encoded.items():
                placed = (ids == getattr(self.config, self._luvc_placeholders[kind])).nonzero()
                restore_cells(positions, placed, out, self.visual.spatial_merge_size)
            return positions
        if position_ids is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(3, batch, -1)
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, -1, -1)
        return position_ids[1:] if position_ids.shape[0] == 4 else position_ids

    def _luvc_decode_positions(self, positions: Tensor) -> Tensor:
        return positions[None].expand(3, -1, -1)


Qwen2VLAdapter.compiled_mixin = CompiledQwen2VLModel


@hookimpl
def luvc_model_adapters() -> list:
    return [Qwen2VLAdapter()]
