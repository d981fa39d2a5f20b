"""What a vision block reports when a transform asks: patch keys and the attention each patch received.

Recomputed from the block's own queries and keys (captured during its call),
so any attention kernel can run the block itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def received_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor, scale: float, chunk: int = 1024) -> Tensor:
    """[N] softmax attention each token receives, averaged over heads and over the queries of its segment.

    ``q``, ``k``: [N, H, d]; segments (frames, windows or images) by
    ``cu_seqlens``; queries are processed ``chunk`` at a time so memory stays
    O(chunk * N).
    """
    out = torch.zeros(q.shape[0], device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = k[start:end].float().transpose(0, 1)  # [H, n, d]
        total = torch.zeros(end - start, device=q.device)
        for row in range(start, end, chunk):
            queries = q[row:min(row + chunk, end)].float().transpose(0, 1)
            total += ((queries @ keys.transpose(1, 2)) * scale).softmax(dim=-1).sum(dim=(0, 1))
        out[start:end] = total / (k.shape[1] * (end - start))
    return out


def patch_scores(queries: Tensor | None, keys: Tensor | None, images: int, heads: int, head_dim: int, prefix: int,
                 scale: float) -> tuple[Tensor | None, Tensor | None]:
    """``(keys, attention)`` of the patch tokens of a batched ``[images, prefix + n, H * d]`` block.

    Keys are the mean over heads; attention is the class token's row where the
    images have one (``prefix``), otherwise the mean attention each patch receives.
    """
    if keys is None:
        return None, None
    k = keys.view(images, -1, heads, head_dim)
    patch_keys = k.mean(dim=2)[:, prefix:].reshape(-1, head_dim)
    if queries is None:
        return patch_keys, None
    q = queries.view(images, -1, heads, head_dim)
    if prefix:
        probs = (torch.einsum("bqhd,bkhd->bhqk", q[:, :1].float(), k.float()) * scale).softmax(dim=-1)
        return patch_keys, probs.mean(dim=1)[:, 0, prefix:].reshape(-1)
    n = k.shape[1]
    cu = torch.arange(images + 1, device=k.device) * n
    return patch_keys, received_attention(q.flatten(0, 1), k.flatten(0, 1), cu, scale)
