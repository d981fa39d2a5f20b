"""Size-weighted merging of whole units and per-image views, shared by the vision-side transforms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from luvc.state import VisionState


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


@dataclass(frozen=True)
class ImageTokens:
    """One image of a ``VisionState``, as views ``[t, h, w, unit, ...]`` of its unit grid."""

    grid: tuple[int, int, int]
    hidden: Tensor  # [t, h, w, u, D + C]: hidden states, then the state's carried features (C = 0: none)
    sizes: Tensor  # [t, h, w, u]
    positions: Tensor  # [t, h, w, u, 2]
    keys: Tensor | None  # [t, h, w, u, Dk] from the block before, if it captured them
    attention: Tensor | None  # [t, h, w, u] received in the block before, if asked for
    width: int  # D: where the hidden states end in ``hidden``

    def metric(self, on: str = "keys") -> Tensor:
        """[t, h, w, M] each unit's mean key (the patch embeddings before the first block), or with
        ``on="hidden"`` its mean hidden state, float; never the carried features."""
        source = self.keys if self.keys is not None and on == "keys" else self.hidden[..., :self.width]
        return source.float().mean(dim=3)


def map_images(state: VisionState, fn: Callable[[ImageTokens], tuple[Tensor, Tensor, Tensor, tuple]],
               as_rows: bool = False) -> VisionState:
    """A new state from ``fn(image) -> (hidden, sizes, positions, grid)`` applied to every image.

    ``fn`` returns its image's new tokens in any shape ending in ``D``, ``()``
    and ``2`` respectively (flattened here, in order) and its new unit grid.
    ``as_rows``: ``fn`` lays each image out as one row ``(t, 1, n)`` of tokens
    that no longer form its grid (an image already one row high stays a grid).
    The state's carried features travel as extra channels of ``hidden``, so
    ``fn``, which treats channels alike, merges them with their tokens.
    """
    width = state.hidden.shape[-1]
    tokens = state.hidden if state.carried is None else torch.cat([state.hidden, state.carried.to(state.hidden)], -1)
    hidden, sizes, positions, grids = [], [], [], []
    rows = set(state.rows)
    start = 0
    u = state.unit
    for grid in state.grids:
        t, h, w = grid
        view = slice(start, start + t * h * w * u)
        start = view.stop
        shape = (t, h, w, u)
        image = ImageTokens(
            grid, tokens[view].reshape(*shape, -1), state.sizes[view].reshape(shape),
            state.positions[view].reshape(*shape, 2),
            state.keys[view].reshape(*shape, -1) if state.keys is not None else None,
            state.attention[view].reshape(shape) if state.attention is not None else None, width,
        )
        x, s, p, new_grid = fn(image)
        hidden.append(x.reshape(-1, x.shape[-1]))
        sizes.append(s.reshape(-1))
        positions.append(p.reshape(-1, 2))
        grids.append(new_grid)
        if as_rows and grid[1] > 1:
            rows.add(len(grids) - 1)
    tokens = torch.cat(hidden)
    carried = None if state.carried is None else tokens[:, width:].to(state.carried.dtype).contiguous()
    return state.replace(hidden=tokens[:, :width].contiguous(), sizes=torch.cat(sizes), positions=torch.cat(positions),
                         grids=tuple(grids), rows=frozenset(rows), carried=carried)
