"""`luvc bench speed`: what a schedule buys on this hardware, as ratios to ``identity`` in the same run.

For each input (an image at each resolution, a video at each frame count) and
each schedule, one compiled model is measured: FLOPs of the vision encoder and
of the LLM prefill (``torch.utils.flop_counter``), their wall times (median of
repeats after warm-up, with min and max), time to first token (vision + LLM
prefill), decode tokens/s on the schedule's own KV cache, peak memory and KV
cache bytes. ``identity`` is always measured first on the same input, and
every ratio divides by it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import luvc
from luvc.bench.memory import kv_cache_bytes, peak_memory
from luvc.examples import build_model, sample_image, vlm_inputs
from luvc.hf import CACHE_KWARG
from luvc.measure import Timing, count_flops, time_call

RATIO_FIELDS = ("vision_flops", "llm_flops", "total_flops", "vision_s", "llm_prefill_s", "ttft_s",
                "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes", "llm_visual_tokens",
                "mean_llm_visual_tokens")


@dataclass(frozen=True)
class BenchInput:
    """One benchmark input: an image of ``size`` px square, or a video of ``frames`` frames."""

    size: int
    frames: int = 0
    batch: int = 1

    @property
    def label(self) -> str:
        kind = f"video {self.frames}f {self.size}px" if self.frames else f"image {self.size}px"
        return f"{kind} x{self.batch}" if self.batch > 1 else kind


@dataclass
class Measurement:
    """Every figure of one schedule on one input; ``ratios`` divide by identity's on the same input."""

    schedule: str
    input: str
    size: int
    frames: int
    batch: int
    llm_visual_tokens: int
    mean_llm_visual_tokens: float
    vision_flops: int
    llm_flops: int
    total_flops: int
    vision_s: float
    llm_prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    kv_cache_bytes: int
    spread: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


#: Forward keywords that are not pixels: what the LLM prefill is called with once vision is encoded.
TEXT_KWARGS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def make_inputs(model, spec: BenchInput) -> dict:
    """Processor-style inputs for ``spec`` from a bundled photograph, resized to the requested size."""
    photo = Image.fromarray(sample_image("astronaut")).resize((spec.size, spec.size))
    pixels = np.asarray(photo)
    prompt = list(range(10, 42))
    if spec.frames:
        video = np.stack([np.roll(pixels, 8 * i, axis=1) for i in range(spec.frames)])
        return vlm_inputs(videos=[[video]] * spec.batch, prompts=[prompt] * spec.batch,
                          pixels=spec.size * spec.size, config=model.config)
    return vlm_inputs([[pixels]] * spec.batch, prompts=[prompt] * spec.batch, pixels=spec.size * spec.size,
                      config=model.config)


def measure(model, inputs: dict, schedule: str, spec: BenchInput, repeats: int, warmup: int, new_tokens: int,
            device: str) -> Measurement:
    """Measure the compiled ``model`` on ``inputs`` (see the module docstring for what)."""
    text_kw = {k: v for k, v in inputs.items() if k in TEXT_KWARGS}
    pixel_kwargs = model.model._luvc_pixel_kwargs  # the compiled family's encoder arguments, per modality

    def encode() -> dict:
        return {kind: getattr(model.model, f"get_{kind}_features")(*(inputs.get(name) for name in names))
                for kind, names in pixel_kwargs.items() if inputs.get(names[0]) is not None}

    with torch.inference_mode():
        encoded = encode()

        def prefill(use_cache: bool = False):
            return model(**text_kw, mm_encoder_outputs=encoded, use_cache=use_cache, logits_to_keep=1)

        vision_flops = count_flops(encode)
        llm_flops = count_flops(prefill)
        vision_t = time_call(encode, repeats=repeats, warmup=warmup)
        llm_t = time_call(prefill, repeats=repeats, warmup=warmup)
        llm_rows = [row for row in luvc.ledger(model) if row.site == "llm"]
        first = prefill(use_cache=True)
        cache = getattr(first, CACHE_KWARG)
        kv_bytes = kv_cache_bytes(cache)
        decode_t = time_call(_decoder(model, text_kw, first, new_tokens), repeats=repeats, warmup=warmup)
        peak = peak_memory(lambda: model(**inputs, use_cache=False, logits_to_keep=1), device)
    per_layer = [sum(row.visual) / spec.batch for row in llm_rows if row.node.startswith("llm.layers.")]
    return Measurement(
        schedule=schedule, input=spec.label, size=spec.size, frames=spec.frames, batch=spec.batch,
        llm_visual_tokens=int(sum(llm_rows[0].visual) / spec.batch) if llm_rows else 0,
        mean_llm_visual_tokens=float(np.mean(per_layer)) if per_layer else 0.0,
        vision_flops=vision_flops, llm_flops=llm_flops, total_flops=vision_flops + llm_flops,
        vision_s=vision_t.median, llm_prefill_s=llm_t.median, ttft_s=vision_t.median + llm_t.median,
        decode_tokens_per_s=new_tokens / decode_t.median, peak_memory_bytes=peak, kv_cache_bytes=kv_bytes,
        spread={"vision_s": _spread(vision_t), "llm_prefill_s": _spread(llm_t),
                "decode_tokens_per_s": [new_tokens / decode_t.high, new_tokens / decode_t.low]},
    )


def _spread(t: Timing) -> list[float]:
    return [t.low, t.high]


def _decoder(model, text_kw: dict, first, steps: int) -> Callable[[], None]:
    """A call that decodes ``steps`` greedy tokens from a copy of the prefill's cache."""
    start = first.logits[:, -1].argmax(-1, keepdim=True)
    mask = text_kw.get("attention_mask")

    def run() -> None:
        cache = copy.deepcopy(getattr(first, CACHE_KWARG))
        token, m = start, mask
        for _ in range(steps):
            m = torch.cat([m, torch.ones_like(token)], dim=1) if m is not None else None
            out = model(input_ids=token, attention_mask=m, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)

    return run


def add_ratios(results: list[Measurement]) -> None:
    """Fill each measurement's ``ratios`` from identity's measurement of the same input."""
    reference = {m.input: m for m in results if m.schedule == "identity"}
    for m in results:
        ref = reference[m.input]
        m.ratios = {f: (getattr(m, f) / getattr(ref, f) if getattr(ref, f) else float("nan")) for f in RATIO_FIELDS}


def environment(device: str, dtype: torch.dtype, attn: str) -> dict:
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "dtype": str(dtype).removeprefix("torch."), "attn_implementation": attn, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    import transformers

    env["transformers"] = transformers.__version__
    env["luvc"] = luvc.__version__
    return env


def load_bench_model(name: str, layers: int | None, vision_layers: int | None, device: str, dtype: torch.dtype,
                     attn: str):
    """A built-in config with random weights, or a local checkpoint (its weights, depth as saved)."""
    if os.path.isdir(name):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn)
        return model.eval().to(device)
    meta = build_model(name, device="meta", layers=layers, vision_layers=vision_layers)
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=dtype).element_size()
    if device == "cpu" and need > 0.8 * _available_memory():
        raise MemoryError(
            f"{name} needs about {need / 2**30:.1f} GiB of weights in {dtype}, more than this machine has free "
            f"({_available_memory() / 2**30:.1f} GiB); shrink it with --layers and --vision-layers"
        )
    build_on = device if device.startswith("cuda") else "cpu"  # random init on the GPU: minutes faster for a 7B
    return build_model(name, attn=attn, dtype=dtype, device=build_on, layers=layers,
                       vision_layers=vision_layers).to(device)


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_speed(model, schedules: list[str], specs: list[BenchInput], repeats: int = 3, warmup: int = 1,
              new_tokens: int = 8, device: str = "cpu", progress=None) -> list[Measurement]:
    """Measure ``identity`` and every schedule on every input; ratios are filled in."""
    names = ["identity"] + [s for s in schedules if s != "identity"]
    for name in names:
        luvc.load_schedule(name)  # fail before measuring anything
    results: list[Measurement] = []
    task = progress.add_task("measuring", total=len(names) * len(specs)) if progress else None
    for spec in specs:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(model, spec).items()}
        if model.dtype != torch.float32:
            inputs = {k: v.to(model.dtype) if k.startswith("pixel") else v for k, v in inputs.items()}
        for name in names:
            if progress:
                progress.update(task, description=f"{spec.label}: {name}")
            luvc.compile(model, name)
            try:
                results.append(measure(model, inputs, name, spec, repeats, warmup, new_tokens, device))
            finally:
                luvc.uncompile(model)
            if progress:
                progress.advance(task)
    add_ratios(results)
    return results


def to_json(results: list[Measurement], env: dict, model: str, settings: dict) -> dict:
    """The report as JSON-ready data."""
    return {"benchmark": "speed", "model": model, "settings": settings, "environment": env,
            "results": [dataclasses.asdict(m) for m in results]}
