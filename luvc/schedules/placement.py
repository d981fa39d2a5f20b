"""Turn a step's ``at`` positions into block indices of a concrete model."""

from __future__ import annotations

import math

from luvc.errors import ScheduleError
from luvc.registry.spec import TransformSpec
from luvc.schedules.schema import Schedule

_STACK = {"vision": "vision encoder", "llm": "language model"}
_UNIT = {"vision": "blocks", "llm": "layers"}


def slots(stage: str, depth: int) -> int:
    """How many insertion points a stack of ``depth`` blocks has.

    Vision steps may also run after the last block (before the projector),
    so index ``depth`` is valid there; LLM steps run before a decoder layer.
    """
    return depth + 1 if stage == "vision" else depth


def resolve_positions(schedule: Schedule, stage: str, step_index: int, depth: int) -> list[int]:
    """Sorted, de-duplicated block indices where step ``step_index`` of ``stage`` runs.

    Raises:
        ScheduleError: a position is outside this model's stack, naming its depth.
    """
    step = getattr(schedule, stage)[step_index]
    n = slots(stage, depth)
    resolved: set[int] = set()
    for j, pos in enumerate(step.at):
        loc = (stage, step_index, "at", j)
        key = f"{stage}[{step_index}].at"
        if isinstance(pos, str):
            parts = [p.strip() for p in pos.split(":")]
            bounds = [int(p) if p else None for p in parts]
            indices = list(range(n))[slice(*bounds)]
            if not indices:
                raise ScheduleError(
                    f"range {pos!r} selects no {_UNIT[stage][:-1]} (this {_STACK[stage]} has {depth} {_UNIT[stage]})",
                    source=schedule.source, line=schedule.line_of(*loc), key=key,
                    hint=f"valid positions are 0..{n - 1}",
                )
            resolved.update(indices)
            continue
        index = math.floor(pos * depth + 0.5) if isinstance(pos, float) else pos
        if isinstance(pos, int) and pos < 0:
            index = n + pos
        if not 0 <= index < n:
            shown = f"fraction {pos} resolves to {_UNIT[stage][:-1]} {index}, which" if isinstance(pos, float) \
                else f"{_UNIT[stage][:-1]} {pos}"
            where = "before the projector" if stage == "vision" else "before the last layer"
            raise ScheduleError(
                f"{shown} is out of range (this {_STACK[stage]} has {depth} {_UNIT[stage]})",
                source=schedule.source, line=schedule.line_of(*loc), key=key,
                hint=f"valid positions are 0..{n - 1} ({n - 1} = {where}); fractions fit any depth",
            )
        resolved.add(index)
    return sorted(resolved)


def check_site(schedule: Schedule, stage: str, step_index: int, spec: TransformSpec) -> None:
    """Refuse a step placed in a stage its transform does not run in (a vision transform reads a
    ``VisionState``, an LLM transform an ``LLMState``).

    Raises:
        ScheduleError: naming the step's line and the stage to move it to.
    """
    if spec.site != stage:
        raise ScheduleError(
            f"{spec.name!r} runs in the {spec.site} stage, not in {stage!r}",
            source=schedule.source, line=schedule.line_of(stage, step_index, "transform"),
            key=f"{stage}[{step_index}].transform", hint=f"move this step under '{spec.site}:'",
        )
