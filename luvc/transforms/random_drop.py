"""Control: keep a uniformly random subset of each sample's visual tokens.

The floor every method must beat: if a method is no better than ``random_drop``
at the same budget, its scoring adds nothing. Seeded, so runs repeat exactly.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from luvc.registry import TransformSpec, hookimpl
from luvc.state import LLMState
from luvc.transforms.selection import prune_visual, pruning_spec


class RandomDropParams(BaseModel):
    """Parameters of a random drop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(ge=0.0, le=1.0, description="fraction of arriving visual tokens kept")
    seed: int = Field(0, description="seed of the random choice (the same seed keeps the same tokens)")


def token_hash(index: Tensor, seed: int) -> Tensor:
    """A uniform-looking float in [0, 1) per integer ``index``, fixed by ``seed`` (a 32-bit integer mixer)."""
    mask = 0xFFFFFFFF
    x = (index.long() + seed * 0x9E3779B9) & mask
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return (x ^ (x >> 16)).double() / 2**32


def random_drop(state: LLMState, params: RandomDropParams) -> LLMState:
    """Keep ``round(keep * n)`` visual tokens per sample, chosen uniformly at random.

    The draw is a hash of each token's place in the caller's sequence, so the
    same prompt loses the same tokens whatever the batch, padding or decoding
    step around it.
    """
    return prune_visual(state, params.keep, lambda visual: token_hash(state.source, params.seed))


@hookimpl
def luvc_transforms() -> list[TransformSpec]:
    return [pruning_spec("random_drop", RandomDropParams, random_drop,
                         summary="control: keep a seeded uniform random subset of the visual tokens")]
