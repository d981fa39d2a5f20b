"""Properties of OIM's pure functions: mass kept, order kept, grids stay rectangles."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luvc.state import VisionState
from luvc.transforms.orthogonal_merge import OIMParams, merges_per_line, neighbor_merge, orthogonal_merge, plan_grid

lines_st = st.integers(1, 4)
width_st = st.integers(1, 13)


@settings(max_examples=60, deadline=None)
@given(lines=lines_st, width=width_st, unit=st.sampled_from([1, 4]), seed=st.integers(0, 10_000),
       ratio=st.floats(0.01, 0.5))
def test_neighbor_merge_keeps_mass_and_order(lines, width, unit, seed, ratio):
    """Each line loses exactly r units; total size and size-weighted sums are unchanged; order is kept."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lines, width, unit, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(lines, width, 5, generator=g)
    sizes = torch.rand(lines, width, unit, generator=g) + 0.5
    cols = torch.arange(width, dtype=torch.float32)
    pos = torch.stack([torch.zeros(lines, width), cols.expand(lines, width)], -1)[:, :, None].expand(-1, -1, unit, -1)
    r = merges_per_line(width, OIMParams(ratio=ratio, min_size=1))
    nx, ns, npos = neighbor_merge(x, metric, sizes, pos.contiguous(), r)
    assert nx.shape == (lines, width - r, unit, 6)
    torch.testing.assert_close(ns.sum(1), sizes.sum(1).float())
    torch.testing.assert_close((nx * ns[..., None]).sum(1), (x * sizes[..., None]).sum(1), rtol=1e-5, atol=1e-5)
    assert bool((npos[..., 1].diff(dim=1) > 0).all()), "merged tokens must stay in spatial order"


def test_merge_pairs_only_adjacent_tokens():
    """A token only ever merges into a direct neighbour: the merged position lies between them."""
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1)
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [1, 0]]])
    pos = torch.stack([torch.zeros(6), torch.arange(6.0)], -1).view(1, 6, 1, 2)
    nx, ns, npos = neighbor_merge(x, metric, torch.ones(1, 6, 1), pos, 3)
    assert npos[0, :, 0, 1].tolist() == [0.5, 2.5, 4.5]
    assert ns.flatten().tolist() == [2.0, 2.0, 2.0]


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), axis=st.sampled_from(["width", "height"]),
       ratio=st.floats(0.05, 0.5), min_size=st.integers(1, 3), metric=st.sampled_from(["keys", "hidden"]))
def test_orthogonal_merge_matches_plan(t, h, w, axis, ratio, min_size, metric):
    """The grid after a step is what the static plan says, never below min_size, and total size is kept."""
    unit, dim = 4, 8
    params = OIMParams(ratio=ratio, axis=axis, min_size=min_size, metric=metric)
    n = t * h * w * unit + 6 * unit
    state = VisionState(hidden=torch.randn(n, dim), sizes=torch.ones(n), positions=torch.rand(n, 2),
                        grids=((t, h, w), (1, 2, 3)), unit=unit, log=[])
    out = orthogonal_merge(state, params)
    assert out.grids[0] == plan_grid(params, (t, h, w))
    nt, nh, nw = out.grids[0]
    assert nh >= min(h, min_size) and nw >= min(w, min_size)
    assert out.hidden.shape == (sum(a * b * c for a, b, c in out.grids) * unit, dim)
    assert float(out.sizes.sum()) == n
    assert out.keys is None and state.hidden.shape[0] == n  # the input state is untouched


def test_a_step_that_merges_nothing_says_so():
    """Lines too short for the ratio and min_size lose nothing: the step warns instead of passing silently."""
    import pytest

    from luvc.errors import LuvcWarning

    state = VisionState(hidden=torch.randn(4, 8), sizes=torch.ones(4), positions=torch.zeros(4, 2),
                        grids=((1, 2, 2),), unit=1, log=[])
    with pytest.warns(LuvcWarning, match=r"merged nothing along the rows of 1 of 1 images \(unit grid 2x2\).*"
                                         r"lines of 2 units lose none"):
        out = orthogonal_merge(state, OIMParams(ratio=0.2, axis="width"))
    assert out.grids == ((1, 2, 2),)
