"""Train the fidelity model on the task suite (reproducible: fixed seeds, fixed item order).

    python -m luvc.fidelity.train --out luvc/fidelity/checkpoint

writes ``config.json``, ``model.safetensors``, the tokenizer, the processor files and
``training_log.jsonl`` (loss, validation accuracy per task) to ``--out``. The
shipped checkpoint was made by ``luvc/fidelity/train-shipped-model.sh``: this
command with its defaults, then three 1000-step continuations (``--init``) with
each question asked alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import typer

from luvc.fidelity.model import CHECKPOINT, PATCH, build_tokenizer, encode, load_model, new_model
from luvc.fidelity.processor import save_processor
from luvc.fidelity.tasks import PHOTO, REGIONS, TASKS, Item, items, region_group, task_of_question


def shrink(item: Item, size: int) -> Item:
    """``item`` with its image (and region map) resized to ``size`` px square."""
    from PIL import Image

    image = np.asarray(Image.fromarray(item.image).resize((size, size), Image.BILINEAR))
    regions = item.regions
    if regions is not None:
        regions = np.asarray(Image.fromarray(regions).resize((size, size), Image.NEAREST))
    return dataclasses.replace(item, image=image, regions=regions)


def patch_regions(item: Item, cover: float = 0.25) -> np.ndarray:
    """Per patch (row-major, the processor's order for a 1 x 1 merger), the region covering
    most of it, if it covers at least ``cover`` of the patch; else background (0)."""
    h, w = item.regions.shape
    blocks = item.regions.reshape(h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(-1, PATCH * PATCH).astype(np.int64)
    counts = np.zeros((len(blocks), len(REGIONS)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(blocks)), PATCH * PATCH), blocks.ravel()), 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    return np.where(counts.max(1) >= cover * PATCH * PATCH, best, 0)


def isolate_questions(inputs: dict, model) -> dict:
    """``inputs`` (``encode(..., with_answers=True)``) with every question of a row asked alone.

    Each question sees the image and itself only, from the positions the
    first question has, as evaluation asks it (one question per image): a
    later question can no longer read what earlier ones gathered, so every
    question teaches what the first does. Returns new inputs with a 4-D
    attention mask and explicit M-RoPE positions; ``inputs`` is not changed.
    """
    out = dict(inputs)
    question = out.pop("questions")
    real = out["attention_mask"].bool()
    positions, _ = model.model.get_rope_index(out["input_ids"], out["mm_token_type_ids"], out["image_grid_thw"],
                                              None, attention_mask=out["attention_mask"])
    width = question.shape[1]
    index = torch.arange(width).expand_as(question)

    def start(n: int) -> torch.Tensor:  # per row, where question n begins
        return torch.where(question == n, index, width).min(1, keepdim=True).values

    first, shift = start(1), torch.zeros_like(question)
    for n in range(2, int(question.max()) + 1):
        shift = torch.where(question == n, start(n) - first, shift)
    positions = positions - shift[None].to(positions.dtype)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees = (question[:, :, None] == question[:, None, :]) | (question[:, None, :] == 0)
    mask = causal & sees & real[:, None, :]
    mask |= torch.eye(width, dtype=torch.bool)  # a padding position sees itself, so no row is empty
    out["attention_mask"] = mask[:, None]
    out["position_ids"] = positions
    return out


def padding_after(inputs: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Chained training inputs with each row's padding moved after it and no attention mask.

    Under a causal mask no real token sees a padding token that follows it,
    and M-RoPE numbers a row's tokens from its first real one either way, so
    every answer's logits are those of the left-padded, masked batch (up to
    float rounding); the labels of the trailing padding are ignored. Without
    a mask, attention takes SDPA's causal path instead of a masked one: the
    forward and backward of a chained batch of 15 took 0.90 s instead of 0.94 s
    here (medians of 10, alternated). Returns new inputs and labels; the
    caller's are not changed.
    """
    real = inputs["attention_mask"].bool()
    width = real.shape[1]
    source = torch.arange(width) + (~real).sum(1, keepdim=True)
    inside = source < width
    source = source.clamp(max=width - 1)

    def shifted(rows: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(inside, rows.gather(1, source), fill)

    out = {key: value for key, value in inputs.items() if key not in ("attention_mask", "questions")}
    out["input_ids"] = shifted(inputs["input_ids"], 0)
    out["mm_token_type_ids"] = shifted(inputs["mm_token_type_ids"], 0)
    return out, shifted(labels, -100)


def answer_loss_per_task(logits: torch.Tensor, labels: torch.Tensor, batch_items: list[Item],
                         tokenizer, first_weight: float | dict[str, float] = 1.0) -> dict[str, torch.Tensor]:
    """Mean next-token loss over the answer (and end) tokens of each task's questions.

    A question counts for the task whose template it follows, whatever item
    asks it: a colour item's relation questions train ``spatial``. The first
    question of each row weighs ``first_weight`` times the others (per task of
    that question, if a dict): evaluation asks one question per image, and a
    later question in a training row can read what the earlier ones gathered,
    so it is easier and would otherwise carry most of the task's weight.
    """
    firsts = first_weight if isinstance(first_weight, dict) else dict.fromkeys(TASKS, first_weight)
    predicted, target = logits[:, :-1], labels[:, 1:]
    answered = target != -100
    losses = torch.nn.functional.cross_entropy(predicted[answered], target[answered], reduction="none")
    asked = [(kind, firsts[kind] if n == 0 else 1.0)  # labels run row by row
             for item in batch_items for n, (question, answer) in enumerate([(item.question, item.answer), *item.more])
             for kind in [task_of_question(question)]
             for _ in range(len(tokenizer.encode(answer, add_special_tokens=False)) + 1)]
    if len(asked) != len(losses):
        raise AssertionError(f"{len(losses)} answer tokens in the batch, {len(asked)} from its questions")
    kinds = [kind for kind, _ in asked]
    weights = torch.tensor([weight for _, weight in asked])
    out = {}
    for task in TASKS:
        mine = torch.tensor([k == task for k in kinds])
        if mine.any():
            out[task] = (losses[mine] * weights[mine]).sum() / weights[mine].sum()
    return out


def parse_task_weights(text: str, option: str = "--task-weights") -> dict[str, float]:
    """``"text:1,chart:7"`` -> weights per task; unnamed tasks weigh 1. A bare number weighs every task."""
    try:
        return dict.fromkeys(TASKS, float(text))
    except ValueError:
        pass
    weights = dict.fromkeys(TASKS, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, _, value = part.partition(":")
        try:
            if task not in TASKS:
                raise ValueError(task)
            weights[task] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r}: expected TASK:WEIGHT with TASK one of {', '.join(TASKS)} "
                                     "and WEIGHT a number", param_hint=option) from None
    return weights


def region_class_weights(relation_weight: float = 1.0) -> torch.Tensor:
    """Per ``REGIONS`` class, its weight in the region loss.

    Background weighs 0.1 (most patches, least informative). A shape whose
    label names its relation to the other shape weighs ``relation_weight``: the
    tower learns the relation when spatial items are all it sees, but in the
    full mix those patches are a small share of the loss.
    """
    weights = torch.ones(len(REGIONS))
    weights[0] = 0.1
    weights[[i for i, name in enumerate(REGIONS) if region_group(name) == "relation"]] = relation_weight
    return weights


def linear_patch_embedding(model) -> None:
    """Compute the vision tower's patch embedding as the matrix product it is.

    The embedding is a ``Conv3d`` whose kernel equals its stride, so each output
    is one patch's pixels times the flattened kernel; on this CPU the
    convolution takes 50 ms of a training step and the product 2 ms. Same
    weights, same layout: checkpoints are unchanged.
    """
    embed = model.model.visual.patch_embed
    if embed.proj.bias is not None:
        raise ValueError("the patch embedding has a bias; only the bias-free Qwen2-VL embedding is rewritten")

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        weight = embed.proj.weight
        return torch.nn.functional.linear(pixels.reshape(-1, weight[0].numel()).to(weight.dtype),
                                          weight.reshape(weight.shape[0], -1))

    embed.forward = forward


def compile_blocks(model) -> None:
    """``torch.compile`` every decoder layer and vision block, each for the shapes it meets.

    The whole model does not compile well (the M-RoPE index and the tower's
    per-image attention loop in Python); one block is the same graph for every
    layer, and fusing its elementwise work (norms, rotary, SiLU) makes the
    model's forward and backward about 20% faster here. A batch of 224 px images has one of a
    few widths, so shapes are static: a handful of compilations per run, cached
    on disk across runs. Validation runs eager (``torch.compiler.set_stance``).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
        block.compile(dynamic=False)


def freeze_last_attention(model, layers: int) -> None:
    """Stop training the self-attention of the LLM's last ``layers`` decoder layers.

    Attention is the only place a text token reads a visual one, so a continued
    run with these frozen cannot teach the last layers to look at the image;
    what the run still has to learn from it, earlier layers must read.
    """
    for layer in model.model.language_model.layers[len(model.model.language_model.layers) - layers:]:
        layer.self_attn.requires_grad_(False)


def answer_accuracy(model, tokenizer, batch_items, batch_size: int = 50) -> dict[str, float]:
    """Per-task accuracy of the first answer token (greedy), uncompressed."""
    hits: dict[str, list[bool]] = {task: [] for task in TASKS}
    model.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for start in range(0, len(batch_items), batch_size):
            chunk = batch_items[start:start + batch_size]
            inputs = encode(chunk, tokenizer, model.config)
            logits = model(**inputs).logits[:, -1]
            for item, token in zip(chunk, logits.argmax(-1).tolist()):
                hits[item.task].append(tokenizer.decode([token]) == item.answer)
    model.train()
    out = {task: sum(h) / len(h) for task, h in hits.items() if h}
    out["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return out


def train(out: Path = typer.Option(CHECKPOINT, help="directory the checkpoint is written to"),
          steps: int = typer.Option(4600, help="optimizer steps"),
          batch: int = typer.Option(15, help="items (images) per step"),
          lr: float = typer.Option(2e-3, help="peak learning rate (AdamW, cosine decay)"),
          warmup: int = typer.Option(30, help="linear warm-up steps"),
          seed: int = typer.Option(0, help="initialisation seed"),
          threads: int = typer.Option(2, help="CPU threads"),
          eval_every: int = typer.Option(250, help="steps between validation runs (and checkpoint saves)"),
          small_steps: int = typer.Option(0, help="curriculum: first steps at --small-size px (fewer visual tokens)"),
          small_size: int = typer.Option(112, help="image side during the first --small-steps steps"),
          flat_steps: int = typer.Option(100, help="curriculum: steps on flat grey backgrounds"),
          fade_steps: int = typer.Option(200, help="curriculum: steps over which the photographs fade in"),
          label_tiles: str = typer.Option("4:500,2:900", help="curriculum: TILES:UNTIL_STEP,... text labels printed "
                                          "as TILES x TILES blocks before UNTIL_STEP, single cells after"),
          region_weight: float = typer.Option(1.0, help="weight of the per-visual-token region loss"),
          task_weights: str = typer.Option("text:1,chart:7,count:3,color:4,spatial:5",
                                           help="TASK:WEIGHT,...: share of each task in the answer loss"),
          first_weight: str = typer.Option("1", help="weight of each row's first question against its others "
                                           "(evaluation asks only the first): a number, or TASK:WEIGHT,... by "
                                           "the question's task (unnamed tasks 1)"),
          relation_weight: float = typer.Option(1.0, help="weight in the region loss of the patches labelled with "
                                                "a relation to another shape, against the other regions"),
          tasks: str = typer.Option(",".join(TASKS), help="comma-separated tasks to train and validate on"),
          isolate_from: int | None = typer.Option(None, help="from this step on, ask each question of a training "
                                                  "row alone (it sees the image and itself); before it, and "
                                                  "without this option, later questions see earlier ones"),
          restart_lr: float | None = typer.Option(None, help="at --isolate-from, warm up again to this peak "
                                                  "learning rate and decay it over the remaining steps (each "
                                                  "phase its own cosine); without it, one cosine over all steps"),
          llm_layers: int | None = typer.Option(None, help="decoder layers of the LLM (default: the shipped 8, or "
                                                "--init's)"),
          llm_mlp: int | None = typer.Option(None, help="MLP width of the LLM's layers (default: the shipped 384, "
                                             "or --init's)"),
          speedups: bool = typer.Option(True, "--speedups/--no-speedups",
                                        help="flush denormal floats to zero, compile the decoder layers and vision "
                                        "blocks, compute the patch embedding as a matrix product, and pad chained "
                                        "rows after their tokens so attention runs causal without a mask (each "
                                        "changes float rounding only; --no-speedups trains as luvc did before)"),
          init: Path | None = typer.Option(None, help="continue training this checkpoint: its training log is "
                                           "carried over, steps and items count on from its last step"),
          frozen_attention: int = typer.Option(0, help="leave the self-attention of the LLM's last N decoder layers "
                                               "untrained (with --init: as the checkpoint has it)")) -> None:
    """Train the fidelity model from scratch on the train split; validate on the val split.

    Curriculum: optionally smaller images first (Qwen2-VL takes any size: fewer
    visual tokens make it easier to learn where to look); overlays on flat
    backgrounds first (the model learns to read the image before it learns to
    ignore clutter), then the photographs fade in to the weight every
    evaluation uses; text labels first printed over blocks of cells, then on
    the single cell every evaluation uses (from scratch, an answer on one
    token of 256 stays at chance: nothing tells the model where to look).

    The answer loss is a weighted mean of per-task means (``--task-weights``),
    not a mean over answer tokens: an image asks up to nine questions of some
    tasks and one of others, and a token mean lets the tasks with the most
    questions take the gradient whatever they still have to learn.

    Besides the answers, every visual token leaving the vision tower is
    supervised with what its patch shows (``tasks.REGIONS``: a digit, a bar
    and its value, a shape and where it is relative to the other one...) by a
    linear probe used only in training and not saved: the answer loss alone
    reaches 1 token in 256 and leaves a model this small at the answer prior.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # the region probe of a continued run starts the same every time
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    earlier: list[str] = []
    shape = {key: value for key, value in (("llm_layers", llm_layers), ("llm_mlp", llm_mlp)) if value is not None}
    if init is None:
        model = new_model(seed, **shape).train()
    else:
        model = load_model(init).train()
        text = model.config.text_config
        for key, value in (("llm_layers", text.num_hidden_layers), ("llm_mlp", text.intermediate_size)):
            if shape.get(key, value) != value:
                raise typer.BadParameter(f"{init} has {value}, not {shape[key]}: a continued checkpoint keeps its "
                                         "architecture; leave the option out", param_hint=f"--{key.replace('_', '-')}")
        logged = init / "training_log.jsonl"
        earlier = logged.read_text().splitlines() if logged.exists() else []
    done = json.loads(earlier[-1])["step"] if earlier else 0  # curriculum and items continue from here
    switch = steps if isolate_from is None else min(steps, max(0, isolate_from - done))
    if restart_lr is not None and not 0 < switch < steps:
        raise typer.BadParameter(f"restarts at --isolate-from, which must fall inside this run (after step {done}, "
                                 f"before step {done + steps}); for one phase, set its peak with --lr",
                                 param_hint="--restart-lr")
    depth = model.config.text_config.num_hidden_layers
    if not 0 <= frozen_attention <= depth:
        raise typer.BadParameter(f"the LLM has {depth} decoder layers; freeze between 0 and {depth}",
                                 param_hint="--frozen-attention")
    freeze_last_attention(model, frozen_attention)
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, len(REGIONS))
    features: list[torch.Tensor] = []
    model.model.visual.merger.register_forward_hook(lambda module, args, out: features.append(out))
    weights = region_class_weights(relation_weight)
    params = [(n, p) for n, p in [*model.named_parameters(), *probe.named_parameters()] if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2]
    other = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))

    phases = [(0, switch, 1.0), (switch, steps, restart_lr / lr)] if restart_lr is not None else [(0, steps, 1.0)]

    def rate(step: int) -> float:
        begin, end, peak = next((phase for phase in phases if step < phase[1]), phases[-1])
        step -= begin
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, end - begin - warmup)
        return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    shares = parse_task_weights(task_weights)
    firsts = parse_task_weights(first_weight, "--first-weight")
    chosen = tuple(t.strip() for t in tasks.split(","))
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}",
                                 param_hint="--tasks")
    label_schedule = sorted((int(until), int(tiles)) for tiles, until in
                            (part.split(":") for part in label_tiles.split(",") if part.strip()))
    val = items("val", 250, tasks=chosen)
    log = (out / "training_log.jsonl").open("w")
    log.writelines(line + "\n" for line in earlier)

    def prepare(seen: int) -> tuple[float, int, list[Item], dict, torch.Tensor]:
        """Step ``seen``'s curriculum, items, model inputs and patch targets (no model needed)."""
        photo = PHOTO * min(1.0, max(0.0, (seen - flat_steps) / max(1, fade_steps)))
        tiles = next((t for until, t in label_schedule if seen < until), 1)
        batch_items = items("train", batch, tasks=chosen, start=seen * batch, photo=photo, tiles=tiles)
        if seen < small_steps:
            batch_items = [shrink(item, small_size) for item in batch_items]
        inputs = encode(batch_items, tokenizer, model.config, with_answers=True)
        target = torch.from_numpy(np.concatenate([patch_regions(item) for item in batch_items]))
        return photo, tiles, batch_items, inputs, target

    if speedups:
        # A trained model's softmax and SiLU tails underflow into denormal floats, which this CPU
        # computes many times slower: at step 1500 a compiled step took 0.97 s with them, 0.70 s without.
        torch.set_flush_denormal(True)
        linear_patch_embedding(model)
        compile_blocks(model)
    # The next step's batch is drawn while this one trains: the items depend on the step alone.
    ahead = ThreadPoolExecutor(max_workers=1)
    upcoming = ahead.submit(prepare, done)
    started = time.time()
    for step in range(steps):
        seen = done + step
        photo, tiles, batch_items, inputs, target = upcoming.result()
        if step + 1 < steps:
            upcoming = ahead.submit(prepare, seen + 1)
        features.clear()
        labels = inputs.pop("labels")
        if step >= switch:
            inputs = isolate_questions(inputs, model)
        elif speedups:
            inputs, labels = padding_after(inputs, labels)
        else:
            inputs.pop("questions")
        per_task = answer_loss_per_task(model(**inputs).logits, labels, batch_items, tokenizer, firsts)
        answer_loss = sum(shares[t] * loss for t, loss in per_task.items()) / sum(shares[t] for t in per_task)
        region_loss = torch.nn.functional.cross_entropy(probe(features[0]), target, weight=weights)
        loss = answer_loss + region_weight * region_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        used = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": seen + 1, "loss": round(answer_loss.item(), 4), "region_loss": round(region_loss.item(), 4),
               "tasks": {t: round(loss.item(), 3) for t, loss in per_task.items()},
               "photo": round(photo, 3), "tiles": tiles, "lr": float(f"{used:.3g}"),
               "minutes": round((time.time() - started) / 60, 2)}
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row["val"] = {k: round(v, 3) for k, v in answer_accuracy(model, tokenizer, val).items()}
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            save_processor(out)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if "val" in row or step % 10 == 0:
            print(json.dumps(row), flush=True)
    ahead.shutdown()


if __name__ == "__main__":
    typer.run(train)
