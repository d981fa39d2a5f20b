"""Size-weighted merging of whole units, shared by the vision-side merging transforms."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_units(x: Tensor, sizes: Tensor, positions: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge unit ``src[l, j]`` into unit ``dst[l, j]`` of every line ``l``, sub-token by sub-token.

    Args:
        x: [L, W, U, D] lines of W units of U sub-tokens.
        sizes: [L, W, U] patches each sub-token stands for.
        positions: [L, W, U, 2] mean patch coordinates.
        src, dst: [L, r] unit indices; sources are distinct and never destinations.

    Returns:
        ``(x, sizes, positions)`` with the ``W - r`` surviving units per line in
        their order; merged values are size-weighted means, sizes add, so the
        sums of ``sizes * x`` and of ``sizes`` per line are unchanged.
    """
    lines, width, unit = sizes.shape
    r = src.shape[1]
    if r == 0:
        return x, sizes, positions
    w = sizes.float()
    weighted = torch.cat([x.float() * w[..., None], positions * w[..., None], w[..., None]], dim=-1)
    feat = weighted.shape[-1]

    def lines_index(pos: Tensor) -> Tensor:
        return pos[:, :, None, None].expand(lines, r, unit, feat)

    moved = weighted.gather(1, lines_index(src))
    merged = weighted.scatter_add(1, lines_index(dst), moved)
    keep = torch.ones(lines, width, dtype=torch.bool, device=x.device)
    keep.scatter_(1, src, False)
    kept = keep.nonzero()[:, 1].view(lines, width - r)
    merged = merged.gather(1, kept[:, :, None, None].expand(lines, width - r, unit, feat))
    dim = x.shape[-1]
    new_sizes = merged[..., -1]
    return (merged[..., :dim] / new_sizes[..., None]).to(x.dtype), new_sizes, merged[..., dim:dim + 2] / new_sizes[
        ..., None]
