"""lmms-eval models that run a Hugging Face VLM compiled with a luvc schedule.

``pip install "luvc[eval]"`` registers them with lmms-eval through its
``lmms_eval.models`` entry-point group (``manifests`` below), so
``python -m lmms_eval --model luvc_qwen2_vl --model_args pretrained=...,schedule=luvc-default``
works like lmms-eval's own ``qwen2_vl`` with the model compressed. Each wrapper
subclasses lmms-eval's model for the family, so loading, prompting, batching
and decoding are lmms-eval's; luvc only compiles the loaded model and
measures what the schedule did.

A run records its schedule in ``results["config"]["model_args"]`` (``schedule`` is
required for that reason) and the measured mean visual tokens per LLM decoder
layer, from ``luvc.ledger`` after every prefill, in ``results["throughput"]`` as
``avg_luvc_visual_tokens_per_layer`` (with ``avg_luvc_prefills``, the prefills
measured). Numbers are rank 0's when lmms-eval runs data-parallel.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

import luvc
from luvc.schedules import Schedule, load_schedule

# What only a prefill carries: the pixels, or (transformers >= 5.25, whose generate encodes images first)
# the vision encoder's outputs.
PREFILL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


class VisualTokenMeter:
    """Mean visual tokens per LLM decoder layer over every sample a compiled model prefilled.

    A forward hook on the model reads ``luvc.ledger`` after each call that
    carried images (a prefill; decoding steps carry none), so every batch
    lmms-eval generates is counted, whatever its size.
    """

    def __init__(self, model) -> None:
        self.per_sample: list[float] = []
        self.prefills = 0
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)
        self._model = model

    def _record(self, module, args, kwargs, output) -> None:
        if all(kwargs.get(key) is None for key in PREFILL_INPUTS):
            return
        layers = [row.visual for row in luvc.ledger(self._model)
                  if row.site == "llm" and row.node.startswith("llm.layers.")]
        if layers:
            self.per_sample += np.mean(np.asarray(layers, dtype=float), axis=0).tolist()
            self.prefills += 1

    def mean(self) -> float | None:
        """The mean over samples of each sample's mean over layers; None before any prefill."""
        return float(np.mean(self.per_sample)) if self.per_sample else None

    def close(self) -> None:
        self._handle.remove()


class LuvcCompiled:
    """Mixin for an lmms-eval model class: compile the model it loaded, meter every generation.

    ``schedule`` is a preset name (``luvc-default``, ``identity``) or a YAML path,
    as ``luvc.compile`` takes; the other arguments are the base model's.
    """

    def __init__(self, schedule: str | None = None, **kwargs: Any) -> None:
        if not schedule:
            raise ValueError(f"{type(self).__name__} needs schedule=<preset or YAML path> in --model_args "
                             "(e.g. schedule=luvc-default, or schedule=identity for the uncompressed model)")
        self.luvc_schedule: Schedule = load_schedule(schedule)
        super().__init__(**kwargs)
        luvc.compile(self.model, self.luvc_schedule)
        self.luvc_meter = VisualTokenMeter(self.model)

    def generate_until(self, requests) -> list[str]:
        """The base model's answers; then the time, generated tokens and visual tokens per layer, logged
        into the run's ``results["throughput"]``."""
        started = time.perf_counter()
        answers = super().generate_until(requests)
        elapsed = time.perf_counter() - started
        generated = sum(len(self.tokenizer.encode(a, add_special_tokens=False)) for a in answers)
        metrics = {"luvc_visual_tokens_per_layer": self.luvc_meter.mean(), "luvc_prefills": self.luvc_meter.prefills,
                   "total_requests": len(requests)}
        log_metrics(elapsed, generated, generated / elapsed if elapsed > 0 else 0.0,
                    {k: v for k, v in metrics.items() if v is not None})
        return answers

    def luvc_report(self) -> dict:
        """The schedule and the measured visual tokens, for a caller of lmms-eval's Python API."""
        return {"schedule": self.luvc_schedule.name, "visual_tokens_per_layer": self.luvc_meter.mean(),
                "prefills": self.luvc_meter.prefills}


class LuvcQwen2VL(LuvcCompiled, Qwen2_VL):
    """lmms-eval's ``qwen2_vl`` compiled with a luvc schedule (``--model luvc_qwen2_vl``)."""


class LuvcQwen2_5VL(LuvcCompiled, Qwen2_5_VL):
    """lmms-eval's ``qwen2_5_vl`` compiled with a luvc schedule (``--model luvc_qwen2_5_vl``)."""


MODELS = {"luvc_qwen2_vl": LuvcQwen2VL, "luvc_qwen2_5_vl": LuvcQwen2_5VL}


def manifests() -> list[ModelManifest]:
    """The entry point lmms-eval loads (group ``lmms_eval.models``): one manifest per wrapper."""
    return [ModelManifest(model_id=name, simple_class_path=f"{cls.__module__}.{cls.__qualname__}")
            for name, cls in MODELS.items()]
