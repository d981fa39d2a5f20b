"""The adapter shape most families share, so a family module holds only what differs.

A standard transformers VLM (``*ForConditionalGeneration``) keeps an inner
model in ``model.model`` with a vision tower, a projector and a
``language_model`` whose ``layers`` and final ``norm`` become the LLM's stack
nodes. Compiling swaps the inner model's class for the family's compiled
forward and each vision attention module's class for its size-weighted copy.
"""

from __future__ import annotations

from torch import nn

from luvc.fx.nodes import StackNode
from luvc.runtime.compiled import install_compiled, uninstall_compiled
from luvc.runtime.llm import DecoderLayerNode, FinalNormNode, check_attention


class FamilyAdapter:
    """Base of the built-in adapters (``luvc.registry.adapter.ModelAdapter``).

    A family sets ``name``, ``model_class`` (what ``matches`` checks; its class
    name is the adapter's one architecture), ``compiled_mixin`` (the compiled inner forward) and, where merged
    tokens reach the tower's attention, ``sized_attention``; it names its
    ``vision_blocks`` and makes a ``block_node`` of each and its ``projector_node``.
    """

    name: str
    capabilities: frozenset[str] = frozenset()
    #: the schedule stages whose transforms this adapter runs (``luvc.compile`` refuses steps of others)
    stages: frozenset[str] = frozenset({"vision", "llm"})
    #: a fallback adapter is tried after every other one and claims no architecture exclusively
    fallback: bool = False
    model_class: type
    compiled_mixin: type
    #: the class each of ``vision_attention`` becomes while compiled (``object``: none is swapped)
    sized_attention: type = object
    #: the attribute of a vision block that holds its attention module
    attention_attr = "self_attn"
    #: named example sizes (``luvc.examples``): ``text`` and ``vision`` config keywords, plus family extras.
    #: The first is the family's tiny model, on which the family-parametrised tests run.
    examples: dict[str, dict] = {}

    @property
    def architectures(self) -> tuple[str, ...]:
        """The class names this adapter handles: its ``model_class``'s."""
        return (self.model_class.__name__,)

    @property
    def config_class(self) -> type:
        """The transformers config class of ``model_class`` (what ``example_config`` builds)."""
        return self.model_class.config_class

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def check(self, model: nn.Module) -> None:
        check_attention(self.language_model(model).config)
        check_attention(self.vision_tower(model).config)

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The vision blocks that run, in order (up to the feature layer the projector reads)."""
        raise NotImplementedError

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        """The stack node that runs vision block ``index`` on a token state."""
        raise NotImplementedError

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        """The named node that takes the tower's tokens into the LLM's width."""
        raise NotImplementedError

    def vision_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        """The vision blocks (``vision.blocks.<i>``) and the projector, in running order."""
        blocks = range(len(self.vision_blocks(model)))
        return [(f"vision.blocks.{i}", self.block_node(model, i)) for i in blocks] + [self.projector_node(model)]

    def llm_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        """Every decoder layer (``llm.layers.<i>``), then the final norm (``llm.norm``)."""
        lm = self.language_model(model)
        nodes: list[tuple[str, StackNode]] = [(f"llm.layers.{i}", DecoderLayerNode(layer, i, lm.rotary_emb))
                                              for i, layer in enumerate(lm.layers)]
        return nodes + [("llm.norm", FinalNormNode(lm.norm))]

    def stack_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        return self.vision_nodes(model) + self.llm_nodes(model)

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        """The vision attention modules that become ``sized_attention`` while compiled."""
        if self.sized_attention is object:
            return []
        return [getattr(block, self.attention_attr) for block in self.vision_blocks(model)]

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        return install_compiled(model, graph, self.compiled_mixin, self.vision_attention(model),
                                self.sized_attention)

    def uninstall(self, model: nn.Module, record: dict) -> None:
        uninstall_compiled(model, record)

    def example_class(self, spec: dict) -> type:
        """The model class an example (``spec``, its entry in ``examples``) is built as."""
        return self.model_class

    def shorten_tower(self, vision: dict, layers: int) -> None:
        """Change an example's ``vision`` config keywords, in place, so its tower runs ``layers`` blocks."""
        vision["num_hidden_layers"] = layers

    def example_config(self, text: dict, vision: dict, spec: dict):
        """The transformers config of an example: ``text`` and ``vision`` config keywords, ``spec`` its
        entry in ``examples``."""
        raise NotImplementedError(f"the {self.name} adapter has no example configs")

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """Processor-style inputs for ``luvc.examples.vlm_inputs``, as the family's processor makes them."""
        raise NotImplementedError(f"the {self.name} adapter makes no example inputs")

    def example_init(self, model: nn.Module) -> None:
        """Adjust a freshly initialised example where random weights would hide what is measured."""
