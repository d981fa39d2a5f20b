"""Compiled models dispatched by accelerate: one device with hooks, half the decoder layers offloaded to disk, the
model split in two parts; dispatched before or after ``luvc.compile``. Each must give the logits, ledger and greedy
generation of the same compiled model without hooks, and ``uncompile`` must leave the hooks as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, schedule_for

import luvc
from luvc.examples import build_model
from luvc.models import find_adapter

accelerate = pytest.importorskip("accelerate")

SCHEDULE = "luvc-default"  # its LLM steps alone on a generic-path family (schedule_for)


def device_map(model: torch.nn.Module, first, second) -> dict[str, object]:
    """Every part of the model on ``first``, except the second half of the decoder layers, on ``second``:
    the vision tower and the first half of the LLM form one part, the rest another."""
    layers = find_adapter(model).language_model(model).layers
    parts: dict[str, object] = {}

    def place(module: torch.nn.Module, prefix: str) -> None:
        parts.update({f"{prefix}{name}": first for name, _ in module.named_parameters(recurse=False)})
        for name, child in module.named_children():
            if child is layers:
                parts.update({f"{prefix}{name}.{i}": first if i < len(layers) // 2 else second
                              for i in range(len(layers))})
            elif any(m is layers for m in child.modules()):
                place(child, f"{prefix}{name}.")
            else:
                parts[f"{prefix}{name}"] = first

    place(model, "")
    return parts


MAPS = {
    "one-device": lambda model: {"": "cpu"},
    "disk-offload": lambda model: device_map(model, "cpu", "disk"),
    "two-parts": lambda model: device_map(model, "cpu", "cpu"),
    "all-disk": lambda model: dict.fromkeys(device_map(model, "cpu", "cpu"), "disk"),
}


def dispatch(model: torch.nn.Module, layout: str, offload_dir) -> torch.nn.Module:
    return accelerate.dispatch_model(model, device_map=MAPS[layout](model), force_hooks=True,
                                     main_device="cpu", offload_dir=str(offload_dir))


def prepared(family: str, layout: str, order: str, offload_dir) -> torch.nn.Module:
    """A compiled tiny model dispatched with ``layout``, before (``dispatch-first``) or after compile."""
    model = build_model(family)
    if order == "dispatch-first":
        return luvc.compile(dispatch(model, layout, offload_dir), schedule_for(family, SCHEDULE))
    return dispatch(luvc.compile(model, schedule_for(family, SCHEDULE)), layout, offload_dir)


#: Layouts under which transformers' own uncompiled model fails, so there is nothing to match.
UNCOMPILED_FAILS = {
    ("aya-vision-tiny", "all-disk"): "transformers' AyaVision fails uncompiled with every part on disk "
                                     "(a tensor left on the meta device)",
}


def hooks_of(model: torch.nn.Module) -> dict[str, tuple]:
    """Per hooked module: its hook and the function and instance its hook calls."""
    return {name: (m._hf_hook, m._old_forward.__func__, m._old_forward.__self__)
            for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", list(MAPS))
@pytest.mark.parametrize("order", ["dispatch-first", "compile-first"])
def test_dispatched_compiled_model_matches_it_without_hooks(family, layout, order, single_image_inputs, tmp_path):
    if (family, layout) in UNCOMPILED_FAILS:
        pytest.skip(UNCOMPILED_FAILS[family, layout])
    reference = luvc.compile(build_model(family), schedule_for(family, SCHEDULE))
    model = prepared(family, layout, order, tmp_path)
    assert hooks_of(model), "accelerate attached no hook: the test would prove nothing"
    expected = reference(**single_image_inputs).logits[:, -1]
    torch.testing.assert_close(model(**single_image_inputs).logits[:, -1], expected, rtol=1e-6, atol=1e-6)
    assert luvc.ledger(model) == luvc.ledger(reference)
    generate = {"max_new_tokens": 3, "do_sample": False}
    torch.testing.assert_close(model.generate(**single_image_inputs, **generate),
                               reference.generate(**single_image_inputs, **generate))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["one-device", "disk-offload", "two-parts"])  # uncompiled, some fail all on disk
def test_uncompile_gives_the_dispatched_model_back_its_hooks(family, layout, single_image_inputs, tmp_path):
    model = dispatch(build_model(family), layout, tmp_path)
    before, expected = hooks_of(model), model(**single_image_inputs).logits
    luvc.uncompile(luvc.compile(model, schedule_for(family, SCHEDULE)))
    assert hooks_of(model) == before
    torch.testing.assert_close(model(**single_image_inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_dispatched_while_compiled_runs_uncompressed_after_uncompile(family, single_image_inputs, tmp_path):
    expected = build_model(family)(**single_image_inputs).logits
    model = luvc.uncompile(prepared(family, "two-parts", "compile-first", tmp_path))
    hooked = {name: module for name, module in model.named_modules() if hasattr(module, "_hf_hook")}
    assert all(hooks_of(model)[name][1] is type(module).forward for name, module in hooked.items())
    torch.testing.assert_close(model(**single_image_inputs).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["dispatch-first", "compile-first"])
def test_cuda_with_cpu_offload_matches_the_model_on_one_gpu(family, order, single_image_inputs, tmp_path):
    reference = luvc.compile(build_model(family).to("cuda"), schedule_for(family, SCHEDULE))
    model = build_model(family)
    layout = device_map(model, 0, "cpu")  # the second half of the LLM offloaded to CPU, run on GPU 0
    if order == "dispatch-first":
        model = luvc.compile(accelerate.dispatch_model(model, device_map=layout, main_device=0),
                             schedule_for(family, SCHEDULE))
    else:
        model = accelerate.dispatch_model(luvc.compile(model, schedule_for(family, SCHEDULE)), device_map=layout,
                                          main_device=0)
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in single_image_inputs.items()}
    torch.testing.assert_close(model(**inputs).logits[:, -1], reference(**inputs).logits[:, -1],
                               rtol=1e-4, atol=1e-4)
    assert luvc.ledger(model) == luvc.ledger(reference)
    generate = {"max_new_tokens": 3, "do_sample": False}
    torch.testing.assert_close(model.generate(**inputs, **generate), reference.generate(**inputs, **generate))
