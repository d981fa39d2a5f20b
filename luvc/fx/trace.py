"""Trace a VLM's stacks into a block-granular ``torch.fx`` graph.

The graph is linear: one placeholder (the token state), then every vision
block, the projector, every decoder layer and the final norm as leaf
``call_module`` nodes, each taking the previous node's state. Graph passes
(``luvc.fx.passes``) insert transform nodes between them.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from luvc.fx.nodes import StackNode
from luvc.schedules.plan import Plan


class StackGraphModule(fx.GraphModule):
    """A ``GraphModule`` over stack nodes; ``print`` shows code and a node table.

    ``luvc_plan`` is the ``Plan`` its transforms were inserted from (None before any were): the static
    visual-token counts of its nodes are ``luvc_plan.counts(grids, unit)``.
    """

    luvc_plan: Plan | None = None

    def __str__(self) -> str:
        return self.code.strip() + "\n\n" + self.nodes_table()

    def nodes_table(self) -> str:
        """One line per node: site, kind, target, and the transform's params or the block's class."""
        rows = []
        for node in self.graph.nodes:
            if node.op != "call_module":
                continue
            module = self.get_submodule(node.target)
            block = getattr(module, "block", module)
            detail = module.extra_repr() if module.kind == "transform" else type(block).__name__
            rows.append(f"  {node.meta.get('site', module.site):6s} {module.kind:9s} {node.target:40s} {detail}")
        return "# nodes\n" + "\n".join(rows)


class StackTracer(fx.Tracer):
    """Treats every ``StackNode`` as a leaf, so blocks stay opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, StackNode) or super().is_leaf_module(m, module_qualified_name)


class _Stack(nn.Module):
    def __init__(self, nodes: list[tuple[str, StackNode]]) -> None:
        super().__init__()
        self.order = [name for name, _ in nodes]
        for name, node in nodes:
            attach(self, name, node)

    def forward(self, state):
        for name in self.order:
            state = self.get_submodule(name)(state)
        return state


def attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register ``module`` at ``dotted`` under ``root``, creating containers on the way."""
    *parents, leaf = dotted.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(leaf, module)


def trace_stack(nodes: list[tuple[str, StackNode]]) -> StackGraphModule:
    """Symbolically trace a linear stack of named leaf nodes."""
    root = _Stack(nodes)
    graph = StackTracer().trace(root)
    for node in graph.nodes:
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            node.meta.update(site=module.site, kind=module.kind, index=module.index)
    return StackGraphModule(root, graph, class_name="LuvcStack")
