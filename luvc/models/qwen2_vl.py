"""Qwen2-VL adapter: every Qwen2-VL-specific assumption luvc makes lives here.

* Vision tokens arrive block-major: per image ``(t, h/2, w/2, 2, 2)``, so a
  unit is the 2x2 block the ``PatchMerger`` consumes; OIM merges whole units.
* Vision attention runs per frame (``cu_seqlens`` from the unit grids) with
  2-D rotary positions (size-weighted means after a merge); merged tokens'
  sizes re-weight attention through the values (``SizedVisionAttention``).
* The LLM sees ``t * h' * w'`` placeholders per image: the caller's
  placeholder runs are shortened to the merged grid and M-RoPE positions are
  computed by the model's own ``get_rope_index`` on that grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2VLForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_position_ids

from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.models.llm import (
    CacheRecord,
    DecoderLayerNode,
    FinalNormNode,
    check_attention,
    placeholder_keep,
    right_align,
    scatter_to_caller,
)
from luvc.registry import hookimpl
from luvc.state import LedgerRow, LLMState, VisionState


class SizedVisionAttention:
    """Mixin for Qwen-style vision attention: a token of size ``s`` counts as ``s`` patches.

    Proportional attention (softmax(qk) weighted by size) computed through the
    values: attend to ``[s * v, s]`` and divide by the last channel. For
    FlashAttention, which wants equal head dims, queries and keys are
    zero-padded to the values' width, which leaves every logit unchanged.
    """

    def forward(self, hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings=None,
                max_seqlen: int | None = None, luvc_sizes: Tensor | None = None, **kwargs) -> Tensor:
        if luvc_sizes is None:
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = hf.apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        head_dim = q.shape[-1]
        s = luvc_sizes.to(v.dtype)[:, None, None].expand(seq, self.num_heads, 1)
        v = torch.cat([v * s, s], dim=-1)
        flash = is_flash_attention_requested(self.config)
        width = math.ceil((head_dim + 1) / 8) * 8 if flash else head_dim + 1
        if flash:  # FlashAttention wants equal head dims: zero-pad q and k, which leaves q.k unchanged
            v = F.pad(v, (0, width - head_dim - 1))
            q, k = F.pad(q, (0, width - head_dim)), F.pad(k, (0, width - head_dim))
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        common = dict(attention_mask=None, scaling=self.scaling, dropout=0.0, is_causal=False)
        if flash:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            out = attend(self, q, k, v, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                         max_length_q=max_seqlen, max_length_k=max_seqlen, **common, **kwargs)[0]
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            chunks = zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)))
            out = torch.cat([attend(self, qc, kc, vc, **common, **kwargs)[0] for qc, kc, vc in chunks], dim=1)
        out = out.reshape(seq, self.num_heads, width)
        out = out[..., :head_dim] / out[..., head_dim:head_dim + 1]
        return self.proj(out.reshape(seq, -1).contiguous())


class VisionBlockNode(StackNode):
    """One vision block, called on a ``VisionState`` with per-frame attention."""

    site = "vision"

    def __init__(self, block: nn.Module, index: int, visual: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.capture_keys = False
        self.visual = [visual]  # a list keeps the tower out of this node's children

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow(f"vision.blocks.{self.index}", "vision", state.tokens_per_image()))
        scratch = state.scratch
        if "cu_seqlens" not in scratch:
            seqlens = [h * w * state.unit for t, h, w in state.grids for _ in range(t)]
            scratch["cu_seqlens"] = _cumulative(seqlens, state.hidden.device)
            scratch["max_seqlen"] = max(seqlens)
            scratch["rope"] = self.visual[0].rotary_pos_emb(state.hidden, state.positions)
            scratch["sized"] = bool((state.sizes != 1).any())
        hidden, keys = self._call(state.hidden, scratch["cu_seqlens"], scratch["max_seqlen"], scratch["rope"],
                                  state.sizes if scratch["sized"] else None)
        return dataclasses.replace(state, hidden=hidden, keys=keys)

    def _call(self, hidden: Tensor, cu_seqlens: Tensor, max_seqlen: int, rope,
              sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Run the block; return its output and, if asked for, its attention keys (mean over heads)."""
        extra = {"luvc_sizes": sizes} if sizes is not None else {}
        captured: list[Tensor] = []
        hook = None
        if self.capture_keys:
            heads = self.block.attn.num_heads

            def keep_keys(module, args, output):
                captured.append(output.reshape(output.shape[0], 3, heads, -1)[:, 1].mean(dim=1))

            hook = self.block.attn.qkv.register_forward_hook(keep_keys)
        try:
            out = self.block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rope, **extra)
        finally:
            if hook is not None:
                hook.remove()
        return out, captured[0] if captured else None


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


class Qwen2VLAdapter:
    """Adapter for ``Qwen2VLForConditionalGeneration``."""

    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    model_class: type = Qwen2VLForConditionalGeneration
    compiled_mixin: type  # set below: CompiledQwen2VLModel

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def vision_block_node(self, visual: nn.Module, index: int) -> StackNode:
        return VisionBlockNode(visual.blocks[index], index, visual)

    def check(self, model: nn.Module) -> None:
        check_attention(model.model.language_model.config)
        check_attention(model.model.visual.config)

    def stack_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        visual, lm = model.model.visual, model.model.language_model
        nodes: list[tuple[str, StackNode]] = [
            (f"vision.blocks.{i}", self.vision_block_node(visual, i)) for i in range(len(visual.blocks))
        ]
        nodes.append(("vision.merger", VisionProjectNode(visual.merger)))
        nodes += [(f"llm.layers.{i}", DecoderLayerNode(layer, i, lm.rotary_emb)) for i, layer in enumerate(lm.layers)]
        nodes.append(("llm.norm", FinalNormNode(lm.norm)))
        return nodes

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1,
                   max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[tuple[int, int, int], int]:
        vision = model.config.vision_config
        m, patch = vision.spatial_merge_size, vision.patch_size
        h, w = smart_resize(height, width, factor=patch * m, max_pixels=max_pixels)
        t = max(1, frames // vision.temporal_patch_size)
        return (t, h // patch // m, w // patch // m), m * m

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        from luvc.fx.passes import section

        inner = model.model
        record = {"outer": type(model), "inner": type(inner),
                  "attention": [(b.attn, type(b.attn)) for b in inner.visual.blocks]}
        for block in inner.visual.blocks:
            block.attn.__class__ = _sized(type(block.attn))
        inner.__class__ = _compiled(type(inner), self.compiled_mixin)
        model.__class__ = _expanding(type(model))
        inner.__dict__["_luvc_sections"] = (section(graph, "vision"), section(graph, "llm"))
        inner.rope_deltas = None
        return record

    def uninstall(self, model: nn.Module, record: dict) -> None:
        inner = model.model
        model.__class__ = record["outer"]
        inner.__class__ = record["inner"]
        for attn, cls in record["attention"]:
            attn.__class__ = cls
        inner.__dict__.pop("_luvc_sections", None)
        inner.__dict__.pop("luvc_ledger", None)
        inner.rope_deltas = None


@functools.cache
def _sized(cls: type) -> type:
    return type(f"Luvc{cls.__name__}", (SizedVisionAttention, cls), {})


@functools.cache
def _compiled(cls: type, mixin: type) -> type:
    return type(f"Luvc{cls.__name__}", (mixin, cls), {})


@functools.cache
def _expanding(cls: type) -> type:
    return type(cls.__name__, (ExpandingGeneration, cls), {"__module__": cls.__module__})


class ExpandingGeneration:
    """Mixin: repeats compressed vision outputs per sample for beams and ``num_return_sequences``.

    ``generate`` groups the encoder outputs by sample by matching placeholder
    counts, which OIM changes; here the groups come from the grids luvc keeps.
    """

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        ids = {"image": self.config.image_token_id, "video": self.config.video_token_id}
        m2 = self.config.vision_config.spatial_merge_size ** 2
        for kind, out in mm_encoder_output.items():
            if out is None or getattr(out, "luvc_source_grid_thw", None) is None:
                continue
            per_row = (input_ids == ids[kind]).sum(-1).tolist()
            sizes = (out.luvc_source_grid_thw.prod(-1) // m2).tolist()
            groups, start = [], 0
            for need in per_row:
                end = start
                while need > 0:
                    need -= sizes[end]
                    end += 1
                groups.append(list(range(start, end)))
                start = end
            order = [i for group in groups for _ in range(expand_size) for i in group]
            out.pooler_output = [out.pooler_output[i] for i in order]
            out.luvc_source_grid_thw = out.luvc_source_grid_thw[order]
            out.luvc_grid_thw = out.luvc_grid_thw[order]
        return mm_encoder_output


class CompiledQwen2VLModel:
    """Mixin for Qwen2-VL-style inner models whose vision tower and LLM run through the luvc graph.

    Returns hidden states at the caller's positions, so ``generate`` and the
    logits keep the input's shape; positions whose token did not survive to
    the end (visual tokens) hold zeros.
    """

    _luvc_rope_kwargs: tuple[str, ...] = ()  # forward kwargs that get_rope_index also needs

    def get_image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
        return self._luvc_encode(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs):
        return self._luvc_encode(pixel_values_videos, video_grid_thw)

    def _luvc_encode(self, pixels: Tensor, grid_thw: Tensor) -> BaseModelOutputWithPooling:
        visual = self.visual
        m = visual.spatial_merge_size
        hidden = visual.patch_embed(pixels.type(visual.dtype))
        grids = tuple((int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist())
        state = VisionState(
            hidden=hidden,
            sizes=torch.ones(hidden.shape[0], device=hidden.device),
            positions=get_vision_position_ids(grid_thw, m).float(),
            grids=grids, unit=m * m, log=[],
        )
        state = self._luvc_sections[0](state)
        out = BaseModelOutputWithPooling(
            last_hidden_state=state.hidden,
            pooler_output=torch.split(state.hidden, [t * h * w for t, h, w in state.grids]),
        )
        out.luvc_source_grid_thw = grid_thw
        out.luvc_grid_thw = torch.tensor([(t, h * m, w * m) for t, h, w in state.grids], device=grid_thw.device)
        out.luvc_ledger = state.log
        return out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None, mm_encoder_outputs=None,
                **kwargs) -> BaseModelOutputWithPast:
        wanted = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if wanted:
            raise CompileError(
                f"{', '.join(wanted)} is not available from a luvc-compiled model: each layer sees its own tokens\n"
                "  read visual-token counts with luvc.ledger(model), or luvc.uncompile(model) first"
            )
        record = getattr(past_key_values, "luvc_record", None)
        if record is not None:
            return self._luvc_decode(input_ids, inputs_embeds, attention_mask, past_key_values, record)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise CompileError("this KV cache was filled outside luvc; start generation from an empty cache")
        encoded = dict(mm_encoder_outputs or {})
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_grid_thw)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        rope_kwargs = {k: kwargs[k] for k in self._luvc_rope_kwargs if kwargs.get(k) is not None}
        state, length = self._luvc_prefill(input_ids, inputs_embeds, attention_mask, position_ids, encoded,
                                           {"image": image_grid_thw, "video": video_grid_thw}, past_key_values,
                                           rope_kwargs)
        state = self._luvc_sections[1](state)
        ledger = [row for out in encoded.values() for row in getattr(out, "luvc_ledger", [])] + state.log
        self.__dict__["luvc_ledger"] = ledger
        return BaseModelOutputWithPast(last_hidden_state=scatter_to_caller(state, length),
                                       past_key_values=past_key_values)

    def _luvc_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, encoded, grids, cache,
                      rope_kwargs=None):
        rope_kwargs = rope_kwargs or {}
        cfg = self.config
        token_ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        if input_ids is None:
            if encoded:
                raise CompileError("a compiled Qwen2-VL needs input_ids to place image and video features")
            batch, length = inputs_embeds.shape[:2]
            ids = torch.zeros(batch, length, dtype=torch.long, device=inputs_embeds.device)
        else:
            ids = input_ids
            batch, length = ids.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        m2 = self.visual.spatial_merge_size ** 2
        keep = torch.ones_like(ids, dtype=torch.bool)
        final_grids = {}
        for kind, out in encoded.items():
            source = getattr(out, "luvc_source_grid_thw", grids[kind])
            final_grids[kind] = getattr(out, "luvc_grid_thw", source)
            before = (source.prod(-1) // m2).tolist()
            after = (final_grids[kind].prod(-1) // m2).tolist()
            keep &= placeholder_keep(ids == token_ids[kind], before, after)
        source_index = torch.arange(length, device=ids.device).expand(batch, -1)
        if not bool(keep.all()):
            order = right_align(keep & valid)
            valid = torch.gather(keep & valid, 1, order)
            ids = torch.gather(ids, 1, order).masked_fill(~valid, cfg.text_config.pad_token_id or 0)
            source_index = torch.where(valid, torch.gather(source_index, 1, order), -1)
            position_ids = None
            embeds = self.get_input_embeddings()(ids)
        else:
            embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(ids)
        for kind, out in encoded.items():
            features = torch.cat(out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
            mask = (ids == token_ids[kind]).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, features)
        if encoded:
            token_type = (ids == token_ids["image"]).int() + 2 * (ids == token_ids["video"]).int()
            position_ids, _ = self.get_rope_index(ids, mm_token_type_ids=token_type,
                                                  image_grid_thw=final_grids.get("image"),
                                                  video_grid_thw=final_grids.get("video"),
                                                  attention_mask=valid.long(), **rope_kwargs)
        elif position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand(3, batch, -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        visual = (ids == token_ids["image"]) | (ids == token_ids["video"]) if encoded else torch.zeros_like(valid)
        if cache is not None:
            last = position_ids.masked_fill(~valid[None], -1).amax(dim=(0, 2))
            cache.luvc_record = CacheRecord(next_position=last + 1)
        state = LLMState(embeds, valid, visual & valid, position_ids, torch.where(valid, source_index, -1),
                         cache=cache, log=[])
        return state, length

    def _luvc_decode(self, input_ids, inputs_embeds, attention_mask, cache, record: CacheRecord):
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        batch, q = embeds.shape[:2]
        valid = attention_mask[:, -q:].bool() if attention_mask is not None else torch.ones(
            batch, q, dtype=torch.bool, device=embeds.device)
        positions = record.next_position[:, None] + torch.arange(q, device=embeds.device)
        record.next_position = record.next_position + q
        state = LLMState(embeds, valid, torch.zeros_like(valid), positions[None].expand(3, -1, -1),
                         torch.arange(q, device=embeds.device).expand(batch, -1), cache=cache, decoding=True)
        state = self._luvc_sections[1](state)
        return BaseModelOutputWithPast(last_hidden_state=scatter_to_caller(state, q), past_key_values=cache)


Qwen2VLAdapter.compiled_mixin = CompiledQwen2VLModel


@hookimpl
def luvc_model_adapters() -> list:
    return [Qwen2VLAdapter()]
