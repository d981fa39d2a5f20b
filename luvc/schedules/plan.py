"""A schedule placed on one model's stacks: where each step runs, in which order, with which bound params.

This is the only place positions are resolved, steps ordered and their params bound. The lowering
(``luvc.fx.passes.insert_transforms``) inserts one node per ``PlacedStep``; the static token counts
(``luvc inspect``, the docs' figures, the matched budgets) and the verification (``luvc.schedules.verify``)
read the same plan, so none of them can disagree with what runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel

from luvc.registry import get_registry
from luvc.registry.spec import TransformSpec
from luvc.schedules.loader import params_of
from luvc.schedules.placement import resolve_positions
from luvc.schedules.schema import Schedule

#: The stacks, in running order.
STAGES = ("vision", "llm")


@dataclass(frozen=True)
class PlacedStep:
    """One transform node: step ``step_index`` of ``stage``, run before block ``position``.

    ``occurrence`` numbers the transform's nodes within its stage in running order; ``params`` are the
    step's params bound for that occurrence (``spec.bind``), e.g. OIM's alternating axis.
    """

    stage: str
    position: int
    step_index: int
    transform: str
    occurrence: int
    spec: TransformSpec
    params: BaseModel

    @property
    def label(self) -> str:
        """The node's name in the graph and the ledger, e.g. ``llm.transforms.spectrum_prune_2``."""
        return f"{self.stage}.transforms.{self.transform}_{self.occurrence}"


class Count(NamedTuple):
    """Visual tokens entering one node of the plan."""

    node: str
    tokens: int


@dataclass(frozen=True)
class Plan:
    """``schedule``'s steps placed on stacks whose nodes are ``nodes[stage]``: the block nodes in order,
    then the stack's exit (projector or final norm). ``steps`` are in running order."""

    schedule: Schedule
    nodes: Mapping[str, tuple[str, ...]]
    steps: tuple[PlacedStep, ...]

    @classmethod
    def build(cls, schedule: Schedule, nodes: Mapping[str, Sequence[str]]) -> Plan:
        """Place ``schedule`` on stacks of these node names (each stage's blocks, then its exit).

        Steps at one position run in schedule order; each transform's ``bind`` sees its occurrence
        number within its stage, in running order.

        Raises:
            ScheduleError: a position is out of range for these stacks.
        """
        registry = get_registry()
        placed: list[PlacedStep] = []
        for stage in STAGES:
            steps = getattr(schedule, stage)
            depth = len(nodes[stage]) - 1
            order = sorted((pos, i) for i in range(len(steps)) for pos in resolve_positions(schedule, stage, i, depth))
            occurrences: dict[str, int] = {}
            for pos, i in order:
                name = steps[i].transform
                spec = registry.transforms[name]
                k = occurrences.get(name, 0)
                occurrences[name] = k + 1
                placed.append(PlacedStep(stage, pos, i, name, k, spec, spec.bind(params_of(steps[i]), k)))
        return cls(schedule, {stage: tuple(nodes[stage]) for stage in STAGES}, tuple(placed))

    @classmethod
    def of_depths(cls, schedule: Schedule, vision_depth: int, llm_depth: int) -> Plan:
        """Place ``schedule`` on stacks of these depths, with the node names most adapters use
        (``vision.blocks.i``, ``vision.projector``, ``llm.layers.i``, ``llm.norm``)."""
        return cls.build(schedule, {
            "vision": [f"vision.blocks.{i}" for i in range(vision_depth)] + ["vision.projector"],
            "llm": [f"llm.layers.{i}" for i in range(llm_depth)] + ["llm.norm"],
        })

    def depth(self, stage: str) -> int:
        """Blocks in ``stage``'s stack."""
        return len(self.nodes[stage]) - 1

    def running(self, stage: str) -> Iterator[tuple[str, PlacedStep | None]]:
        """Every node of ``stage`` in running order: ``(label, step)`` for a transform, ``(name, None)``
        for a block or the exit."""
        steps = [s for s in self.steps if s.stage == stage]
        for position, name in enumerate(self.nodes[stage]):
            for step in (s for s in steps if s.position == position):
                yield step.label, step
            yield name, None

    def eliminating_steps(self) -> list[PlacedStep]:
        """The LLM steps whose transform says they leave no visual token, in running order."""
        return [s for s in self.steps if s.stage == "llm" and s.spec.eliminates(s.params)]

    def counts(self, grids: Sequence[tuple[int, int, int]], unit: int = 1,
               llm_entry: int | None = None) -> list[Count]:
        """Visual tokens entering each node, by the transforms' static count rules, for one sample's images.

        ``grids`` are the images' unit grids; the vision rows count all images' tokens (``unit`` per
        unit), the LLM rows the sample's visual tokens: one per unit left, or ``llm_entry`` where the
        adapter packs tiles into another count (LLaVA-OneVision's stitched tiles and newline tokens).
        """
        rows: list[Count] = []
        grids = list(grids)
        for label, step in self.running("vision"):
            rows.append(Count(label, sum(math.prod(g) for g in grids) * unit))
            if step is not None:
                grids = [step.spec.plan(step.params, g) for g in grids]
        visual = sum(math.prod(g) for g in grids) if llm_entry is None else llm_entry
        for label, step in self.running("llm"):
            rows.append(Count(label, visual))
            if step is not None:
                visual = step.spec.plan(step.params, visual)
        return rows

    def layer_counts(self, grid: tuple[int, int, int]) -> list[int]:
        """Visual tokens entering each decoder layer, for one image of unit ``grid``."""
        layers = set(self.nodes["llm"][:-1])
        return [row.tokens for row in self.counts([grid]) if row.node in layers]
