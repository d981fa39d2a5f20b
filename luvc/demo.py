"""The demo: compile a Qwen2-VL with a schedule and show what it saves.

Builds the model from a built-in config (random weights, nothing
downloaded), runs a real bundled photograph through it uncompiled and
compiled, and reports visual tokens per layer, FLOPs and wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

import luvc
from luvc.examples import build_model, sample_image, vlm_inputs
from luvc.measure import Timing, count_flops, time_call
from luvc.models.example_inputs import example_tokenizer

#: One user turn: ``<bos>``, each image wrapped in vision start/end, then the text (the processor expands
#: ``<|image_pad|>`` to one placeholder per LLM token). Roles are dropped: the demo's model is untrained.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|> ' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
)


@dataclass
class Cost:
    """FLOPs of one prefill, split between vision encoder and LLM, and wall times."""

    vision_flops: int
    total_flops: int
    prefill: Timing
    generate: Timing
    tokens: list[int] = field(default_factory=list)

    @property
    def llm_flops(self) -> int:
        return self.total_flops - self.vision_flops


@dataclass
class DemoResult:
    """What the demo measured: per-node visual tokens, and costs before and after."""

    schedule: str
    rows: list[tuple[str, int, int]]  # node, visual tokens uncompressed, compressed
    before: Cost
    after: Cost


def measure(model, inputs: dict, new_tokens: int, repeats: int) -> Cost:
    """FLOPs and wall time of a prefill, and of a short greedy generation."""
    vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    with torch.inference_mode():
        vision_flops = count_flops(lambda: model.model.get_image_features(**vision))
        total_flops = count_flops(lambda: model(**inputs, logits_to_keep=1))
        prefill = time_call(lambda: model(**inputs, logits_to_keep=1), repeats=repeats)

        def generate():
            return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)

        out = generate()
        gen = time_call(generate, repeats=max(1, repeats // 2))
    return Cost(vision_flops, total_flops, prefill, gen, out[0, -new_tokens:].tolist())


def qwen2_vl_processor(config, pixels: int):
    """A real ``Qwen2VLProcessor`` for the example configs: Qwen2-VL's image and video processors (at most
    ``pixels`` pixels an image), a local word-level tokenizer whose special tokens carry ``config``'s ids, and
    ``CHAT_TEMPLATE``. Needs torchvision (the video processor is always built)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = example_tokenizer({"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                                   "<|vision_start|>": config.vision_start_token_id,
                                   "<|vision_end|>": config.vision_end_token_id},
                                  {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    size = {"shortest_edge": 56 * 56, "longest_edge": pixels}
    patch = config.vision_config.patch_size
    return Qwen2VLProcessor(Qwen2VLImageProcessor(size=size, patch_size=patch), tokenizer,
                            Qwen2VLVideoProcessor(size=size, patch_size=patch), chat_template=CHAT_TEMPLATE)


def demo_inputs(config, image, prompt: list[int], pixels: int, console: Console) -> dict:
    """The model's inputs for one image and a prompt of word ids, as a user makes them: the real Qwen2-VL
    processor and its chat template. Without torchvision (which the processor needs) the hand-made
    ``vlm_inputs``, which give the same placeholder layout, pixels and grid, and a line saying so."""
    try:
        processor = qwen2_vl_processor(config, pixels)
    except ImportError as error:
        console.print(f"inputs from luvc.examples.vlm_inputs: the Qwen2-VL processor needs torchvision ({error})")
        return vlm_inputs([[image]], prompts=[prompt], pixels=pixels, config=config)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": " ".join(f"w{i}" for i in prompt)}]}]
    return dict(processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt"))


def _node_counts(model, inputs) -> list[tuple[str, int]]:
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    return [(row.node, sum(row.visual)) for row in luvc.ledger(model) if row.transform is None]


def run_demo(model_name: str = "qwen2-vl-demo", schedule: str = "luvc-default", image: str = "astronaut",
             pixels: int = 448 * 448, new_tokens: int = 8, repeats: int = 3, console: Console | None = None,
             ) -> DemoResult:
    """Run the demo and print its tables; returns the numbers it printed."""
    console = console or Console()
    with console.status(f"building {model_name} (random weights)"):
        model = build_model(model_name)
    inputs = demo_inputs(model.config, sample_image(image), list(range(10, 26)), pixels, console)
    grid = inputs["image_grid_thw"][0].tolist()
    console.print(f"[bold]{model_name}[/]: image '{image}' -> {grid[1]}x{grid[2]} patches, "
                  f"{grid[1] * grid[2] // 4} visual tokens for the LLM")

    with console.status("reference: uncompiled model"):
        before = measure(model, inputs, new_tokens, repeats)
    luvc.compile(model, "identity")
    full = _node_counts(model, inputs)
    luvc.uncompile(model)
    luvc.compile(model, schedule)
    with console.status(f"compiled with {schedule}"):
        after = measure(model, inputs, new_tokens, repeats)
        compressed = dict(_node_counts(model, inputs))
    console.print(model.luvc_graph.nodes_table(), soft_wrap=True, highlight=False)
    luvc.uncompile(model)
    result = DemoResult(schedule, [(node, n, compressed.get(node, 0)) for node, n in full], before, after)
    _print(console, result)
    return result


def _print(console: Console, r: DemoResult) -> None:
    tokens = Table(title="Visual tokens entering each block")
    tokens.add_column("node")
    tokens.add_column("uncompressed", justify="right")
    tokens.add_column(r.schedule, justify="right")
    for node, n, m in r.rows:
        tokens.add_row(node, str(n), str(m))
    console.print(tokens)

    cost = Table(title=f"Cost: uncompiled vs {r.schedule} (same run)")
    for col in ("", "uncompiled", r.schedule, "ratio"):
        cost.add_column(col, justify="right" if col else "left")
    b, a = r.before, r.after
    for name, x, y in (
        ("vision encoder GFLOPs", b.vision_flops / 1e9, a.vision_flops / 1e9),
        ("LLM prefill GFLOPs", b.llm_flops / 1e9, a.llm_flops / 1e9),
        ("total prefill GFLOPs", b.total_flops / 1e9, a.total_flops / 1e9),
        ("prefill wall time (ms, median)", b.prefill.median * 1e3, a.prefill.median * 1e3),
        (f"generate {len(b.tokens)} tokens (ms, median)", b.generate.median * 1e3, a.generate.median * 1e3),
    ):
        cost.add_row(name, f"{x:.3f}", f"{y:.3f}", f"{y / x:.2f}" if x else "-")
    console.print(cost)
    console.print(f"generated ids, uncompiled: {b.tokens}")
    console.print(f"generated ids, {r.schedule}: {a.tokens}")
