"""Size-weighted (proportional) attention for Qwen-style vision towers, FlashAttention included.

After a merge, a token standing for ``s`` patches should weigh as much as
those ``s`` patches in every later attention: softmax weights proportional to
``s * exp(q.k)``. Under SDPA and eager attention that is an additive ``log s``
bias on the logits (ToMe's form), which keeps SDPA's fused kernels. FlashAttention
takes no bias, so there the sizes ride in the values, as the paper describes:
attend to ``[s * v, s]`` and divide by the last channel. Both are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from luvc import hf


class SizedVisionAttention:
    """Mixin for Qwen-style vision attention (packed ``[tokens, D]``, ``cu_seqlens`` segments):
    a token of size ``s`` counts as ``s`` patches."""

    def forward(self, hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings=None,
                max_seqlen: int | None = None, luvc_sizes: Tensor | None = None, **kwargs) -> Tensor:
        if luvc_sizes is None:
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = hf.QWEN_VISION_ROTARY(q, k, *position_embeddings)
        head_dim = q.shape[-1]
        flash = hf.is_flash_attention_requested(self.config)
        if flash:
            q, k, v = size_weighted(q, k, v, luvc_sizes[:, None, None])
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attend = hf.attention_function(self.config, hf.QWEN_VISION_EAGER_ATTENTION)
        common = dict(scaling=self.scaling, dropout=0.0, is_causal=False)
        if flash:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            out = attend(self, q, k, v, attention_mask=None, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                         max_length_q=max_seqlen, max_length_k=max_seqlen, **common, **kwargs)[0]
            out = unweight(out.reshape(seq, self.num_heads, -1), head_dim)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            bias = log_sizes(luvc_sizes, q.dtype)[None, None, None, :]
            chunks = zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)), torch.split(bias, lengths, dim=-1))
            out = torch.cat([attend(self, qc, kc, vc, attention_mask=bc, **common, **kwargs)[0]
                             for qc, kc, vc, bc in chunks], dim=1)
        return self.proj(out.reshape(seq, -1).contiguous())


class SizedCLIPAttention:
    """Mixin for CLIP/SigLIP-style attention (``q_proj``/``k_proj``/``v_proj``), batched ``[B, S, D]``."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, luvc_sizes: Tensor | None = None,
                **kwargs):
        if luvc_sizes is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        shape = (*hidden_states.shape[:2], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = batched_sized_attention(self, q, k, v, luvc_sizes, self.scale, attention_mask, **kwargs)
        return self.out_proj(out), None


def batched_sized_attention(module, q: Tensor, k: Tensor, v: Tensor, sizes: Tensor, scale: float,
                            attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """Bidirectional attention of ``[B, S, H, d]`` heads where key ``j`` of row ``b`` counts ``sizes[b, j]``
    times; returns ``[B, S, H * d]`` before the output projection."""
    batch, seq, _, head_dim = q.shape
    flash = hf.is_flash_attention_requested(module.config)
    if flash:
        q, k, v = size_weighted(q, k, v, sizes[:, :, None, None])
    else:
        bias = log_sizes(sizes, q.dtype)[:, None, None, :]
        attention_mask = bias if attention_mask is None else attention_mask + bias
    attend = hf.attention_function(module.config, hf.CLIP_EAGER_ATTENTION)
    out, _ = attend(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                    scaling=scale, dropout=0.0, **kwargs)
    if flash:
        out = unweight(out.reshape(batch, seq, -1, v.shape[-1]), head_dim)
    return out.reshape(batch, seq, -1).contiguous()


def log_sizes(sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias ``log s`` per key, [..., keys]: proportional attention for SDPA and eager."""
    return sizes.to(torch.float32).log().to(dtype)


def size_weighted(q: Tensor, k: Tensor, v: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention's form: values become ``[s * v, s]`` (``sizes`` broadcast to v's shape but
    its last dim), and all three are zero-padded to one width, a multiple of 8."""
    s = sizes.to(v.dtype).expand(*v.shape[:-1], 1)
    v = torch.cat([v * s, s], dim=-1)
    head_dim = q.shape[-1]
    width = math.ceil((head_dim + 1) / 8) * 8
    v = F.pad(v, (0, width - head_dim - 1))
    q, k = F.pad(q, (0, width - head_dim)), F.pad(k, (0, width - head_dim))
    return q, k, v


def unweight(out: Tensor, head_dim: int) -> Tensor:
    """Divide the size-weighted sum of values by the summed sizes (the channel after ``head_dim``)."""
    return out[..., :head_dim] / out[..., head_dim:head_dim + 1]
