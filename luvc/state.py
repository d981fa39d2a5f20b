"""Token states that flow through a compiled stack, and the token ledger.

The graph passes one state object from node to node. Transforms return a new
state and never mutate the one they were given; the ledger (``log``) is the
one shared, append-only record of a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LedgerRow:
    """Visual tokens entering one graph node, per image (vision) or sample (llm).

    Transform rows also give ``removed``, the tokens the transform took away
    (merged into neighbours or dropped), and the transform's name. While a
    forward runs, LLM rows hold their counts as device tensors (reading them
    at every layer would make the host wait for the accelerator each time);
    ``resolve`` turns them into lists, as ``luvc.ledger`` does.
    """

    node: str
    site: str
    visual: list[int] | Tensor
    removed: list[int] | Tensor = field(default_factory=list)
    transform: str | None = None
    text: list[int] | Tensor = field(default_factory=list)  # llm rows: text tokens per sample

    def resolve(self) -> LedgerRow:
        """This row with every count a list of ints."""
        for name in ("visual", "removed", "text"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                setattr(self, name, value.tolist())
        return self


@dataclass(frozen=True)
class VisionState:
    """Visual tokens inside the vision encoder, image after image.

    Each image's tokens are laid out ``(t, h, w, unit)``: a ``t x h x w`` grid of
    *units*, each unit ``unit`` consecutive tokens (the 2x2 patch blocks a
    Qwen-style merger consumes; 1 where there is no merger). Merging acts on
    whole units, so the projector always receives what it can consume.
    ``carried`` features ride along with their tokens: every vision transform
    (``luvc.transforms.merging.map_images``) merges, selects and pools them
    exactly as it does the hidden states.
    """

    hidden: Tensor  # [N, D]
    sizes: Tensor  # [N] float32: original patches each token stands for
    positions: Tensor  # [N, 2] float32: size-weighted mean (row, col) patch coordinate
    grids: tuple[tuple[int, int, int], ...]  # per image: (t, h, w) in units
    unit: int
    keys: Tensor | None = None  # [N, Dk] similarity metric captured from the last block
    attention: Tensor | None = None  # [N] attention each token received in the last block, when asked for
    prefix: Tensor | None = None  # [images, P, D] tokens every image attends to but that never merge (CLS)
    rows: frozenset[int] = frozenset()  # images laid out as one row of tokens that no longer form their grid
    carried: Tensor | None = None  # [N, C] features that merge with their tokens (DeepStack's earlier block outputs)
    decoding = False
    log: list[LedgerRow] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)  # adapter's per-state cache (rotary, cu_seqlens)
    site = "vision"

    def replace(self, **changes) -> VisionState:
        """A new state with ``changes``; the adapter's cache and the last block's keys and attention
        (which describe the old tokens) are dropped unless given, the ledger shared."""
        changes = {"keys": None, "attention": None, **changes}
        return dataclasses.replace(self, scratch={}, **changes)

    def tokens_per_image(self) -> list[int]:
        return [t * h * w * self.unit for t, h, w in self.grids]


@dataclass(frozen=True)
class LLMState:
    """The language model's sequence, padded to a rectangle.

    Rows are kept right-aligned (padding on the left) so the last position of
    every row is its newest token.
    """

    hidden: Tensor  # [B, S, D]
    valid: Tensor  # [B, S] bool: not padding
    visual: Tensor  # [B, S] bool: a visual token
    position_ids: Tensor  # [P, B, S] long: the model's own (M-RoPE: P = 3) positions, never renumbered
    source: Tensor  # [B, S] long: index in the caller's sequence, -1 for padding
    cache: object | None = None  # the model's KV cache, each layer holding only what it kept
    decoding: bool = False  # True after prefill: new tokens only, the ledger is not written
    image_blocks: bool = False  # each image's tokens attend to each other both ways (Gemma 3)
    sizes: Tensor | None = None  # [B, S] float32: tokens each one stands for, when the LLM attends by size
    grid: Tensor | None = None  # [B, S, 6] long: visual tokens' (item, frame, row, col, height, width), else -1
    #: per layer from the first, [B, L, D] features added to the visual tokens after that layer (Qwen3-VL's
    #: DeepStack), indexed by ``source``: a token keeps its own through every prune and a pruned one gets none
    deepstack: tuple[Tensor, ...] = ()
    log: list[LedgerRow] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)  # adapter's per-state cache (masks, rotary)
    site = "llm"

    def replace(self, **changes) -> LLMState:
        """A new state with ``changes``; the adapter's cache is dropped, the ledger shared."""
        return dataclasses.replace(self, scratch={}, **changes)

    def ledger_row(self, node: str) -> LedgerRow:
        """This state's counts as the ledger row of ``node`` (device tensors until resolved)."""
        visual = self.visual & self.valid
        return LedgerRow(node, "llm", visual.sum(dim=1), text=(self.valid & ~visual).sum(dim=1))


def compact(state: LLMState, keep: Tensor) -> LLMState:
    """Keep the tokens where ``keep`` is True, order preserved, rows right-aligned.

    Args:
        state: the sequence before.
        keep: [B, S] bool; padding is dropped whatever it says.
    """
    keep = keep & state.valid
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    # A stable sort puts dropped tokens first and kept ones last, in order.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width:]
    valid = torch.gather(keep, 1, order)

    def take(t: Tensor, lead: int) -> Tensor:
        index = order.view((1,) * lead + tuple(order.shape) + (1,) * (t.dim() - lead - 2))
        return torch.gather(t, lead + 1, index.expand(*t.shape[:lead], *order.shape, *t.shape[lead + 2:]))

    return state.replace(
        hidden=take(state.hidden, 0),
        valid=valid,
        visual=torch.gather(state.visual, 1, order) & valid,
        position_ids=take(state.position_ids, 1),
        source=torch.where(valid, torch.gather(state.source, 1, order), -1),
        sizes=None if state.sizes is None else torch.gather(state.sizes, 1, order),
        grid=None if state.grid is None else take(state.grid, 0),
    )


def to_device(state: VisionState | LLMState, device: torch.device) -> VisionState | LLMState:
    """``state`` with every tensor it carries (fields and scratch) on ``device``; ``state`` itself when they
    all are. A block of a model split across devices runs where its weights are, and what a transform
    combines with its output must be there too. The KV cache stays where each layer put it."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in ("cache", "log")}
    elsewhere: list[Tensor] = []
    map_tensors(fields, lambda t: elsewhere.append(t) if t.device != device else None)
    if not elsewhere:
        return state
    return dataclasses.replace(state, **map_tensors(fields, lambda t: t.to(device)))


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to each tensor in it, through lists, tuples and dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def round_half_up(x: float) -> int:
    """``round`` without banker's rounding, so keep counts are predictable."""
    return int(x + 0.5)
