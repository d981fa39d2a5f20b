"""The generic adapter: LLM-side compression for any VLM in transformers' standard layout, no family module.

A standard ``*ForConditionalGeneration`` keeps an inner model (``model.model``)
with a vision tower, a projector reached through ``get_image_features``, a
``language_model`` with ``layers``, ``norm`` and ``rotary_emb``, and an image
placeholder id in its config. Such a model's vision side runs exactly as
transformers runs it: the model's own ``get_image_features``, unchanged, is one
opaque vision node (``vision.features``, the vision stack's exit with no
blocks before it). Its features fill the placeholders, and the decoder layers
run as the compiled LLM stack with 1-D positions, so SPU and every LLM-side
baseline work on it. Vision-side transforms need to see inside the tower,
which only a family adapter does, so this adapter supports the ``llm`` stage
alone and ``luvc.compile`` refuses vision steps on it.

It is registered last and marked ``fallback``: any family adapter that
matches a model wins over it.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.models import generic_examples
from luvc.models.base import FamilyAdapter
from luvc.registry import hookimpl
from luvc.runtime.compiled import CompiledVLM, SequentialPositions, install_compiled
from luvc.runtime.llm import check_attention
from luvc.state import LedgerRow


class ImageFeaturesNode(StackNode):
    """The model's own ``get_image_features`` as one opaque vision node: called with the bound call, it runs
    it and records the features each image (or, where the family groups them so, each sample) hands the LLM."""

    site = "vision"
    kind = "io"

    def forward(self, encode):
        out = encode()
        counts = [len(f) for f in out.pooler_output]
        out.luvc_source_counts = counts  # nothing is merged: generate's expansion groups items by these
        out.luvc_ledger = [LedgerRow("vision.features", "vision", counts)]
        return out


class CompiledGenericVLM(SequentialPositions, CompiledVLM):
    """Compiled inner model of a standard-layout VLM: the model's own image features, the LLM through the graph.

    ``generic_mixin`` subclasses it per inner class with the family's pixel keywords, output class and
    ``get_image_features``.
    """


def feature_keywords(inner_class: type, config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The keywords of the inner model's ``get_image_features``: those carrying pixels (and their sizes or
    masks), in order, and those whose default is a config value (``vision_feature_layer``...)."""
    parameters = list(inspect.signature(inner_class.get_image_features).parameters.values())[1:]
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    from_config = tuple(name for name in named if hasattr(config, name))
    return tuple(name for name in named if name not in from_config), from_config


@functools.cache
def generic_mixin(inner_class: type, pixels: tuple[str, ...], from_config: tuple[str, ...],
                  placeholder: str) -> type:
    """``CompiledGenericVLM`` for one inner class: the forward keywords its image features take, the output
    class its own forward returns (its outer forward reads that class's fields), and its ``get_image_features``
    run as the graph's vision node."""
    own = inner_class.get_image_features

    @functools.wraps(own)  # keeps its signature: generate passes it the keywords the signature names
    def get_image_features(self, *args, **kwargs):
        return self._luvc_sections[0](functools.partial(own, self, *args, **kwargs))

    return type(f"CompiledGeneric{inner_class.__name__}", (CompiledGenericVLM,), {
        "get_image_features": get_image_features,
        "_luvc_placeholders": {"image": placeholder},
        "_luvc_pixel_kwargs": {"image": pixels},
        "_luvc_config_kwargs": from_config,
        "_luvc_output_class": hf.inner_output_class(inner_class),
        "__module__": __name__,
    })


def placeholder_attribute(config) -> str | None:
    """The config attribute holding the image placeholder id, or None."""
    for name in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, name, None), int):
            return name
    return None


class GenericAdapter(FamilyAdapter):
    """Adapter for any VLM in transformers' standard layout that no family adapter claims: LLM stage only.

    ``architectures`` are the ones the test suite runs on (``examples``); ``matches`` checks the layout.
    """

    name = "generic"
    architectures = ("LlavaNextForConditionalGeneration", "Mistral3ForConditionalGeneration",
                     "AyaVisionForConditionalGeneration")
    stages = frozenset({"llm"})
    fallback = True
    title = "any standard-layout VLM"
    model_class = nn.Module
    #: the base of each family's compiled inner forward (``generic_mixin`` makes the family's own)
    compiled_mixin = CompiledGenericVLM
    examples = generic_examples.EXAMPLES
    #: the model types whose example inputs this adapter makes (``luvc.examples.vlm_inputs``)
    example_model_types = tuple(generic_examples.FAMILIES)
    #: every example the family-parametrised tests run on (one per family, not only the first)
    test_examples = tuple(generic_examples.TINY)

    def matches(self, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        return (callable(getattr(inner, "get_image_features", None))
                and any(isinstance(getattr(inner, name, None), nn.Module) for name in ("vision_tower", "vision_model"))
                and all(isinstance(getattr(lm, part, None), nn.Module) for part in ("layers", "norm", "rotary_emb"))
                and placeholder_attribute(getattr(model, "config", None)) is not None)

    def vision_tower(self, model: nn.Module) -> nn.Module:
        inner = model.model
        return inner.vision_tower if hasattr(inner, "vision_tower") else inner.vision_model

    def check(self, model: nn.Module) -> None:
        """Refuse what the compiled LLM stack would run differently from the model: masks luvc cannot
        build, sliding-window layers, and multi-axis rotary positions."""
        text = model.config.get_text_config()
        check_attention(text)
        kind = type(model).__name__
        if hasattr(model.model, "get_rope_index"):
            raise CompileError(f"{kind}'s LLM takes multi-axis rotary positions (get_rope_index), which the generic "
                               "path does not build\n  this family needs an adapter (docs/tutorials/adapters.md)")
        windowed = "sliding_attention" in (getattr(text, "layer_types", None) or ()) or (
            getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True))
        if windowed:
            raise CompileError(f"{kind}'s LLM has sliding-window layers, which the generic path runs as full "
                               "attention\n  this family needs an adapter (docs/tutorials/adapters.md); Gemma 3's "
                               "shows how windows are kept by position")

    def vision_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        return [("vision.features", ImageFeaturesNode())]

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        inner_class = type(model.model)
        pixels, from_config = feature_keywords(inner_class, model.config)
        mixin = generic_mixin(inner_class, pixels, from_config, placeholder_attribute(model.config))
        return install_compiled(model, graph, mixin, [], object)

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1):
        """The features an image of this size gives, as one row ``(1, 1, n)``, for the families the
        examples know; others are refused (the generic path does not know a processor's sizing)."""
        family = generic_examples.FAMILIES.get(model.config.model_type)
        if family is None:
            raise CompileError(f"the generic adapter does not know how {type(model).__name__}'s processor sizes "
                               "images; count the placeholders of its processor's input_ids instead")
        return (1, 1, family.features(model.config, height, width)), 1

    def example_class(self, spec: dict) -> type:
        return generic_examples.FAMILIES[spec["family"]].model_class

    def example_config(self, text: dict, vision: dict, spec: dict):
        return generic_examples.FAMILIES[spec["family"]].config(text, vision)

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video in luvc's examples")
        return generic_examples.FAMILIES[config.model_type].inputs(config, images, prompts)


@hookimpl
def luvc_model_adapters() -> list:
    return [GenericAdapter()]
