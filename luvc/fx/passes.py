"""Graph passes: lower a schedule into a stack graph, verify it, split it for execution."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from luvc.errors import ScheduleError
from luvc.fx.nodes import TransformNode
from luvc.fx.trace import StackGraphModule, attach
from luvc.registry import get_registry
from luvc.schedules import Schedule, params_of
from luvc.schedules.placement import resolve_positions


@dataclass(frozen=True)
class Insertion:
    stage: str
    position: int
    step_index: int
    transform: str


def block_nodes(gm: fx.GraphModule, site: str) -> list[fx.Node]:
    """The block nodes of one stack, in order (the projector / final norm excluded)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("site") == site
            and n.meta.get("kind") == "block"]


def stack_exit(gm: fx.GraphModule, site: str) -> fx.Node:
    """The node right after a stack's last block (projector or final norm)."""
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("site") == site
                and n.meta.get("kind") == "io")


def insert_transforms(gm: StackGraphModule, schedule: Schedule) -> StackGraphModule:
    """Insert one transform node per scheduled (step, position), before its block.

    Steps at the same position run in schedule order. Each transform's
    ``bind`` sees its occurrence number within its stage, in running order.

    Raises:
        ScheduleError: a position is out of range for this model.
    """
    registry = get_registry()
    for stage in ("vision", "llm"):
        blocks = block_nodes(gm, stage)
        plan: list[Insertion] = []
        for i, step in enumerate(getattr(schedule, stage)):
            for pos in resolve_positions(schedule, stage, i, len(blocks)):
                plan.append(Insertion(stage, pos, i, step.transform))
        plan.sort(key=lambda ins: (ins.position, ins.step_index))
        occurrences: dict[str, int] = {}
        for ins in plan:
            spec = registry.transforms[ins.transform]
            k = occurrences.get(ins.transform, 0)
            occurrences[ins.transform] = k + 1
            params = spec.bind(params_of(getattr(schedule, stage)[ins.step_index]), k)
            target = f"{stage}.transforms.{ins.transform}_{k}"
            before = blocks[ins.position] if ins.position < len(blocks) else stack_exit(gm, stage)
            layer = gm.get_submodule(before.target) if spec.needs_layer and stage == "llm" else None
            attach(gm, target, TransformNode(spec, params, target, layer))
            upstream = before.args[0]
            with gm.graph.inserting_before(before):
                node = gm.graph.call_module(target, (upstream,))
            node.meta.update(site=stage, kind="transform", index=ins.position, transform=ins.transform,
                             step=ins.step_index, params=params)
            before.replace_input_with(upstream, node)
        _mark_key_capture(gm, stage, schedule)
    gm.graph.lint()
    gm.recompile()
    return gm


def _mark_key_capture(gm: fx.GraphModule, stage: str, schedule: Schedule) -> None:
    """Ask each vision block that feeds a transform to keep its attention keys (and, where the transform
    ranks tokens by attention, the attention each token receives).

    Raises:
        ScheduleError: a transform that needs a block's attention has no block right before it.
    """
    if stage != "vision":
        return
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get("kind") != "transform":
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


def verify(gm: fx.GraphModule, schedule: Schedule) -> None:
    """Prove the schedule's claims on this graph, for any input size.

    If ``eliminate_visual`` is set, some transform that ``eliminates`` every
    visual token must run before the final decoder layer; as no transform adds
    tokens, the final layer then sees none, whatever the image sizes.

    Raises:
        ScheduleError: the claim does not hold, naming where zero is reached.
    """
    if not schedule.eliminate_visual:
        return
    layers = block_nodes(gm, "llm")
    eliminated_at = None
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get("site") != "llm":
            continue
        module = gm.get_submodule(node.target)
        if node.meta["kind"] == "transform" and module.spec.eliminates(module.params):
            eliminated_at = node.meta["index"]
            break
    if eliminated_at is None or eliminated_at > len(layers) - 1:
        raise ScheduleError(
            f"claims to eliminate visual tokens, but they are not all gone before the last of the "
            f"{len(layers)} decoder layers",
            source=schedule.source, line=schedule.line_of("eliminate_visual"), key="eliminate_visual",
            hint=f"place a step with keep: 0.0 at a layer <= {len(layers) - 1}",
        )


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


def plan_counts(gm: fx.GraphModule, grids: list[tuple[int, int, int]], unit: int,
                text_tokens: int = 0, llm_entry: int | None = None) -> list[tuple[str, int]]:
    """Statically predicted visual tokens entering each node, for one sample's images.

    ``grids`` are the images' unit grids; the vision rows count all images'
    tokens, the LLM rows the visual tokens of the sample: one per unit left,
    or ``llm_entry`` where the adapter packs tiles into another count
    (LLaVA-OneVision's stitched tiles and newline tokens).
    """
    rows: list[tuple[str, int]] = []
    visual = None
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if node.meta["site"] == "vision":
            rows.append((node.target, sum(t * h * w for t, h, w in grids) * unit))
            if node.meta["kind"] == "transform":
                grids = [module.spec.plan(module.params, g) for g in grids]
            elif node.meta["kind"] == "io":
                visual = sum(t * h * w for t, h, w in grids) if llm_entry is None else llm_entry
        else:
            if visual is None:
                visual = sum(t * h * w for t, h, w in grids) if llm_entry is None else llm_entry
            rows.append((node.target, visual))
            if node.meta["kind"] == "transform":
                visual = module.spec.plan(module.params, visual)
    return rows
