"""The compiled VLM's forward: vision section, placeholder rebuild, LLM section, decode.

Shared by every adapter whose model is "vision tower -> placeholder tokens ->
decoder-only LLM". An adapter's mixin subclasses ``CompiledVLM`` and supplies
what differs per family: how pixels are encoded (``get_image_features``),
which forward keywords carry pixels, and how position ids are made.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn

from luvc import hf
from luvc.errors import CompileError
from luvc.hf import BaseModelOutputWithPast, BaseModelOutputWithPooling, DynamicCache
from luvc.runtime.llm import CacheRecord, placeholder_keep, right_align, scatter_to_caller
from luvc.state import LLMState, VisionState, map_tensors


class CompressedVisionOutput(BaseModelOutputWithPooling):
    """A vision output whose ``luvc_*`` attributes survive a move to another device.

    accelerate's hooks move a module's inputs and outputs with the object's own ``to``, or else rebuild a
    mapping from its keys alone, which would drop the attributes that place compressed features (a
    dispatched model's ``generate`` passes encoder outputs through such a hook).
    """

    def to(self, device, non_blocking: bool = False) -> CompressedVisionOutput:
        moved = type(self)(**map_tensors(dict(self), lambda t: t.to(device, non_blocking=non_blocking)))
        moved.__dict__.update({name: value for name, value in vars(self).items() if name.startswith("luvc_")})
        return moved


def vision_output(state: VisionState, source_counts: list[int], features: list[Tensor] | None = None,
                  **extra) -> CompressedVisionOutput:
    """A Hugging Face vision output for compressed features, carrying what the LLM side needs.

    ``features`` are the tokens each item puts in the LLM's sequence (by
    default the state's, split by grid); ``luvc_source_counts`` are the
    placeholders each item has in the caller's input, ``luvc_counts`` the
    tokens each item now has; ``extra`` attributes (``luvc_*``, one entry per
    item) travel along, e.g. merged grids. ``luvc_sizes`` says how many of
    the item's uncompressed LLM tokens each token stands for (merging
    conserves sizes, so an item's sizes sum to its placeholder count); it is
    left out where the features are not the state's tokens one for one, and so
    is ``luvc_llm_grids``, each item's ``(t, h, w)`` grid of LLM tokens in
    row-major order (``None`` for an image a transform laid out as one row).
    """
    split = [t * h * w * state.unit for t, h, w in state.grids]
    if features is None:
        features = torch.split(state.hidden, split)
    counts = [len(f) for f in features]
    out = CompressedVisionOutput(last_hidden_state=state.hidden, pooler_output=features)
    out.luvc_source_counts = list(source_counts)
    out.luvc_counts = counts
    if sum(split) == len(state.sizes) and split == counts:
        out.luvc_sizes = [s * n / s.sum() for s, n in zip(torch.split(state.sizes, split), source_counts)]
        if state.unit == 1:
            out.luvc_llm_grids = [None if i in state.rows else grid for i, grid in enumerate(state.grids)]
    out.luvc_ledger = state.log
    for name, value in extra.items():
        setattr(out, name, value)
    return out


def llm_grid(ids: Tensor, encoded: dict[int, BaseModelOutputWithPooling]) -> Tensor:
    """[B, S, 6] each visual token's ``(item, frame, row, col, height, width)`` in its item's LLM grid.

    ``encoded`` maps a placeholder token id to its encoder output. Items are
    numbered across the batch (each image, video or tile its own number);
    every entry is -1 for text and for items whose output gives no grid.
    """
    grid = torch.full((*ids.shape, 6), -1, dtype=torch.long, device=ids.device)
    item = 0
    for token_id, out in encoded.items():
        rows = []
        for count, shape in zip((len(f) for f in out.pooler_output),
                                getattr(out, "luvc_llm_grids", None) or [None] * len(out.pooler_output)):
            if shape is None or shape[0] * shape[1] * shape[2] != count:
                rows.append(torch.full((count, 6), -1, dtype=torch.long))
            else:
                t, h, w = shape
                cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"),
                                    -1).reshape(-1, 3)
                size = torch.tensor([[h, w]]).expand(count, 2)
                rows.append(torch.cat([torch.full((count, 1), item), cells, size], 1))
            item += 1
        if rows:
            mask = ids == token_id
            grid = grid.masked_scatter(mask[..., None], torch.cat(rows).to(ids.device))
    return grid


class CompiledVLM:
    """Mixin for a VLM's inner model whose vision tower and LLM run through the luvc graph.

    Returns hidden states at the caller's positions, so ``generate`` and the
    logits keep the input's shape; positions whose token did not survive to
    the end (visual tokens) hold zeros.
    """

    #: modality -> config attribute holding its placeholder token id
    _luvc_placeholders: dict[str, str] = {"image": "image_token_id"}
    #: forward keywords that carry pixels (or their grids) for each modality
    _luvc_pixel_kwargs: dict[str, tuple[str, ...]] = {"image": ("pixel_values",)}
    #: what the family's inner forward returns (its outer forward reads its fields)
    _luvc_output_class: type = hf.MultimodalOutput
    #: other forward keywords the family's compiled forward reads (e.g. Gemma 3's ``token_type_ids``)
    _luvc_read_kwargs: tuple[str, ...] = ()
    #: keywords callers pass that carry nothing a compiled forward needs: it derives them from the input ids
    #: (token types, cache positions) or its outer model applies them (``return_dict``, ``logits_to_keep``)
    _luvc_ignored_kwargs: tuple[str, ...] = ("return_dict", "logits_to_keep", "cache_position", "mm_token_type_ids",
                                             "token_type_ids")
    #: keywords the compiled tower was built from the config's value of; another value per call is refused
    _luvc_config_kwargs: tuple[str, ...] = ()

    def _luvc_positions(self, ids: Tensor, valid: Tensor, encoded: dict, position_ids: Tensor | None,
                        rebuilt: bool, kwargs: dict) -> Tensor:
        """[P, B, S] position ids of the (possibly rebuilt) prefill sequence."""
        raise NotImplementedError

    def _luvc_image_blocks(self, kwargs: dict) -> bool:
        """Whether this call's image tokens attend to each other both ways in the LLM."""
        return False

    def _luvc_decode_positions(self, positions: Tensor) -> Tensor:
        """[P, B, q] position ids for decoding, from [B, q] sequence positions."""
        return positions[None]

    def _luvc_encode_all(self, kwargs: dict, encoded: dict) -> dict:
        for kind, names in self._luvc_pixel_kwargs.items():
            if encoded.get(kind) is None and kwargs.get(names[0]) is not None:
                encoder = getattr(self, f"get_{kind}_features")
                encoded[kind] = encoder(*(kwargs.get(name) for name in names))
        return encoded

    def _luvc_output(self, hidden: Tensor, cache, encoded: dict | None = None):
        """The family's inner output; the cache under whichever name this transformers uses."""
        fields = {f.name for f in dataclasses.fields(self._luvc_output_class)}
        out = {"last_hidden_state": hidden, "cache" if "cache" in fields else "past_key_values": cache}
        out.update({f"{kind}_outputs": (encoded or {}).get(kind) for kind in ("image", "video")
                    if f"{kind}_outputs" in fields})
        return self._luvc_output_class(**out)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, mm_encoder_outputs=None, cache=None,
                **kwargs) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # renamed in transformers 5.24
        wanted = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if wanted:
            raise CompileError(
                f"{', '.join(wanted)} is not available from a luvc-compiled model: each layer sees its own tokens\n"
                "  read visual-token counts with luvc.ledger(model), or luvc.uncompile(model) first"
            )
        self._luvc_check_kwargs(kwargs)
        record = getattr(past_key_values, "luvc_record", None)
        if record is not None:
            return self._luvc_decode(input_ids, inputs_embeds, attention_mask, past_key_values, record)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise CompileError("this KV cache was filled outside luvc; start generation from an empty cache")
        encoded = self._luvc_encode_all(kwargs, dict(mm_encoder_outputs or {}))
        encoded = {kind: out for kind, out in encoded.items() if out is not None}
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        state, length = self._luvc_prefill(input_ids, inputs_embeds, attention_mask, position_ids, encoded,
                                           past_key_values, kwargs)
        state = self._luvc_sections[1](state)
        ledger = [row for out in encoded.values() for row in getattr(out, "luvc_ledger", [])] + state.log
        self.__dict__["luvc_ledger"] = ledger
        return self._luvc_output(scatter_to_caller(state, length), past_key_values, encoded)

    def _luvc_check_kwargs(self, kwargs: dict) -> None:
        """Refuse a forward keyword the compiled forward would otherwise drop without a word."""
        read = {name for names in self._luvc_pixel_kwargs.values() for name in names}
        read.update(self._luvc_read_kwargs, self._luvc_ignored_kwargs, getattr(self, "_luvc_rope_kwargs", ()))
        read.update(self._luvc_config_kwargs)
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in read)
        if unknown:
            raise CompileError(
                f"{type(self).__name__}.forward got {', '.join(map(repr, unknown))}, which a luvc-compiled model does "
                "not use\n  leave them out, or luvc.uncompile(model) to run the model as transformers does"
            )
        config = self.config
        for name in self._luvc_config_kwargs:
            value = kwargs.get(name)
            if value is not None and value != getattr(config, name, value):
                raise CompileError(
                    f"{name}={value!r} differs from the config's {getattr(config, name)!r}, which the compiled vision "
                    f"tower was built with\n  set model.config.{name} before luvc.compile, or leave the keyword out"
                )

    def _luvc_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, encoded, cache, kwargs):
        token_ids = {kind: getattr(self.config, attr) for kind, attr in self._luvc_placeholders.items()}
        if input_ids is None:
            if encoded:
                raise CompileError("a luvc-compiled VLM needs input_ids to place image and video features")
            batch, length = inputs_embeds.shape[:2]
            ids = torch.zeros(batch, length, dtype=torch.long, device=inputs_embeds.device)
        else:
            ids = input_ids
            batch, length = ids.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        keep = torch.ones_like(ids, dtype=torch.bool)
        for kind, out in encoded.items():
            counts = [len(f) for f in out.pooler_output]
            before = getattr(out, "luvc_source_counts", counts)
            keep &= placeholder_keep(ids == token_ids[kind], before, counts)
        source_index = torch.arange(length, device=ids.device).expand(batch, -1)
        rebuilt = not bool(keep.all())
        if rebuilt:
            order = right_align(keep & valid)
            valid = torch.gather(keep & valid, 1, order)
            ids = torch.gather(ids, 1, order).masked_fill(~valid, self.config.text_config.pad_token_id or 0)
            source_index = torch.where(valid, torch.gather(source_index, 1, order), -1)
            embeds = self.get_input_embeddings()(ids)
        else:
            embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(ids)
        visual = torch.zeros_like(valid)
        sizes = torch.ones(ids.shape, device=embeds.device) if self.__dict__.get("_luvc_llm_sizes") else None
        for kind, out in encoded.items():
            features = torch.cat(list(out.pooler_output), dim=0).to(embeds.device, embeds.dtype)
            mask = ids == token_ids[kind]
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features)
            visual |= mask
            if sizes is not None:
                if getattr(out, "luvc_sizes", None) is None:
                    raise CompileError(f"proportional_llm_attention: this model's {kind} features are not its "
                                       "vision tokens one for one, so their sizes are unknown; set it to false")
                sizes = sizes.masked_scatter(mask.to(sizes.device), torch.cat(list(out.luvc_sizes)).to(sizes.device))
        grid = llm_grid(ids, {token_ids[kind]: out for kind, out in encoded.items()}) \
            if self.__dict__.get("_luvc_llm_grid") else None
        positions = self._luvc_positions(ids, valid, encoded, position_ids, rebuilt, kwargs)
        if cache is not None:
            last = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))
            cache.luvc_record = CacheRecord(next_position=last + 1)
        state = LLMState(embeds, valid, visual & valid, positions, torch.where(valid, source_index, -1),
                         cache=cache, image_blocks=self._luvc_image_blocks(kwargs), log=[], sizes=sizes, grid=grid)
        return state, length

    def _luvc_decode(self, input_ids, inputs_embeds, attention_mask, cache, record: CacheRecord):
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        batch, q = embeds.shape[:2]
        valid = attention_mask[:, -q:].bool() if attention_mask is not None else torch.ones(
            batch, q, dtype=torch.bool, device=embeds.device)
        positions = record.next_position[:, None].to(embeds.device) + torch.arange(q, device=embeds.device)
        record.next_position = record.next_position + q
        sizes = torch.ones(valid.shape, device=embeds.device) if record.key_sizes else None
        state = LLMState(embeds, valid, torch.zeros_like(valid), self._luvc_decode_positions(positions),
                         torch.arange(q, device=embeds.device).expand(batch, -1), cache=cache, decoding=True,
                         sizes=sizes)
        state = self._luvc_sections[1](state)
        return self._luvc_output(scatter_to_caller(state, q), cache)


class SequentialPositions:
    """Mixin for a ``CompiledVLM`` whose LLM takes 1-D rotary positions: the caller's, or the tokens numbered
    in order; a rebuilt (shortened) sequence is numbered afresh, kept tokens in order."""

    def _luvc_positions(self, ids, valid, encoded, position_ids, rebuilt, kwargs):
        if rebuilt:
            return (valid.long().cumsum(-1) - 1).clamp(min=0)[None]
        if position_ids is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)[None]
        return position_ids[None] if position_ids.dim() == 2 else position_ids


class ExpandingGeneration(hf.MultimodalExpansionHook):
    """Mixin for the outer model: repeats compressed vision outputs per sample for beams and
    ``num_return_sequences``.

    ``generate`` groups the encoder outputs by sample by matching placeholder
    counts, which merging changes; here the groups come from the source counts
    luvc keeps, and every per-item ``luvc_*`` attribute is repeated with them.
    """

    def luvc_expand_outputs(self, input_ids, mm_encoder_output: dict, expand_size: int) -> dict:
        for kind, out in mm_encoder_output.items():
            if out is None or getattr(out, "luvc_source_counts", None) is None:
                continue
            token_id = getattr(self.config, f"{kind}_token_id", None)
            if token_id is None:
                token_id = self.config.image_token_index
            per_row = (input_ids == token_id).sum(-1).tolist()
            sizes = out.luvc_source_counts
            groups, start = [], 0
            for need in per_row:
                end = start
                while need > 0:
                    need -= sizes[end]
                    end += 1
                groups.append(list(range(start, end)))
                start = end
            order = [i for group in groups for _ in range(expand_size) for i in group]
            out.pooler_output = [out.pooler_output[i] for i in order]
            for name in [n for n in vars(out) if n.startswith("luvc_") and n != "luvc_ledger"]:
                value = getattr(out, name)
                setattr(out, name, value[order] if isinstance(value, Tensor) else [value[i] for i in order])
        return mm_encoder_output


@functools.cache
def swapped(cls: type, mixin: type, prefix: str = "Luvc") -> type:
    """``cls`` with ``mixin`` in front: the class a module is swapped to (``isinstance`` still holds)."""
    return type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def install_compiled(model: nn.Module, graph: nn.Module, inner_mixin: type, attention: list[nn.Module],
                     attention_mixin: type) -> dict:
    """Swap ``model`` (outer), ``model.model`` (inner) and the ``attention`` modules to their luvc
    subclasses and hand the inner model the graph's sections; return what ``uninstall_compiled`` needs.

    The outer class keeps its name, so ``save_pretrained`` records the original architecture.
    """
    from luvc.fx.nodes import TransformNode
    from luvc.fx.passes import section

    inner = model.model
    swaps = [(module, swapped(type(module), attention_mixin)) for module in attention]
    swaps += [(inner, swapped(type(inner), inner_mixin)), (model, swapped(type(model), ExpandingGeneration, prefix=""))]
    record = {"classes": [(module, type(module)) for module, _ in swaps], "hooked": []}
    for module, cls in swaps:
        before = swap_class(module, cls)
        if before is not None:
            record["hooked"].append((module, before))
    inner.__dict__["_luvc_sections"] = (section(graph, "vision"), section(graph, "llm"))
    inner.__dict__["_luvc_llm_sizes"] = getattr(graph, "luvc_llm_sizes", False)
    inner.__dict__["_luvc_llm_grid"] = any(  # built only for a schedule that reads it: it costs every prefill
        "llm_grid" in node.spec.requires(node.params) for node in graph.modules() if isinstance(node, TransformNode))
    return record


def swap_class(module: nn.Module, cls: type):
    """Make ``module`` a ``cls``, and an accelerate hook on it (a dispatched model's) call ``cls.forward``;
    return the forward that hook called before, None if it has none."""
    was = type(module)
    module.__class__ = cls
    return hf.follow_class(module, was)


def uninstall_compiled(model: nn.Module, record: dict) -> None:
    """Undo ``install_compiled`` exactly: classes, and the forward each accelerate hook calls (a hook
    attached after compile is kept, calling the original class's forward)."""
    for module, cls in record["classes"]:
        swap_class(module, cls)
    for module, forward in record["hooked"]:
        hf.restore_forward(module, forward)
    model.model.__dict__.pop("_luvc_sections", None)
    model.model.__dict__.pop("_luvc_llm_sizes", None)
    model.model.__dict__.pop("_luvc_llm_grid", None)
    model.model.__dict__.pop("luvc_ledger", None)
