"""Spectrum Pruning Unit (SPU): drop the visual tokens with the least low-frequency energy.

LUVC (arXiv 2512.09010), SPU. Each visual token is scored by the L2 energy
left after a low-pass filter (FFT, multiply by a Hann-type window centred on
the lowest frequencies, inverse FFT); the highest-scoring tokens are kept and
the rest dropped. No attention weights and no pairwise similarity are used,
so it runs unchanged under SDPA and FlashAttention. Placed before several
decoder layers, with ``keep: 0.0`` at the last step, it forms the cascade
that leaves no visual token at the final layer.

Choices the paper leaves open, made here:

* ``axis``: ``hidden`` (default, the paper's) filters each token's hidden
  vector on its own, so a token's score does not depend on where it sits or
  on any other token (the paper's "position-invariant" argument); ``grid``
  filters each image's own 2-D token grid (rows and columns; each video frame
  and each tile on its own), channel by channel, scoring a token by the
  energy of the filtered grid at its cell. A grid with pruned cells has them
  filled with the image's mean kept token before filtering, so a hole reads
  as "no detail" rather than as an edge. The 2-D FFT is periodic along each
  row and column (a row's end meets its own start, never the next row), and
  the window is radial: a Hann taper over the frequency's distance from DC,
  as a fraction of Nyquist on each axis. A token's ``grid`` score depends on
  its own image alone: not on other images of the sample, nor on the batch.
* ``normalize`` (default on) divides each token by its RMS first, so a few
  huge outlier channels cannot dominate the score.
* ``cutoff`` is the window's half-width as a fraction of the frequency bins
  (default 0.25).
* ``band: low`` (default, the paper's) keeps the tokens with the most energy
  below the cutoff; ``band: high`` scores the energy the low-pass filter
  removes instead: with ``axis: grid``, how much a token differs from its
  smoothed neighbourhood in the image (detail, the ``luvc-detail`` preset),
  with ``axis: hidden`` nearly the reverse ranking of ``low``. Still
  attention- and similarity-free.
* ``k = round(keep * n)`` of the ``n`` arriving visual tokens are kept per
  sample; text tokens are never dropped; kept tokens keep their position ids.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.errors import CompileError
from luvc.registry import TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.selection import keep_count, prune_visual


class SPUParams(BaseModel):
    """Parameters of one spectrum pruning step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(ge=0.0, le=1.0, description="fraction of arriving visual tokens kept, e.g. 0.7 (0 drops all)")
    axis: Literal["hidden", "grid"] = Field(
        "hidden", description="what the FFT runs over: each token's hidden vector, or each image's 2-D token grid")
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


def grid_lowpass_energy(grid: Tensor, cutoff: float, band: str = "low") -> Tensor:
    """[h, w, D] -> [h, w]: energy at each cell of the grid low-pass filtered in 2-D (``band="high"``:
    of what the filter removes), with a radial Hann window reaching 0 at ``cutoff`` of Nyquist."""
    h, w = grid.shape[:2]
    spectrum = torch.fft.rfft2(grid, dim=(0, 1))
    fy = torch.fft.fftfreq(h, device=grid.device) / 0.5
    fx = torch.fft.rfftfreq(w, device=grid.device) / 0.5
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    window = torch.where(radius < cutoff, 0.5 * (1 + torch.cos(math.pi * radius / cutoff)), torch.zeros(()))
    if band == "high":
        window = 1 - window
    return torch.fft.irfft2(spectrum * window[..., None], s=(h, w), dim=(0, 1)).norm(dim=-1)


def grid_scores(x: Tensor, visual: Tensor, grid: Tensor | None, cutoff: float, band: str) -> Tensor:
    """[N] ``grid_lowpass_energy`` of each visual token (``x[visual]``), image frame by image frame."""
    cells = None if grid is None else grid[visual]  # [N, 6] item, frame, row, col, height, width
    if cells is None or bool((cells[:, 0] < 0).any()):
        raise CompileError(
            "spectrum_prune with axis: grid needs each image's token grid in the LLM, and this model's adapter "
            "gives none for these features (or a transform before it laid an image out as one row)\n"
            "  use axis: hidden, which scores each token on its own")
    tokens = x[visual]
    out = torch.empty(len(tokens), device=x.device)
    frame_ids = cells[:, 0] * (int(cells[:, 1].max()) + 1) + cells[:, 1]
    for frame in torch.unique(frame_ids):
        idx = (frame_ids == frame).nonzero().squeeze(1)
        (h, w), rows, cols = cells[idx[0], 4:].tolist(), cells[idx, 2], cells[idx, 3]
        canvas = tokens[idx].mean(dim=0).expand(h, w, -1).clone()
        canvas[rows, cols] = tokens[idx]
        out[idx] = grid_lowpass_energy(canvas, cutoff, band)[rows, cols]
    return out


def spu_scores(hidden: Tensor, visual: Tensor, params: SPUParams, grid: Tensor | None = None) -> Tensor:
    """Low-pass energy of every visual token: [B, S, D] -> [B, S], -inf elsewhere (``grid``: the
    state's [B, S, 6] token cells, needed by ``axis: grid``)."""
    x = hidden.float()
    if params.normalize:
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    scores = torch.full(visual.shape, float("-inf"), device=hidden.device)
    if params.axis == "hidden":  # every token scored, text too, so nothing waits on the mask's count
        return torch.where(visual, lowpass_energy(x, params.cutoff, dim=-1, band=params.band), scores)
    return scores.masked_scatter(visual, grid_scores(x, visual, grid, params.cutoff, params.band))


def plan_count(params: SPUParams, n: int) -> int:
    """Visual tokens left of ``n`` arriving."""
    return keep_count(params.keep, n)


def spectrum_prune(state: LLMState, params: SPUParams) -> LLMState:
    """One SPU step: keep ``round(keep * n)`` visual tokens per sample, by low-pass energy."""
    return prune_visual(state, params.keep, lambda visual: spu_scores(state.hidden, visual, params, state.grid))


def _requires(params: SPUParams) -> dict[str, str]:
    return {"llm_grid": "use axis: hidden, which scores each token on its own"} if params.axis == "grid" else {}


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [TransformSpec("spectrum_prune", "llm", SPUParams, spectrum_prune, plan_count, requires=_requires,
                          eliminates=lambda params: params.keep == 0.0,
                          summary="SPU: keep the visual tokens with the most low-frequency energy (attention-free)")]
