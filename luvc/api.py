"""``compile`` and ``uncompile``: put a schedule into a model, and take it out again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from torch import nn

from luvc.errors import CompileError, ScheduleError
from luvc.fx.passes import insert_transforms, plan_of
from luvc.fx.trace import StackGraphModule, trace_stack
from luvc.hf import attn_implementation
from luvc.models import ModelAdapter, find_adapter
from luvc.registry import get_registry
from luvc.registry.adapter import CAPABILITIES
from luvc.schedules import Schedule, load_schedule, params_of
from luvc.schedules.loader import ScheduleLike
from luvc.schedules.verify import verify


@dataclass(frozen=True)
class CompileRecord:
    """Everything ``compile`` changed, kept on the model as ``model._luvc``."""

    schedule: Schedule
    adapter: ModelAdapter
    graph: StackGraphModule
    undo: dict
    state_keys: tuple[str, ...]
    classes: dict[str, type]  # every module's class before compile, by qualified name
    saved_schedule: Any  # model.config.luvc_schedule before compile (_ABSENT if it had none)


#: The config key a compiled model records its schedule under, so that ``save_pretrained`` keeps it.
SCHEDULE_KEY = "luvc_schedule"
_ABSENT = object()


def compile(model: nn.Module, schedule: ScheduleLike | None = None) -> nn.Module:  # noqa: A001 - the product's verb
    """Apply a compression schedule to ``model`` in place and return it.

    Everything is validated before anything changes: on error the model is
    untouched. Afterwards the model's own ``forward`` and ``generate`` run
    through the compiled stack graph (``model.luvc_graph``); weights are never
    modified, and ``luvc.uncompile`` restores the original exactly. The
    schedule is recorded in ``model.config.luvc_schedule``, so a checkpoint
    saved with ``save_pretrained`` carries it (plain transformers loads such a
    checkpoint as usual and ignores the key).

    Args:
        model: a supported Hugging Face VLM (see ``luvc plugins``).
        schedule: anything ``luvc.load_schedule`` accepts; by default the one
            recorded in ``model.config.luvc_schedule``.

    Raises:
        ScheduleError: the schedule is invalid or does not fit this model.
        UnsupportedModelError: no adapter handles this architecture.
        CompileError: the model is already compiled, or cannot be.
    """
    if getattr(model, "_luvc", None) is not None:
        raise CompileError(
            f"this {type(model).__name__} is already compiled with {model._luvc.schedule.name!r}\n"
            "  call luvc.uncompile(model) first"
        )
    if schedule is None:
        schedule = saved_schedule(model)
    resolved, adapter, graph = lower(model, schedule)
    state_keys = tuple(model.state_dict().keys())
    classes = {name: type(module) for name, module in model.named_modules()}
    before = getattr(model.config, SCHEDULE_KEY, _ABSENT)
    undo = adapter.install(model, graph)
    model.__dict__["luvc_graph"] = graph
    setattr(model.config, SCHEDULE_KEY, yaml.safe_load(resolved.to_yaml()))
    model._luvc = CompileRecord(resolved, adapter, graph, undo, state_keys, classes, before)
    return model


def saved_schedule(model: nn.Module) -> dict:
    """The schedule recorded in ``model.config`` by ``compile`` (and so in a checkpoint saved after it).

    Raises:
        CompileError: the config has none.
    """
    data = getattr(getattr(model, "config", None), SCHEDULE_KEY, None)
    if data is None:
        raise CompileError(
            f"no schedule given, and this {type(model).__name__}'s config has no {SCHEDULE_KEY} (a model saved "
            "after luvc.compile records one)\n  pass one, e.g. luvc.compile(model, 'luvc-default')"
        )
    return data


def trace(model: nn.Module) -> StackGraphModule:
    """The model's stacks as a ``torch.fx.GraphModule`` with blocks as leaves, no transform inserted.

    Raises:
        UnsupportedModelError: no registered adapter handles ``model``.
    """
    return trace_stack(find_adapter(model).stack_nodes(model))


def lower(model: nn.Module, schedule: ScheduleLike) -> tuple[Schedule, ModelAdapter, StackGraphModule]:
    """Trace ``model``, place the schedule on its stacks, verify the plan and insert its transforms,
    changing nothing.

    This is everything ``compile`` checks; it also works on a model built on
    the meta device, so schedules can be checked against models too large to
    load.

    Returns:
        The loaded schedule, the model's adapter and the verified graph.
    """
    resolved = load_schedule(schedule)
    adapter = find_adapter(model)
    check_stages(resolved, adapter, type(model).__name__)
    adapter.check(model)
    check_capabilities(resolved, adapter)
    traced = trace_stack(adapter.stack_nodes(model))
    plan = plan_of(traced, resolved)
    verify(plan)
    graph = insert_transforms(traced, plan)
    if resolved.proportional_llm_attention:
        impl = attn_implementation(model.config.get_text_config())
        if impl not in ("sdpa", "eager"):
            raise CompileError(f"proportional_llm_attention needs an additive attention bias, which "
                               f"{impl!r} cannot take\n  load the model with attn_implementation='sdpa', or set "
                               "proportional_llm_attention: false")
        graph.luvc_llm_sizes = True
    return resolved, adapter, graph


def check_stages(schedule: Schedule, adapter: ModelAdapter, architecture: str) -> None:
    """Refuse a step of a stage the model's adapter does not compile (the generic adapter runs the
    vision tower as transformers does, so it takes LLM steps only).

    Raises:
        ScheduleError: naming the first such step's YAML line, the adapter, and the fix.
    """
    supported = getattr(adapter, "stages", frozenset({"vision", "llm"}))
    for stage in ("vision", "llm"):
        steps = getattr(schedule, stage)
        if steps and stage not in supported:
            raise ScheduleError(
                f"{steps[0].transform} runs in the {stage} stage, which the {adapter.name} adapter that handles "
                f"{architecture} does not compile (it supports: {', '.join(sorted(supported))})",
                source=schedule.source, line=schedule.line_of(stage, 0, "transform"), key=f"{stage}[0]",
                hint=f"use a schedule without {stage} steps (e.g. luvc-llm, the paper's SPU cascade without the "
                     f"merge, or fastv-third), or add a family adapter for {architecture} "
                     "(docs/tutorials/adapters.md)",
            )


def check_capabilities(schedule: Schedule, adapter: ModelAdapter) -> None:
    """Refuse a step that needs something of the model's adapter it does not provide.

    Raises:
        ScheduleError: naming the step's YAML line, what is missing and the fix.
    """
    have = getattr(adapter, "capabilities", frozenset())
    registry = get_registry()
    for stage in ("vision", "llm"):
        for i, step in enumerate(getattr(schedule, stage)):
            for capability, fix in registry.transforms[step.transform].requires(params_of(step)).items():
                if capability not in have:
                    raise ScheduleError(
                        f"{step.transform} with these params needs {CAPABILITIES.get(capability, capability)}, "
                        f"which the {adapter.name} adapter does not provide",
                        source=schedule.source, line=schedule.line_of(stage, i, "params"),
                        key=f"{stage}[{i}].params", hint=fix,
                    )


def uncompile(model: nn.Module) -> nn.Module:
    """Undo ``compile`` in place and return the model.

    Raises:
        CompileError: the model is not compiled, or could not be fully restored.
    """
    record: CompileRecord | None = getattr(model, "_luvc", None)
    if record is None:
        raise CompileError(f"this {type(model).__name__} is not compiled with luvc; nothing to undo")
    record.adapter.uninstall(model, record.undo)
    del model._luvc
    if record.saved_schedule is _ABSENT:
        delattr(model.config, SCHEDULE_KEY)
    else:
        setattr(model.config, SCHEDULE_KEY, record.saved_schedule)
    model.__dict__.pop("luvc_graph", None)
    problems = unrestored(model, record)
    if problems:
        raise CompileError("uncompile could not restore the model exactly:\n  " + "\n  ".join(problems[:8]))
    return model


def unrestored(model: nn.Module, record: CompileRecord) -> list[str]:
    """What differs from the model as it was before ``compile``: module classes (by identity), modules
    added or removed, state-dict keys."""
    now = {name: type(module) for name, module in model.named_modules()}
    problems = [f"{name or '<model>'}: " + (f"still a subclass of {was.__qualname__} ({cls.__qualname__})"
                                            if issubclass(cls, was) else f"{cls.__qualname__}, not {was.__qualname__}")
                for name, cls in now.items() if (was := record.classes.get(name)) is not None and cls is not was]
    problems += [f"{name}: a module compile added" for name in now if name not in record.classes]
    problems += [f"{name}: a module that is gone" for name in record.classes if name not in now]
    keys = tuple(model.state_dict().keys())
    if keys != record.state_keys:
        added = sorted(set(keys) - set(record.state_keys))
        missing = sorted(set(record.state_keys) - set(keys))
        problems.append(f"state-dict keys differ: added {added[:3]}, missing {missing[:3]}"
                        + ("" if added or missing else " (same keys, another order)"))
    return problems


def ledger(model: nn.Module) -> list:
    """The token ledger of the model's last prefill: visual tokens entering each node."""
    if getattr(model, "_luvc", None) is None:
        raise CompileError("the model is not compiled with luvc, so it keeps no token ledger")
    for module in model.modules():
        if "luvc_ledger" in module.__dict__:
            return [row.resolve() for row in module.__dict__["luvc_ledger"]]
    return []
