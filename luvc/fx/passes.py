"""Graph passes: place a schedule on a stack graph, insert its transforms, split the graph for execution."""

from __future__ import annotations

import torch.fx as fx

from luvc.errors import ScheduleError
from luvc.fx.nodes import TransformNode
from luvc.fx.trace import StackGraphModule, attach
from luvc.registry.spec import AttentionProbe
from luvc.schedules import Schedule
from luvc.schedules.plan import STAGES, Plan


def block_nodes(gm: fx.GraphModule, site: str) -> list[fx.Node]:
    """The block nodes of one stack, in order (the projector / final norm excluded)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("site") == site
            and n.meta.get("kind") == "block"]


def stack_exit(gm: fx.GraphModule, site: str) -> fx.Node:
    """The node right after a stack's last block (projector or final norm)."""
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("site") == site
                and n.meta.get("kind") == "io")


def plan_of(gm: fx.GraphModule, schedule: Schedule) -> Plan:
    """``schedule`` placed on ``gm``'s stacks, its rows named by ``gm``'s block and exit nodes.

    Raises:
        ScheduleError: a position is out of range for this model.
    """
    return Plan.build(schedule, _stack_names(gm))


def _stack_names(gm: fx.GraphModule) -> dict[str, list[str]]:
    return {stage: [n.target for n in block_nodes(gm, stage)] + [stack_exit(gm, stage).target] for stage in STAGES}


def insert_transforms(gm: StackGraphModule, plan: Plan) -> StackGraphModule:
    """Insert one transform node per placed step of ``plan``, before its block, and keep the plan
    on the graph as ``gm.luvc_plan``.

    When the schedule claims ``eliminate_visual``, the language model's exit node (``FinalNormNode``)
    is given the labels of the steps that should have removed every visual token, so each prefill
    checks the claim.

    Raises:
        ValueError: ``plan`` was placed on other stacks than ``gm``'s.
        ScheduleError: a transform that needs a vision block's attention has no block right before it, or one
            that needs an LLM layer's attention runs before a layer without attention (linear attention).
    """
    if {stage: list(names) for stage, names in plan.nodes.items()} != _stack_names(gm):
        raise ValueError("the plan was placed on other stacks than this graph's; build it with plan_of(gm, ...)")
    blocks = {stage: block_nodes(gm, stage) for stage in STAGES}
    for step in plan.steps:
        stage = step.stage
        before = blocks[stage][step.position] if step.position < len(blocks[stage]) else stack_exit(gm, stage)
        layer = gm.get_submodule(before.target) if step.spec.needs_layer and stage == "llm" else None
        if layer is not None and step.position < len(blocks[stage]) and not isinstance(layer, AttentionProbe):
            raise ScheduleError(
                f"{step.transform} ranks tokens by the attention of the LLM layer it runs before, and layer "
                f"{step.position} ({type(layer.block).__name__}, a linear-attention layer) has no attention to rank "
                "tokens by",
                source=plan.schedule.source, line=plan.schedule.line_of("llm", step.step_index, "at"),
                key=f"llm[{step.step_index}].at", hint="place it before one of the model's full-attention layers")
        attach(gm, step.label, TransformNode(step.spec, step.params, step.label, layer))
        upstream = before.args[0]
        with gm.graph.inserting_before(before):
            node = gm.graph.call_module(step.label, (upstream,))
        node.meta.update(site=stage, kind="transform", index=step.position, transform=step.transform,
                         step=step.step_index, params=step.params)
        before.replace_input_with(upstream, node)
    _mark_key_capture(gm, plan.schedule)
    if plan.schedule.eliminate_visual:
        final = gm.get_submodule(stack_exit(gm, "llm").target)
        final.eliminated_by = tuple(step.label for step in plan.eliminating_steps())
    gm.luvc_plan = plan
    gm.graph.lint()
    gm.recompile()
    return gm


def _mark_key_capture(gm: fx.GraphModule, schedule: Schedule) -> None:
    """Ask each vision block that feeds a transform to keep its attention keys (and, where the transform
    ranks tokens by attention, the attention each token receives).

    Raises:
        ScheduleError: a transform that needs a block's attention has no block right before it.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get("kind") != "transform" or node.meta["site"] != "vision":
            continue
        feeder = node.args[0]
        is_block = isinstance(feeder, fx.Node) and feeder.op == "call_module" and feeder.meta.get("kind") == "block"
        needs_attention = gm.get_submodule(node.target).spec.needs_layer
        if needs_attention and not is_block:
            step = node.meta["step"]
            raise ScheduleError(
                f"{node.meta['transform']} ranks tokens by the attention of the vision block before it, "
                f"and at position {node.meta['index']} no block runs right before it",
                source=schedule.source, line=schedule.line_of("vision", step, "at"), key=f"vision[{step}].at",
                hint="place it after a block, e.g. at: 1.0 (the tower's exit), and alone at that position",
            )
        module = gm.get_submodule(node.target)
        after_transform = isinstance(feeder, fx.Node) and feeder.meta.get("kind") == "transform"
        if after_transform and module.spec.needs_keys(module.params):
            step = node.meta["step"]
            raise ScheduleError(
                f"{node.meta['transform']} compares tokens by the attention keys of the vision block before it, "
                f"and at position {node.meta['index']} {feeder.meta['transform']} runs between them, so those "
                "keys no longer describe the tokens",
                source=schedule.source, line=schedule.line_of("vision", step, "at"), key=f"vision[{step}].at",
                hint="give each such step a position of its own (e.g. at: [0.5, 0.75]), or, for "
                     "orthogonal_merge, compare block outputs with metric: hidden",
            )
        if is_block:
            block = gm.get_submodule(feeder.target)
            block.capture_keys = True
            block.capture_attention = block.capture_attention or needs_attention


def section(gm: fx.GraphModule, site: str) -> fx.GraphModule:
    """An executable graph of one site's nodes, sharing ``gm``'s modules."""
    graph = fx.Graph()
    value = graph.placeholder("state")
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.meta.get("site") == site:
            value = graph.call_module(node.target, (value,))
            value.meta.update(node.meta)
    graph.output(value)
    return fx.GraphModule(gm, graph, class_name=f"Luvc{site.capitalize()}Section")
