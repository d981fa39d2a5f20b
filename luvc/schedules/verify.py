"""Prove a plan sound before anything runs: each step in a stage it can run in, no count rising, and the
``eliminate_visual`` claim reached and kept.

The proof reads only the transforms' static rules (``site``, ``plan``, ``eliminates``); whether a
transform's ``run`` honours its own rules is checked at run time, where it matters: the final norm of a
model compiled with ``eliminate_visual`` refuses a prefill whose visual tokens reached it.
"""

from __future__ import annotations

from luvc.errors import ScheduleError
from luvc.schedules.placement import check_site
from luvc.schedules.plan import Count, PlacedStep, Plan

#: Unit grids the count rules are probed at: one unit, odd and even sides, several frames, a large image.
PROBES = ((1, 1, 1), (1, 3, 5), (1, 16, 16), (2, 9, 14), (1, 64, 48))


def verify(plan: Plan) -> None:
    """Prove ``plan``'s schedule sound on its stacks, for any input size.

    1. Every step runs in the stage its transform is written for.
    2. No step's count rule gives more visual tokens than it receives (probed at ``PROBES``), and a
       step that says it ``eliminates`` them leaves none; so no count rises along the plan.
    3. With ``eliminate_visual``, an LLM step that eliminates the visual tokens is placed (necessarily
       before the final decoder layer); by 2, no later step brings any back, so the final layer sees none.

    Raises:
        ScheduleError: at the first step that breaks one, naming its YAML line and the fix.
    """
    for step in plan.steps:
        check_site(plan.schedule, step.stage, step.step_index, step.spec)
    steps = {step.label: step for step in plan.steps}
    for grid in PROBES:
        rows = plan.counts([grid])
        for row, after in zip(rows, rows[1:]):
            if row.node in steps:
                _check_step(plan, steps[row.node], row, after.tokens)
    if plan.schedule.eliminate_visual and not plan.eliminating_steps():
        depth = plan.depth("llm")
        raise ScheduleError(
            f"claims to eliminate visual tokens, but no step placed in the language model removes them all "
            f"before the last of its {depth} decoder layers",
            source=plan.schedule.source, line=plan.schedule.line_of("eliminate_visual"), key="eliminate_visual",
            hint=f"place a step that keeps none (spectrum_prune with keep: 0.0) at a layer <= {depth - 1}",
        )


def _check_step(plan: Plan, step: PlacedStep, entering: Count, left: int) -> None:
    """Refuse ``step`` when its count rule turns ``entering.tokens`` visual tokens into more, or, when it
    says it eliminates them, into any."""
    schedule, key = plan.schedule, f"{step.stage}[{step.step_index}].transform"
    line = schedule.line_of(step.stage, step.step_index, "transform")
    if step.spec.eliminates(step.params) and left:
        raise ScheduleError(
            f"{step.transform} says it eliminates every visual token (eliminates), but its count rule "
            f"leaves {left} of {entering.tokens} at {step.label}",
            source=schedule.source, line=line, key=key,
            hint=f"fix the plugin of {step.transform!r}: its TransformSpec's plan and eliminates disagree",
        )
    if left <= entering.tokens:
        return
    gone = [s for s in plan.eliminating_steps() if plan.steps.index(s) < plan.steps.index(step)]
    back = f" back, after {gone[0].label} removed them all" if gone else ""
    raise ScheduleError(
        f"{step.transform} adds visual tokens{back}: {entering.tokens} enter {step.label} and "
        f"{left} leave it, by its count rule",
        source=schedule.source, line=line, key=key,
        hint=f"move this step before {gone[0].label} or remove it" if gone else
        f"a step never adds visual tokens: fix the count rule (plan) of the {step.transform!r} transform, "
        "or remove this step",
    )
