"""Properties of SPU: exact keep counts, text never dropped, order and positions kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    return LLMState(torch.randn(batch, length, dim, generator=g), valid, visual, positions, source, log=[])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), length=st.integers(2, 40),
       keep=st.floats(0.0, 1.0), axis=st.sampled_from(["hidden", "sequence"]), normalize=st.booleans(),
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


def test_high_band_along_the_sequence_keeps_the_token_that_stands_out():
    """``band: high`` with ``axis: sequence`` scores detail: a token unlike its smooth neighbourhood wins,
    where ``band: low`` ranks it last (its energy is what the filter removes)."""
    hidden = torch.ones(1, 33, 16) + 0.01 * torch.randn(1, 33, 16, generator=torch.Generator().manual_seed(0))
    hidden[0, 17] = -1.0
    visual = torch.ones(1, 33, dtype=torch.bool)
    visual[0, 0] = False  # one text token
    high = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="sequence", band="high", normalize=False))
    low = spu_scores(hidden, visual, SPUParams(keep=0.5, axis="sequence", band="low", normalize=False))
    assert int(high[0].argmax()) == 17 and int(low[0, 1:].argmin()) == 16
