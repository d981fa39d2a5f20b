"""Properties of SPU: exact keep counts, text never dropped, order and positions kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luvc.errors import CompileError
from luvc.state import LLMState, round_half_up
from luvc.transforms.spectrum_prune import SPUParams, lowpass_window, spectrum_prune, spu_scores


def random_state(seed: int, batch: int, length: int, dim: int = 16) -> LLMState:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(batch, length, dtype=torch.bool)
    pads = torch.randint(0, length // 2 + 1, (batch,), generator=g)
    for b in range(batch):
        valid[b, : pads[b]] = False
    visual = (torch.rand(batch, length, generator=g) < 0.6) & valid
    positions = torch.arange(length).expand(3, batch, length) * 7
    source = torch.where(valid, torch.arange(length).expand(batch, -1), -1)
    return LLMState(torch.randn(batch, length, dim, generator=g), valid, visual, positions, source, log=[],
                    grid=one_image_per_row(visual))


def one_image_per_row(visual: torch.Tensor) -> torch.Tensor:
    """[B, S, 6] cells: each row's visual tokens are one image, laid out in as square a grid as divides them."""
    grid = torch.full((*visual.shape, 6), -1, dtype=torch.long)
    for b in range(visual.shape[0]):
        n = int(visual[b].sum())
        if n:
            h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
            w = n // h
            k = torch.arange(n)
            grid[b, visual[b]] = torch.stack([torch.full((n,), b), torch.zeros(n, dtype=torch.long), k // w, k % w,
                                              torch.full((n,), h), torch.full((n,), w)], 1)
    return grid


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), length=st.integers(2, 40),
       keep=st.floats(0.0, 1.0), axis=st.sampled_from(["hidden", "grid"]), normalize=st.booleans(),
       band=st.sampled_from(["low", "high"]))
def test_spu_keeps_round_keep_n_and_all_text(seed, batch, length, keep, axis, normalize, band):
    """Exactly round(keep*n) visual tokens per row survive; every text token survives, in order, same position."""
    state = random_state(seed, batch, length)
    out = spectrum_prune(state, SPUParams(keep=keep, axis=axis, normalize=normalize, band=band))
    for b in range(batch):
        n_visual = int(state.visual[b].sum())
        assert int(out.visual[b].sum()) == round_half_up(keep * n_visual)
        text_before = state.source[b][state.valid[b] & ~state.visual[b]].tolist()
        text_after = out.source[b][out.valid[b] & ~out.visual[b]].tolist()
        assert text_after == text_before
        kept = out.source[b][out.valid[b]]
        assert kept.tolist() == sorted(kept.tolist()), "sequence order must be kept"
        assert torch.equal(out.position_ids[:, b][:, out.valid[b]], kept.expand(3, -1) * 7)
        assert bool(out.valid[b, out.valid.shape[1] - int(out.valid[b].sum()):].all()), "rows stay right-aligned"


def test_keep_zero_removes_every_visual_token():
    state = random_state(0, 3, 30)
    out = spectrum_prune(state, SPUParams(keep=0.0))
    assert not bool(out.visual.any())
    assert out.valid.sum() == (state.valid & ~state.visual).sum()


def test_hidden_axis_score_depends_on_the_token_only():
    """Scoring along the hidden axis is position-invariant: permuting tokens permutes their scores."""
    hidden = torch.randn(1, 12, 32)
    visual = torch.ones(1, 12, dtype=torch.bool)
    params = SPUParams(keep=0.5)
    perm = torch.randperm(12)
    torch.testing.assert_close(spu_scores(hidden[:, perm], visual, params), spu_scores(hidden, visual, params)[:, perm])


def test_low_frequency_tokens_score_higher():
    """A smooth (low-frequency) vector keeps more energy through the filter than an alternating one."""
    dim = 64
    smooth = torch.cos(torch.linspace(0, 3.14, dim))
    rough = torch.tensor([(-1.0) ** i for i in range(dim)])
    hidden = torch.stack([smooth / smooth.norm(), rough / rough.norm()])[None]
    scores = spu_scores(hidden, torch.ones(1, 2, dtype=torch.bool), SPUParams(keep=0.5))
    assert scores[0, 0] > scores[0, 1]


@pytest.mark.parametrize("bins,cutoff", [(33, 0.25), (8, 1.0), (5, 0.01)])
def test_window_is_a_lowpass_hann(bins, cutoff):
    w = lowpass_window(bins, cutoff)
    assert w[0] == 1.0 and bool((w.diff() <= 1e-7).all()) and bool((w >= 0).all())


def test_high_band_on_the_grid_keeps_the_token_that_stands_out():
    """``band: high`` with ``axis: grid`` scores detail: a token unlike its smooth neighbourhood wins,
    where ``band: low`` ranks it last (its energy is what the filter removes)."""
    hidden = torch.ones(1, 65, 16) + 0.01 * torch.randn(1, 65, 16, generator=torch.Generator().manual_seed(0))
    visual = torch.ones(1, 65, dtype=torch.bool)
    visual[0, 0] = False  # one text token
    hidden[0, 1 + 2 * 8 + 3] = -1.0  # row 2, column 3 of an 8 x 8 image
    grid = one_image_per_row(visual)
    high = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", band="high", cutoff=0.5, normalize=False), grid)
    low = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", band="low", cutoff=0.5, normalize=False), grid)
    assert int(high[0].argmax()) == 1 + 2 * 8 + 3 and int(low[0, 1:].argmin()) == 2 * 8 + 3


def two_images(first: torch.Tensor, second: torch.Tensor | None, text: int = 3) -> tuple:
    """One sample: ``text`` text tokens, then image ``first`` [h, w, D], then optionally image ``second``."""
    parts, cells = [torch.zeros(text, first.shape[-1])], [torch.full((text, 6), -1)]
    for item, image in enumerate(x for x in (first, second) if x is not None):
        h, w, d = image.shape
        k = torch.arange(h * w)
        parts.append(image.reshape(-1, d))
        cells.append(torch.stack([torch.full_like(k, item), 0 * k, k // w, k % w, torch.full_like(k, h),
                                  torch.full_like(k, w)], 1))
    hidden, grid = torch.cat(parts)[None], torch.cat(cells)[None]
    return hidden, grid[..., 0] >= 0, grid


@pytest.mark.parametrize("band", ["low", "high"])
def test_grid_score_ignores_the_other_images_of_the_sample(band):
    """A token's score depends on its own image only: another image joining the sample changes nothing."""
    g = torch.Generator().manual_seed(1)
    image, other = torch.randn(5, 7, 32, generator=g), torch.randn(4, 4, 32, generator=g)
    params = SPUParams(keep=0.5, axis="grid", band=band)
    alone = spu_scores(*two_images(image, None)[:2], params, two_images(image, None)[2])
    hidden, visual, grid = two_images(image, other)
    joined = spu_scores(hidden, visual, params, grid)
    torch.testing.assert_close(joined[0, 3:3 + 35], alone[0, 3:])


def test_grid_score_ignores_the_batch():
    """The same sample scores the same alone and in a batch beside a longer, left-padded one."""
    g = torch.Generator().manual_seed(2)
    image = torch.randn(6, 6, 16, generator=g)
    params = SPUParams(keep=0.5, axis="grid", band="high")
    hidden, visual, grid = two_images(image, None)
    alone = spu_scores(hidden, visual, params, grid)
    big_hidden, big_visual, big_grid = two_images(torch.randn(8, 8, 16, generator=g), None, text=5)
    pad = big_hidden.shape[1] - hidden.shape[1]
    batch_hidden = torch.cat([big_hidden, torch.cat([torch.zeros(1, pad, 16), hidden], 1)])
    batch_visual = torch.cat([big_visual, torch.cat([torch.zeros(1, pad, dtype=torch.bool), visual], 1)])
    shifted = grid.clone()
    shifted[..., 0] = torch.where(grid[..., 0] >= 0, 1, -1)  # another item number in the batch
    batch_grid = torch.cat([big_grid, torch.cat([torch.full((1, pad, 6), -1), shifted], 1)])
    batched = spu_scores(batch_hidden, batch_visual, params, batch_grid)
    torch.testing.assert_close(batched[1, pad:], alone[0])


def test_grid_rows_never_run_into_each_other():
    """Rows that are each constant have no detail along them: every token of a row scores the same, where
    filtering the flattened sequence would see an edge at every row's end."""
    h, w, d = 6, 8, 16
    rows = torch.cos(2 * torch.pi * torch.arange(h) / h)[:, None, None] * torch.randn(1, 1, d) + torch.randn(1, 1, d)
    image = rows.expand(h, w, d).clone()
    hidden, visual, grid = two_images(image, None)
    scores = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", band="high"), grid)[0, 3:].view(h, w)
    torch.testing.assert_close(scores, scores[:, :1].expand(h, w))


def test_a_pruned_cell_reads_as_the_image_mean():
    """After pruning, holes are filled with the mean kept token, so scores of the rest stay defined and finite."""
    image = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(3))
    hidden, visual, grid = two_images(image, None)
    visual[0, 3 + 5] = False  # this cell was pruned before
    scores = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", band="high"), grid)
    assert bool(torch.isfinite(scores[visual]).all()) and scores[0, 3 + 5] == float("-inf")


def test_grid_axis_without_a_grid_is_a_clear_error():
    state = random_state(0, 2, 20)
    with pytest.raises(CompileError, match="axis: grid needs each image's token grid"):
        spectrum_prune(state.replace(grid=None), SPUParams(keep=0.5, axis="grid"))


def test_the_cutoff_changes_the_grid_scores():
    hidden, visual, grid = two_images(torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(4)), None)
    narrow = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", cutoff=0.1), grid)
    wide = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="grid", cutoff=0.6), grid)
    assert not torch.allclose(narrow[visual], wide[visual])
