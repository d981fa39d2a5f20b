"""Decoder-stack glue shared by adapters of decoder-only language models.

Pruning makes every layer's sequence (and KV cache) its own length, so the
masks are built here per layer from which keys are real, instead of by the
model from one 2-D attention mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.runtime.sized_attention import log_sizes
from luvc.state import LLMState

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass
class CacheRecord:
    """What decoding needs beyond the KV tensors, attached to the cache as ``luvc_record``.

    Attributes:
        key_valid: per layer index, [B, K] which cached keys are real tokens.
        key_position: per sliding-window layer index, [B, K] the cached keys' positions.
        key_sizes: per layer index, [B, K] the tokens each cached key stands for (proportional attention).
        next_position: [B] position id of the next token of each row.
    """

    key_valid: dict[int, Tensor] = field(default_factory=dict)
    key_position: dict[int, Tensor] = field(default_factory=dict)
    key_sizes: dict[int, Tensor] = field(default_factory=dict)
    next_position: Tensor | None = None


def check_attention(config) -> None:
    """Refuse attention implementations whose masks luvc cannot build."""
    impl = hf.attn_implementation(config)
    if impl not in SUPPORTED_ATTENTION:
        raise CompileError(
            f"attn_implementation {impl!r} is not supported by luvc\n"
            f"  use one of {', '.join(SUPPORTED_ATTENTION)} (luvc never needs attention weights)"
        )
    if getattr(config, "use_sliding_window", False):
        raise CompileError(
            "the language model uses sliding-window attention, which luvc's per-layer masks do not implement\n"
            "  set config.use_sliding_window = False or leave the model uncompiled"
        )


def attention_mask(key_valid: Tensor, q_len: int, impl: str, dtype: torch.dtype, window: int | None = None,
                   key_position: Tensor | None = None, blocks: Tensor | None = None,
                   key_sizes: Tensor | None = None) -> Tensor:
    """The mask for ``q_len`` newest tokens attending to keys ``key_valid`` [B, K].

    Causal, padding keys hidden; a padding query sees itself so no row is
    empty (an all-masked row would put NaN into the cache). With ``window``
    (a sliding-window layer), a query sees only keys whose position
    (``key_position`` [B, K], the model's own, so pruning does not widen the
    window) is less than ``window`` before its own. ``blocks`` [B, K] (image
    run per token, -1 for text; prefill only) lets the tokens of one image
    see each other both ways, as Gemma 3's language model does. ``key_sizes``
    [B, K] make a key count as that many tokens (an additive ``log`` bias, so
    the mask is a float one).
    """
    if impl == "flash_attention_2":
        if window is not None or blocks is not None or key_sizes is not None:
            raise CompileError("sliding windows, bidirectional image blocks and proportional attention need an "
                               "explicit mask: use attn_implementation='sdpa' or 'eager'")
        return key_valid.to(torch.int32)  # rows are left-padded: FlashAttention's varlen path handles it
    k_len = key_valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=key_valid.device)[:, None]
    k_pos = torch.arange(k_len, device=key_valid.device)[None, :]
    allowed = key_valid[:, None, :] & (k_pos <= q_pos)
    if blocks is not None:
        same = (blocks[:, -q_len:, None] == blocks[:, None, :]) & (blocks[:, None, :] >= 0)
        allowed = allowed | (same & key_valid[:, None, :])
    if window is not None:
        allowed = allowed & (key_position[:, -q_len:, None] - key_position[:, None, :] < window)
    allowed = (allowed | (k_pos == q_pos))[:, None]  # [B, 1, q, K]
    if impl == "sdpa" and key_sizes is None:
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    if key_sizes is not None:
        bias = bias + log_sizes(key_sizes, dtype)[:, None, None, :]
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def image_blocks(visual: Tensor) -> Tensor:
    """[B, S] the number of each visual token's run of consecutive visual tokens (one image), -1 for text."""
    starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    return torch.where(visual, starts.long().cumsum(dim=1) - 1, -1)


class DecoderLayerNode(StackNode):
    """One decoder layer, called on an ``LLMState``; the ``AttentionProbe`` transforms ranking tokens by it get.

    ``rotary(x, positions)`` gives the layer's (cos, sin); layers sharing a
    ``rope_key`` share one computation per state. ``window`` makes the layer a
    sliding-window one (keys at most ``window - 1`` positions back).
    """

    site = "llm"

    def __init__(self, layer: nn.Module, index: int, rotary, window: int | None = None,
                 rope_key: str = "rope") -> None:
        super().__init__()
        self.block = layer
        self.index = index
        self.rotary = [rotary]  # a list keeps the shared rotary module out of this node's children
        self.window = window
        self.rope_key = rope_key

    def forward(self, state: LLMState) -> LLMState:
        hidden = state.hidden
        if not state.decoding:
            state.log.append(state.ledger_row(f"llm.layers.{self.index}"))
        layer_idx = hf.cache_layer_index(self.block.self_attn)
        record = getattr(state.cache, "luvc_record", None)
        past = record.key_valid.get(layer_idx) if record is not None else None
        key_valid = state.valid if past is None else torch.cat([past, state.valid], dim=1)
        key_position = None
        if self.window is not None:
            past_position = record.key_position.get(layer_idx) if record is not None else None
            key_position = state.position_ids[0] if past_position is None else torch.cat(
                [past_position, state.position_ids[0]], dim=1)
        key_sizes = None
        if state.sizes is not None:
            past_sizes = record.key_sizes.get(layer_idx) if record is not None else None
            key_sizes = state.sizes if past_sizes is None else torch.cat([past_sizes, state.sizes], dim=1)
        if record is not None:
            record.key_valid[layer_idx] = key_valid
            if key_position is not None:
                record.key_position[layer_idx] = key_position
            if key_sizes is not None:
                record.key_sizes[layer_idx] = key_sizes
        masks = state.scratch.setdefault("masks", {})
        key = (id(past), self.window)
        if key not in masks:
            impl = hf.attn_implementation(self.block.self_attn.config)
            blocks = image_blocks(state.visual) if state.image_blocks and past is None else None
            masks[key] = (past, attention_mask(key_valid, hidden.shape[1], impl, hidden.dtype, self.window,
                                               key_position, blocks, key_sizes))
        if self.rope_key not in state.scratch:
            positions = state.position_ids[0] if state.position_ids.shape[0] == 1 else state.position_ids
            state.scratch[self.rope_key] = self.rotary[0](hidden, positions)
        hidden = self.block(
            hidden,
            attention_mask=masks[key][1],
            position_embeddings=state.scratch[self.rope_key],
            position_ids=None,
            use_cache=state.cache is not None,
            **{hf.CACHE_KWARG: state.cache},
        )
        return _with_hidden(state, hidden)

    def attention_rows(self, state: LLMState, rows: Tensor) -> Tensor:
        """[B, R, S] head-averaged attention probabilities from the queries at ``rows`` [B, R]."""
        return attention_rows(self, state, rows)

    def keys(self, state: LLMState) -> Tensor:
        """[B, S, Hkv * d] the post-rotary keys this layer computes for ``state``'s tokens."""
        return layer_keys(self, state)

    def normalized(self, state: LLMState) -> Tensor:
        """[B, S, D] ``state``'s hidden states after this layer's input norm."""
        return self.block.input_layernorm(state.hidden)

    def queries(self, x: Tensor) -> Tensor:
        """[B, S, H, d] the attention's pre-norm, pre-rotary queries of normalized hidden states ``x``;
        a family whose ``q_proj`` also yields other channels (Qwen3.5's output gate) overrides it."""
        attn = self.block.self_attn
        return attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim)


def _rotated(node: DecoderLayerNode, state: LLMState) -> tuple[Tensor, Tensor]:
    """Post-rotary queries [B, H, S, d] and keys [B, Hkv, S, d] of ``node``'s attention on ``state``."""
    attn = node.block.self_attn
    x = node.block.input_layernorm(state.hidden)
    batch, length = x.shape[:2]
    q = node.queries(x)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    positions = state.position_ids[0] if state.position_ids.shape[0] == 1 else state.position_ids
    cos, sin = node.rotary[0](x, positions)
    apply_rotary = hf.rotary_function(attn)
    return apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def layer_keys(node: DecoderLayerNode, state: LLMState) -> Tensor:
    """[B, S, Hkv * d] the post-rotary keys ``node`` computes for ``state``'s tokens."""
    _, k = _rotated(node, state)
    return k.transpose(1, 2).flatten(2)


def attention_rows(node: DecoderLayerNode, state: LLMState, rows: Tensor) -> Tensor:
    """[B, R, S] head-averaged attention probabilities from the queries at ``rows`` [B, R].

    Recomputed from the layer's own norm, projections, rotary and scale, with
    the causal and padding masks, so methods that rank tokens by attention
    run under SDPA and FlashAttention without materialising any attention
    matrix: the cost is O(H * R * S * d) instead of O(H * S^2 * d).
    """
    attn = node.block.self_attn
    q, k = _rotated(node, state)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, S]
    key_index = torch.arange(k.shape[2], device=k.device)
    allowed = state.valid[:, None, :] & (key_index[None, None, :] <= rows[:, :, None])
    if node.window is not None:
        positions = state.position_ids[0]
        allowed &= positions.gather(1, rows)[:, :, None] - positions[:, None, :] < node.window
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


class FinalNormNode(StackNode):
    """The language model's final norm; its input is the last layer's output."""

    site = "llm"
    kind = "io"
    #: Labels of the transform nodes that should have removed every visual token, set by the lowering
    #: when the schedule claims ``eliminate_visual``; empty: no claim to check.
    eliminated_by: tuple[str, ...] = ()

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.block = norm

    def forward(self, state: LLMState) -> LLMState:
        if not state.decoding:
            state.log.append(state.ledger_row("llm.norm"))
            if self.eliminated_by:
                _check_eliminated(state, self.eliminated_by)
        return _with_hidden(state, self.block(state.hidden))


def _check_eliminated(state: LLMState, eliminated_by: tuple[str, ...]) -> None:
    """Refuse a prefill whose visual tokens reached the final layer although the schedule claims none do
    (one host sync per prefill): a transform's ``run`` disagrees with its ``eliminates`` rule."""
    left = int((state.visual & state.valid).sum())
    if left:
        raise CompileError(
            f"the schedule claims eliminate_visual, but {left} visual token(s) reached the final layer; "
            f"{', '.join(eliminated_by)} should have removed them all\n"
            "  the transform's run keeps tokens its eliminates() says it removes: fix the transform, or set "
            "eliminate_visual: false"
        )


def _with_hidden(state: LLMState, hidden: Tensor) -> LLMState:
    """Same tokens, new hidden states: masks and rotary stay valid."""
    return dataclasses.replace(state, hidden=hidden)


def right_align(keep: Tensor) -> Tensor:
    """[B, W] gather indices of the kept tokens of each row, order kept, padding first."""
    width = int(keep.sum(dim=1).max()) if keep.numel() else 0
    return torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width:]


def placeholder_keep(is_placeholder: Tensor, before: list[int], after: list[int]) -> Tensor:
    """[B, S] mask keeping, of each item's run of placeholders, the first ``after[i]``.

    Items (images or videos) are numbered in reading order over the batch;
    ``before[i]`` is how many placeholders item ``i`` has in the input.

    Raises:
        ValueError: the input's placeholders do not add up to ``sum(before)``.
    """
    flat = is_placeholder.reshape(-1)
    total = int(flat.sum())
    if total != sum(before):
        raise ValueError(
            f"the input has {total} placeholder tokens but its grids describe {sum(before)}; "
            "pass the processor's input_ids and grids unchanged"
        )
    ordinal = torch.cumsum(flat.long(), 0) - 1
    starts = torch.tensor([0] + before, device=flat.device).cumsum(0)
    item = torch.bucketize(ordinal, starts[1:], right=True)
    local = ordinal - starts[item.clamp(max=len(before) - 1)]
    quota = torch.tensor(after + [0], device=flat.device)[item.clamp(max=len(before))]
    keep = ~flat | (local < quota)
    return keep.view_as(is_placeholder)


def scatter_to_caller(state: LLMState, length: int) -> Tensor:
    """[B, length, D] hidden states at the caller's positions; zeros where no token survives."""
    batch, _, dim = state.hidden.shape
    out = state.hidden.new_zeros(batch, length, dim)
    rows, cols = state.valid.nonzero(as_tuple=True)
    out[rows, state.source[rows, cols]] = state.hidden[rows, cols]
    return out
