"""The ``luvc`` command line: the demo, and tools for schedules and plugins."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from luvc.errors import LuvcError, UnknownModelError

app = typer.Typer(help="luvc: training-free visual-token compression for VLMs.", no_args_is_help=True,
                  add_completion=False)
console = Console()
errors = Console(stderr=True)

MODEL_HELP = ("built-in config (luvc.examples: qwen2-vl-tiny, qwen2.5-vl-tiny, llava-tiny, qwen2-vl-2b, ...) "
              "or a local checkpoint directory")


#: What ``luvc demo`` and ``luvc bench`` import beyond the core install; the ``bench`` extra installs them.
BENCH_MODULES = ("matplotlib", "skimage", "PIL")


def require_bench_extra(command: str) -> None:
    """Stop with a clear message when ``command`` needs modules the core install leaves out."""
    missing = [name for name in BENCH_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        errors.print(f"[red]error[/]: luvc {command} needs {', '.join(missing)}, which the core install leaves "
                     "out\n  pip install 'luvc\\[bench]'", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.callback()
def main() -> None:
    """luvc: compress the visual tokens of vision-language models, training-free."""


@app.command()
def demo(
    model: str = typer.Option("qwen2-vl-demo", help="built-in config: qwen2-vl-demo or qwen2-vl-tiny"),
    schedule: str = typer.Option("luvc-default", help="preset name or YAML path"),
    image: str = typer.Option("astronaut", help="a scikit-image sample image"),
    size: int = typer.Option(448, help="image side in pixels (resized to about size x size)"),
    new_tokens: int = typer.Option(8, help="tokens to generate"),
    repeats: int = typer.Option(3, help="timed repeats (median reported)"),
) -> None:
    """Compile a random-weight Qwen2-VL and show tokens per layer, FLOPs and wall time before/after."""
    require_bench_extra("demo")
    from luvc.demo import run_demo

    run_demo(model, schedule, image, size * size, new_tokens, repeats)


@app.command()
def presets() -> None:
    """List the preset schedules (built-in and from plugins), one line each."""
    from luvc.registry import get_registry
    from luvc.schedules import load_schedule

    table = Table("preset", "description", title="Preset schedules (load by name)")
    for name in sorted(get_registry().presets):
        table.add_row(name, load_schedule(name).description)
    console.print(table)


@app.command()
def plugins() -> None:
    """Show the registered plugins, transforms and model adapters, and where each comes from."""
    from luvc.registry import get_registry

    registry = get_registry()
    table = Table("plugin", "distribution", "version", title="Plugins")
    for info in registry.plugins():
        table.add_row(info.name, info.distribution, info.version)
    console.print(table)
    table = Table("transform", "site", "plugin", "what it does", title="Transforms")
    for name, spec in sorted(registry.transforms.items()):
        table.add_row(name, spec.site, registry.plugin_of(name), spec.summary)
    console.print(table)
    table = Table("adapter", "architectures", "stages", "capabilities", title="Model adapters (tried in this order)")
    for adapter in registry.adapters:
        stages = getattr(adapter, "stages", frozenset({"vision", "llm"}))
        table.add_row(adapter.name + (" (fallback)" if getattr(adapter, "fallback", False) else ""),
                      ", ".join(adapter.architectures), ", ".join(s for s in ("vision", "llm") if s in stages),
                      ", ".join(sorted(getattr(adapter, "capabilities", ()))) or "-")
    console.print(table)


@app.command()
def validate(
    schedule: str = typer.Argument(..., help="YAML file, preset name or YAML text"),
    model: str | None = typer.Option(None, help=f"also check placement against a model: {MODEL_HELP}"),
) -> None:
    """Check a schedule: schema, transform names, parameters, and (with --model) depth and the zero claim.

    Exits 1 with the error (file:line: key: problem, and the fix) when invalid.
    """
    import luvc

    try:
        loaded = luvc.load_schedule(Path(schedule) if Path(schedule).is_file() else schedule)
        if model is not None:
            luvc.lower(_load_model(model), loaded)
    except LuvcError as exc:
        errors.print(f"[red]invalid[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    against = f" against {model}" if model else ""
    console.print(f"[green]valid[/]: {loaded.name}{against}", highlight=False)


@app.command()
def inspect(
    model: str = typer.Option(..., help=MODEL_HELP),
    schedule: str = typer.Option("luvc-default", help="preset name, YAML file or YAML text"),
    size: str = typer.Option("448", help="image size in pixels: SIDE or HEIGHTxWIDTH"),
    frames: int = typer.Option(1, help="video frames (1: a still image)"),
) -> None:
    """Show the compiled FX graph and the planned visual tokens entering each node for one input."""
    import luvc

    height, _, width = size.partition("x")
    if not (height.isdigit() and (width or height).isdigit()):
        errors.print(f"[red]error[/]: --size {size!r}: write SIDE or HEIGHTxWIDTH in pixels, e.g. 448 or 448x672",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    try:
        built = _load_model(model)
        loaded, adapter, graph = luvc.lower(built, Path(schedule) if Path(schedule).is_file() else schedule)
        grid, unit = adapter.input_grid(built, int(height), int(width or height), frames)
    except LuvcError as exc:
        errors.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(str(graph), soft_wrap=True, highlight=False)
    table = Table("node", "visual tokens", title=f"{loaded.name} on {model}: one {size} px input, "
                  f"grid t={grid[0]} h={grid[1]} w={grid[2]} units of {unit}")
    for node, count in graph.luvc_plan.counts([grid], unit):
        table.add_row(node, str(count))
    console.print(table)


def _load_model(name: str):
    """A model on the meta device (no memory, no weights) from a built-in config or a checkpoint's config."""
    import torch

    from luvc.examples import build_model, examples

    known = examples()
    if name in known:
        return build_model(name, device="meta")
    path = Path(name)
    if not (path / "config.json").is_file():
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        raise UnknownModelError(f"unknown model {name!r}: not a built-in config "
                                f"{f'(did you mean {close[0]!r}?) ' if close else ''}({', '.join(known)}) "
                                "nor a directory with config.json")
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))


bench = typer.Typer(help="Benchmarks: schedules against identity, measured in the same run.", no_args_is_help=True)
app.add_typer(bench, name="bench")


@bench.callback()
def bench_main() -> None:
    """Benchmarks: schedules against identity, measured in the same run."""
    require_bench_extra("bench")


@bench.command("speed")
def bench_speed(
    model: str = typer.Option("qwen2-vl-2b", help="built-in config (qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-7b, "
                              "llava-1.5-7b, and the *-tiny ones; see luvc.examples) or a local checkpoint directory; "
                              "LLaVA resizes every image to its fixed size"),
    schedule: list[str] = typer.Option(["luvc-default"], help="schedule to compare (repeatable); identity is "
                                       "always measured as the reference"),
    resolution: list[int] = typer.Option([448, 896, 1344], help="image side in px (repeatable)"),
    frames: list[int] = typer.Option([], help="video frame counts (repeatable), at --video-size"),
    video_size: int = typer.Option(448, help="video frame side in px"),
    batch: int = typer.Option(1, help="samples per batch"),
    layers: int | None = typer.Option(None, help="shrink the LLM to this many layers (quick runs)"),
    vision_layers: int | None = typer.Option(None, help="shrink the vision encoder to this many blocks"),
    repeats: int = typer.Option(3, help="timed repeats; medians reported with min-max"),
    warmup: int = typer.Option(1, help="untimed warm-up calls before timing"),
    new_tokens: int = typer.Option(8, help="decode steps timed for tokens/s"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (bfloat16 by default on cuda)"),
    attn: str = typer.Option("sdpa", help="attention implementation: sdpa, eager or flash_attention_2"),
    out: Path = typer.Option(Path("bench-out/speed"), help="folder for speed.json, speed.md and PNG plots"),
) -> None:
    """Measure FLOPs, prefill time, time to first token, decode speed and memory of each schedule."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from luvc.bench import report as reports
    from luvc.bench.speed import BenchInput, environment, load_bench_model, run_speed, to_json

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    specs = [BenchInput(r, 0, batch) for r in resolution] + [BenchInput(video_size, f, batch) for f in frames]
    try:
        with console.status(f"building {model}"):
            built = load_bench_model(model, layers, vision_layers, device, torch_dtype, attn)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            results = run_speed(built, schedule, specs, repeats, warmup, new_tokens, device, progress)
    except (LuvcError, MemoryError) as exc:
        errors.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    from luvc.models import find_adapter

    vision_blocks = sum(1 for name, _ in find_adapter(built).stack_nodes(built) if name.startswith("vision.blocks."))
    depth = f"{built.config.text_config.num_hidden_layers} LLM layers, {vision_blocks} vision blocks"
    title = f"luvc bench speed: {model} ({depth}), {device}"
    settings = {"schedules": schedule, "resolutions": resolution, "frames": frames, "batch": batch,
                "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "layers": layers,
                "vision_layers": vision_layers}
    report = to_json(results, environment(device, torch_dtype, attn), model, settings)
    console.print(reports.rich_table(results, title))
    for path in reports.write(report, results, out, title):
        console.print(f"wrote {path}")


@bench.command("fidelity")
def bench_fidelity(
    checkpoint: Path | None = typer.Option(None, help="a checkpoint in the fidelity model's format (default: "
                                           "luvc/fidelity/checkpoint, written by python -m luvc.fidelity.train)"),
    dataset: Path | None = typer.Option(None, help="folder with items.jsonl and its images (default: the held-out "
                                        "split of luvc's task suite)"),
    count: int = typer.Option(500, help="items evaluated (the first COUNT)"),
    split: str = typer.Option("test", help="the task suite's split: test (held out) or val (for tuning schedules)"),
    schedule: list[str] = typer.Option([], help="schedule to score (repeatable; preset name or YAML file); default: "
                                       "identity, luvc-default and every method at every matched budget"),
    batch_size: int = typer.Option(50, help="items per generate call"),
    threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
    out: Path = typer.Option(Path("bench-out/fidelity"), help="folder for fidelity.json, fidelity.md and the plot"),
) -> None:
    """Score schedules by held-out accuracy kept against LLM prefill FLOPs (identity is the reference)."""
    import json

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from luvc.bench import fidelity as fid
    from luvc.fidelity.model import CHECKPOINT, SHIPPED, load_model, load_tokenizer
    from luvc.schedules import load_schedule

    if threads:
        torch.set_num_threads(threads)
    source = checkpoint or CHECKPOINT
    try:
        model, tokenizer = load_model(source), load_tokenizer(source)
        if split not in ("test", "val"):
            raise ValueError(f"--split {split!r}: choose test (held out) or val (tuning); train items "
                             "are what the model learned from")
        items = fid.load_items(dataset, count, split)
        infeasible: list[str] = []
        if schedule:
            named = [load_schedule(s) for s in (["identity"] + [s for s in schedule if s != "identity"])]
            chosen = [(*fid.method_and_budget(s.name), s) for s in named]
        else:
            chosen = fid.default_schedules(model, items[0].image.shape[:2], infeasible)
    except (LuvcError, FileNotFoundError, ValueError) as exc:
        errors.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    batches = -(-len(items) // batch_size)
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("scoring", total=batches * len(chosen))
        results = fid.run_fidelity(model, tokenizer, items, chosen, batch_size,
                                   advance=lambda name: progress.update(task, advance=1, description=name))
    model_name = f"checkpoint {checkpoint.name}" if checkpoint else "the shipped model"
    title = f"luvc bench fidelity: {len(items)} {split if dataset is None else dataset.name} items, {model_name}"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(checkpoint) if checkpoint else SHIPPED,
                "dataset": str(dataset) if dataset else f"luvc task suite, {split} split",
                "count": len(items), "batch_size": batch_size, "schedules": [s.name for _, _, s in chosen],
                "infeasible": infeasible}
    (out / "fidelity.json").write_text(json.dumps(fid.to_json(results, settings), indent=2))
    table = fid.markdown(results, title, tuple(infeasible))
    (out / "fidelity.md").write_text(table)
    fid.pareto_plot(results, out / "fidelity.png", "accuracy against LLM prefill cost")
    console.print(table)
    console.print(f"wrote {out / 'fidelity.json'}, {out / 'fidelity.md'}, {out / 'fidelity.png'}")


def _fidelity_setup(checkpoint: Path | None, threads: int):
    """The fidelity model and tokenizer (the shipped ones by default), and the shape schedules are solved for."""
    import torch

    from luvc.bench.tuning import Shape
    from luvc.fidelity.model import CHECKPOINT, load_model, load_tokenizer
    from luvc.models import find_adapter

    if threads:
        torch.set_num_threads(threads)
    source = checkpoint or CHECKPOINT
    model, tokenizer = load_model(source), load_tokenizer(source)
    adapter = find_adapter(model)
    vision_depth = sum(1 for name, _ in adapter.stack_nodes(model) if name.startswith("vision.blocks."))
    from luvc.fidelity.tasks import SIZE

    grid, _ = adapter.input_grid(model, SIZE, SIZE)
    return model, tokenizer, Shape(model.config.text_config.num_hidden_layers, vision_depth, grid)


def _scoring_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


@bench.command("tune")
def bench_tune(
    checkpoint: Path | None = typer.Option(None, help="a checkpoint in the fidelity model's format (default: shipped)"),
    method: list[str] = typer.Option([], help="method to tune (repeatable); default: every matched method"),
    budget: list[str] = typer.Option([], help="third, quarter or ninth (repeatable); default: all three"),
    val_count: int = typer.Option(500, help="validation items every grid point is scored on"),
    test_count: int = typer.Option(500, help="held-out items each method's choice is scored on"),
    batch_size: int = typer.Option(50, help="items per generate call"),
    threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
    out: Path = typer.Option(Path("bench-out/tune"), help="folder for tune.json and tune.md"),
) -> None:
    """Choose each method's free parameters on the validation split at each matched budget, then score the
    choices held out: the same tuning courtesy for every method (grids in luvc.schedules.budgets.GRIDS)."""
    import json

    from luvc.bench import tuning
    from luvc.bench.fidelity import load_items
    from luvc.schedules.budgets import BUDGETS, GRIDS

    methods = tuple(method) or tuple(GRIDS)
    budgets = tuple(budget) or tuple(BUDGETS)
    unknown = [m for m in methods if m not in GRIDS] + [b for b in budgets if b not in BUDGETS]
    if unknown:
        errors.print(f"[red]error[/]: unknown {', '.join(map(repr, unknown))}; methods: {', '.join(GRIDS)}; "
                     f"budgets: {', '.join(BUDGETS)}")
        raise typer.Exit(1)
    model, tokenizer, shape = _fidelity_setup(checkpoint, threads)
    val, test = load_items(None, val_count, "val"), load_items(None, test_count, "test")
    runnable = [c for c in tuning.candidates(shape, methods, budgets) if c.excluded is None]
    best_guess = len({(c.method, c.budget) for c in runnable})
    batches = -(-val_count // batch_size) * (len(runnable) + 1) + -(-test_count // batch_size) * (best_guess + 1)
    with _scoring_progress() as progress:
        task = progress.add_task("tuning", total=batches)
        cands, identity = tuning.tune(model, tokenizer, val, test, shape, methods, budgets, batch_size,
                                      advance=lambda name: progress.update(task, advance=1, description=name))
    out.mkdir(parents=True, exist_ok=True)
    table = tuning.tune_markdown(cands, identity)
    (out / "tune.md").write_text(table)
    (out / "tune.json").write_text(json.dumps({"identity": identity, "chosen": tuning.chosen_settings(cands),
                                               "candidates": tuning.to_json(cands)}, indent=2))
    console.print(table)
    console.print(f"chosen settings (luvc.schedules.budgets.TUNED): {tuning.chosen_settings(cands)}")
    console.print(f"wrote {out / 'tune.md'}, {out / 'tune.json'}")


@bench.command("ablation")
def bench_ablation(
    checkpoint: Path | None = typer.Option(None, help="a checkpoint in the fidelity model's format (default: shipped)"),
    val_count: int = typer.Option(500, help="validation items"),
    test_count: int = typer.Option(500, help="held-out items"),
    batch_size: int = typer.Option(50, help="items per generate call"),
    threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
    out: Path = typer.Option(Path("bench-out/ablation"), help="folder for ablation.json and ablation.md"),
) -> None:
    """luvc-default with one factor changed at a time (SPU band x axis, OIM amount and placement, cascade
    shape), each scored on the validation and the held-out split."""
    import json

    from luvc.bench import tuning
    from luvc.bench.fidelity import load_items

    model, tokenizer, shape = _fidelity_setup(checkpoint, threads)
    splits = {"val": load_items(None, val_count, "val"), "test": load_items(None, test_count, "test")}
    rows = tuning.ablation_variants(shape)
    batches = sum(-(-len(items) // batch_size) * (len(rows) + 1) for items in splits.values())
    with _scoring_progress() as progress:
        task = progress.add_task("ablation", total=batches)
        rows, identity = tuning.ablate(model, tokenizer, splits, shape, batch_size,
                                       advance=lambda name: progress.update(task, advance=1, description=name))
    out.mkdir(parents=True, exist_ok=True)
    table = tuning.ablation_markdown(rows, identity)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"identity": identity, "rows": tuning.ablation_to_json(rows)},
                                                  indent=2))
    console.print(table)
    console.print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}")


if __name__ == "__main__":
    app()
