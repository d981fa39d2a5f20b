"""The schedule schema: which transforms run where, with which parameters.

A schedule reads like a sentence::

    name: luvc-default
    description: OIM in the vision encoder, then SPU down to zero visual tokens.
    eliminate_visual: true       # the final LLM layer sees no visual token
    vision:                      # before vision-encoder blocks (index = depth: after the last)
      - transform: orthogonal_merge
        at: [0.25, 0.5]          # fractions of depth fit models of any depth
        params: {ratio: 0.25}
    llm:                         # before decoder layers
      - transform: spectrum_prune
        at: "2:20:4"             # a range start:stop[:step]
        params: {keep: 0.7}
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

Position = int | float | str


class Step(BaseModel):
    """One use of a transform at one or more places of a stack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transform: str = Field(description="Registered transform name, see `luvc plugins`.")
    at: tuple[Position, ...] = Field(
        description="Where it runs: block indices (int, negative counts from the end), "
        "fractions of depth (float in [0, 1]) or ranges 'start:stop[:step]'."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Validated by the transform's params model.")

    @field_validator("at", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, (int, float, str)):
            value = (value,)
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("needs at least one position")
            for item in value:
                if isinstance(item, bool):
                    raise ValueError(f"position {item!r} is a boolean; use a block index, a fraction or 'start:stop'")
                if isinstance(item, float) and not 0.0 <= item <= 1.0:
                    raise ValueError(f"fraction {item} must be between 0 and 1 (a fraction of depth)")
                if isinstance(item, str) and not _is_range(item):
                    raise ValueError(f"{item!r} is not a range; write 'start:stop' or 'start:stop:step' with integers")
                if isinstance(item, str) and item.count(":") == 2 and item.split(":")[2].strip() and \
                        int(item.split(":")[2]) == 0:
                    raise ValueError(f"range {item!r} has step 0; write a positive step, e.g. '1:4:1', or leave "
                                     "it out")
        return value


class Schedule(BaseModel):
    """A complete compression schedule for one VLM: vision stage then LLM stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    eliminate_visual: bool = Field(
        default=False,
        description="Claim that no visual token reaches the final LLM layer; compile proves it or fails.",
    )
    proportional_llm_attention: bool = Field(
        default=False,
        description="A merged visual token counts, in the LLM's attention, as the tokens it replaced (the "
        "log-size bias ToMe uses in the encoder); SDPA and eager attention only.",
    )
    vision: tuple[Step, ...] = ()
    llm: tuple[Step, ...] = ()

    _source: str = PrivateAttr(default="<schedule>")
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        """Equal when they say the same thing, wherever they were loaded from."""
        return isinstance(other, Schedule) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    def to_yaml(self) -> str:
        """The schedule as YAML text; ``load_schedule`` of it gives an equal schedule."""
        data = self.model_dump(mode="json")
        if not data["proportional_llm_attention"]:  # opt-in: absent unless asked for
            del data["proportional_llm_attention"]
        for stage in ("vision", "llm"):
            if not data[stage]:
                del data[stage]
            else:
                for step in data[stage]:
                    step["at"] = step["at"][0] if len(step["at"]) == 1 else step["at"]
                    if not step["params"]:
                        del step["params"]
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def line_of(self, *loc: Any) -> int | None:
        """YAML line of ``loc`` (e.g. ``("llm", 0, "at")``), when loaded from YAML."""
        return line_in(self._lines, loc)

    @property
    def source(self) -> str:
        """Where the schedule came from: a file path, ``<yaml>``, ``<dict>`` or ``preset:NAME``."""
        return self._source


def line_in(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The YAML line of ``loc`` in ``lines``, or of the nearest key enclosing it (a value's own line may
    not be indexed, e.g. an item of a flow list); None when nothing encloses it."""
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _is_range(text: str) -> bool:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        return False
    try:
        [int(p) for p in parts if p.strip()]
    except ValueError:
        return False
    return bool(parts[0].strip() or parts[1].strip())
