"""Spectrum Pruning Unit (SPU): drop the visual tokens with the least low-frequency energy.

LUVC (arXiv 2512.09010), SPU. Each visual token is scored by the L2 energy
left after a low-pass filter (FFT, multiply by a Hann-type window centred on
the lowest frequencies, inverse FFT); the highest-scoring tokens are kept and
the rest dropped. No attention weights and no pairwise similarity are used,
so it runs unchanged under SDPA and FlashAttention. Placed before several
decoder layers, with ``keep: 0.0`` at the last step, it forms the cascade
that leaves no visual token at the final layer.

Choices the paper leaves open, made here:

* ``axis``: ``hidden`` (default) filters each token's hidden vector on its own,
  so a token's score does not depend on where it sits (the paper's
  "position-invariant" argument); ``sequence`` filters along each sample's
  visual-token sequence, channel by channel, scoring tokens by the energy of
  the smoothed sequence at their place.
* ``normalize`` (default on) divides each token by its RMS first, so a few
  huge outlier channels cannot dominate the score.
* ``cutoff`` is the window's half-width as a fraction of the frequency bins
  (default 0.25).
* ``band: low`` (default, the paper's) keeps the tokens with the most energy
  below the cutoff; ``band: high`` scores the energy the low-pass filter
  removes instead: with ``axis: sequence``, how much a token differs from its
  smoothed neighbourhood (detail), with ``axis: hidden`` nearly the reverse
  ranking of ``low``. Still attention- and similarity-free.
* ``k = round(keep * n)`` of the ``n`` arriving visual tokens are kept per
  sample; text tokens are never dropped; kept tokens keep their position ids.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.selection import keep_count, prune_visual


class SPUParams(BaseModel):
    """Parameters of one spectrum pruning step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(ge=0.0, le=1.0, description="fraction of arriving visual tokens kept, e.g. 0.7 (0 drops all)")
    axis: Literal["hidden", "sequence"] = Field("hidden", description="what the FFT runs over")
    cutoff: float = Field(0.25, gt=0.0, le=1.0, description="low-pass half-width as a fraction of frequency bins")
    normalize: bool = Field(True, description="RMS-normalise each token before filtering")
    band: Literal["low", "high"] = Field("low", description="score the energy below the cutoff (low) or above it")


def lowpass_window(bins: int, cutoff: float, device=None) -> Tensor:
    """Half a Hann window over ``bins`` rFFT bins: 1 at DC, falling to 0 at ``cutoff``."""
    width = max(1, math.ceil(cutoff * bins))
    k = torch.arange(bins, device=device, dtype=torch.float32)
    return torch.where(k < width, 0.5 * (1 + torch.cos(math.pi * k / width)), torch.zeros((), device=device))


def lowpass_energy(signal: Tensor, cutoff: float, dim: int, band: str = "low") -> Tensor:
    """L2 energy per position after low-pass filtering ``signal`` along ``dim`` (``band="high"``:
    of what the filter removes).

    Returns the filtered signal's norm over the feature dimension (the last
    one when filtering along another, otherwise along ``dim`` itself).
    """
    n = signal.shape[dim]
    spectrum = torch.fft.rfft(signal.float(), dim=dim)
    shape = [1] * signal.dim()
    shape[dim] = spectrum.shape[dim]
    window = lowpass_window(spectrum.shape[dim], cutoff, signal.device).view(shape)
    if band == "high":
        window = 1 - window
    filtered = torch.fft.irfft(spectrum * window, n=n, dim=dim)
    return filtered.norm(dim=-1)


def spu_scores(hidden: Tensor, visual: Tensor, params: SPUParams) -> Tensor:
    """Low-pass energy of every visual token: [B, S, D] -> [B, S], -inf elsewhere."""
    x = hidden.float()
    if params.normalize:
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    scores = torch.full(visual.shape, float("-inf"), device=hidden.device)
    if params.axis == "hidden":
        return scores.masked_scatter(visual, lowpass_energy(x[visual], params.cutoff, dim=-1, band=params.band))
    for row in range(x.shape[0]):
        if visual[row].any():
            scores[row, visual[row]] = lowpass_energy(x[row, visual[row]], params.cutoff, dim=0, band=params.band)
    return scores


def plan_count(params: SPUParams, n: int) -> int:
    """Visual tokens left of ``n`` arriving."""
    return keep_count(params.keep, n)


def spectrum_prune(state: LLMState, params: SPUParams) -> LLMState:
    """One SPU step: keep ``round(keep * n)`` visual tokens per sample, by low-pass energy."""
    return prune_visual(state, params.keep, lambda visual: spu_scores(state.hidden, visual, params))


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [
        TransformSpec(
            name="spectrum_prune",
            site="llm",
            params=SPUParams,
            run=spectrum_prune,
            plan=plan_count,
            eliminates=lambda params: params.keep == 0.0,
            summary="SPU: keep the visual tokens with the most low-frequency energy (attention-free)",
        )
    ]
