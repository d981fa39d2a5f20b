"""The fidelity training loss: each task's questions form one mean, whatever item asks them,
with each row's first question weighted as evaluation asks it."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import typer
from safetensors.torch import load_file

from luvc.fidelity.model import build_tokenizer, encode, fidelity_config, load_model, new_model
from luvc.fidelity.tasks import REGIONS, TASKS, items, task_of_question
from luvc.fidelity.train import (
    answer_loss_per_task,
    compile_blocks,
    isolate_questions,
    linear_patch_embedding,
    padding_after,
    parse_task_weights,
    region_class_weights,
)


def test_every_question_belongs_to_the_task_of_its_template():
    batch = items("train", 10)
    assert [task_of_question(item.question) for item in batch] == [item.task for item in batch]
    spatial = next(item for item in batch if item.task == "spatial")
    assert [task_of_question(q) for q, _ in spatial.more] == ["spatial", "color", "color"]
    with pytest.raises(ValueError, match="none of the task templates"):
        task_of_question("is this a question ?")


def test_per_task_losses_are_means_over_each_tasks_answer_tokens():
    config, tokenizer = fidelity_config(), build_tokenizer()
    batch = items("train", 10)
    inputs = encode(batch, tokenizer, config, with_answers=True)
    torch.manual_seed(0)
    logits = torch.randn(*inputs["input_ids"].shape, config.text_config.vocab_size)
    per_task = answer_loss_per_task(logits, inputs["labels"], batch, tokenizer)
    assert set(per_task) == set(TASKS)
    # Text items ask one question: the text mean is over their answer tokens, by hand.
    target = inputs["labels"][:, 1:]
    texts = torch.tensor([item.task == "text" for item in batch])[:, None] & (target != -100)
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][texts], target[texts])
    torch.testing.assert_close(per_task["text"], by_hand)
    # The token mean the model computes weighs tasks by how many answer tokens they have; the
    # per-task means do not.
    counts = {t: 0 for t in TASKS}
    for item in batch:
        for question, answer in [(item.question, item.answer), *item.more]:
            counts[task_of_question(question)] += len(tokenizer.encode(answer, add_special_tokens=False)) + 1
    token_mean = sum(per_task[t] * counts[t] for t in TASKS) / sum(counts.values())
    torch.testing.assert_close(token_mean, torch.nn.functional.cross_entropy(
        logits[:, :-1][target != -100], target[target != -100]))


def test_first_weight_counts_each_rows_first_question_that_many_times():
    config, tokenizer = fidelity_config(), build_tokenizer()
    batch = [item for item in items("train", 10) if item.task == "color"]
    inputs = encode(batch, tokenizer, config, with_answers=True)
    torch.manual_seed(0)
    logits = torch.randn(*inputs["input_ids"].shape, config.text_config.vocab_size)
    target = inputs["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                               reduction="none")
    # A colour item's row starts with a colour question: its answer and end token come first.
    first, rest = [], []
    for row, item in enumerate(batch):
        answered = (target[row] != -100).nonzero().flatten()
        spans = [len(tokenizer.encode(a, add_special_tokens=False)) + 1
                 for _, a in [(item.question, item.answer), *item.more]]
        kinds = [task_of_question(q) for q, _ in [(item.question, item.answer), *item.more]]
        start = 0
        for n, (span, kind) in enumerate(zip(spans, kinds)):
            if kind == "color":
                (first if n == 0 else rest).extend(losses[row, answered[start:start + span]].tolist())
            start += span
    by_hand = (3 * sum(first) + sum(rest)) / (3 * len(first) + len(rest))
    per_task = answer_loss_per_task(logits, inputs["labels"], batch, tokenizer, first_weight=3.0)
    torch.testing.assert_close(per_task["color"].item(), by_hand, rtol=1e-5, atol=1e-6)
    plain = answer_loss_per_task(logits, inputs["labels"], batch, tokenizer)["color"].item()
    assert plain == pytest.approx((sum(first) + sum(rest)) / (len(first) + len(rest)), rel=1e-5)
    # Per task, the weight goes by the first question's task: colour's own weight counts, others' do not.
    by_task = answer_loss_per_task(logits, inputs["labels"], batch, tokenizer,
                                   first_weight={**dict.fromkeys(TASKS, 1.0), "color": 3.0})
    torch.testing.assert_close(by_task["color"].item(), by_hand, rtol=1e-5, atol=1e-6)
    others = answer_loss_per_task(logits, inputs["labels"], batch, tokenizer,
                                  first_weight={**dict.fromkeys(TASKS, 3.0), "color": 1.0})
    assert others["color"].item() == pytest.approx(plain, rel=1e-5)


def test_task_weights_parse_and_refuse_unknown_tasks():
    assert parse_task_weights("chart:7, spatial:5") == {"text": 1.0, "chart": 7.0, "count": 1.0, "color": 1.0,
                                                          "spatial": 5.0}
    assert parse_task_weights("4") == dict.fromkeys(TASKS, 4.0)
    with pytest.raises(typer.BadParameter, match="TASK:WEIGHT"):
        parse_task_weights("charts:7")
    with pytest.raises(typer.BadParameter, match="WEIGHT a number") as refused:
        parse_task_weights("color:x", "--first-weight")
    assert refused.value.param_hint == "--first-weight"


def test_relation_weight_falls_on_the_shapes_labelled_with_a_relation_only():
    weights = region_class_weights(relation_weight=4.0)
    assert weights[REGIONS.index("background")] == pytest.approx(0.1)
    assert weights[REGIONS.index("red circle left")] == 4.0
    assert weights[REGIONS.index("red circle")] == 1.0
    assert weights[REGIONS.index("digit 3")] == 1.0
    assert (weights == 4.0).sum() == sum(name.split()[-1] in ("left", "right", "above", "below") for name in REGIONS)
    assert torch.equal(region_class_weights(), region_class_weights(1.0))


def test_training_continues_a_checkpoint_reproducibly_with_its_log_its_item_numbering_and_its_architecture(tmp_path):
    first, second, again = tmp_path / "first", tmp_path / "second", tmp_path / "again"
    common = ["--batch", "3", "--eval-every", "2", "--threads", "1", "--tasks", "text", "--no-speedups"]
    subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(first), "--steps", "2",
                    "--llm-layers", "3", "--llm-mlp", "64", *common], check=True, capture_output=True)
    for out in (second, again):
        subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(out), "--steps", "1",
                        "--init", str(first), *common], check=True, capture_output=True)
    continued, repeated = load_file(second / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(continued[name], repeated[name]) for name in continued), "a continued run is reproducible"
    earlier = (first / "training_log.jsonl").read_text().splitlines()
    rows = (second / "training_log.jsonl").read_text().splitlines()
    assert rows[:2] == earlier
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]
    assert "val" in json.loads(rows[-1])
    assert (second / "model.safetensors").exists()
    text = json.loads((second / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["intermediate_size"]) == (3, 64)
    refused = subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(tmp_path / "third"),
                              "--steps", "1", "--init", str(first), "--llm-layers", "4", *common],
                             capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert refused.returncode != 0 and "--llm-layers" in refused.stderr and "has 3, not 4" in refused.stderr


def test_an_isolated_question_gets_the_logits_it_gets_asked_alone():
    """With ``isolate_questions`` every question of a training row is predicted exactly as if it
    were the row's only question, as evaluation asks it; chained, later ones read earlier answers."""
    torch.manual_seed(0)
    model, tokenizer = new_model(0, llm_layers=2, llm_mlp=64).eval(), build_tokenizer()
    batch = [item for item in items("train", 10) if item.task in ("color", "spatial", "text")]
    inputs = encode(batch, tokenizer, model.config, with_answers=True)
    labels = inputs.pop("labels")
    isolated = isolate_questions(inputs, model)
    assert "questions" in inputs and inputs["attention_mask"].dim() == 2, "the caller's inputs are not changed"
    chained = {key: value for key, value in inputs.items() if key != "questions"}
    with torch.no_grad():
        logits, chained_logits = model(**isolated).logits, model(**chained).logits
        for row, item in enumerate(batch):
            answered = (labels[row, 1:] != -100).nonzero().flatten()
            start = 0
            for number, (question, answer) in enumerate([(item.question, item.answer), *item.more]):
                alone = encode([dataclasses.replace(item, question=question, answer=answer, more=())], tokenizer,
                               model.config, with_answers=True)
                target = alone.pop("labels")[0, 1:] != -100
                alone.pop("questions")
                expected = model(**alone).logits[0, :-1][target]
                positions = answered[start:start + len(expected)]
                torch.testing.assert_close(logits[row, :-1][positions], expected, atol=1e-4, rtol=1e-4)
                if number:
                    assert not torch.allclose(chained_logits[row, :-1][positions], expected, atol=1e-4)
                start += len(expected)
    assert start > len(expected), "the last row asked more than one question"


def test_isolating_questions_from_a_step_warms_the_learning_rate_up_again_to_the_restart_peak(tmp_path):
    """``--isolate-from`` with ``--restart-lr``: two cosine phases, each warming up and decaying on its own."""
    subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(tmp_path), "--steps", "6",
                    "--isolate-from", "3", "--restart-lr", "5e-4", "--warmup", "1", "--batch", "3",
                    "--eval-every", "6", "--threads", "1", "--tasks", "text", "--llm-layers", "2", "--llm-mlp", "64",
                    "--no-speedups"],
                   check=True, capture_output=True)
    rates = [json.loads(row)["lr"] for row in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([2e-3, 2e-3, 1.05e-3, 5e-4, 5e-4, 2.625e-4], rel=1e-2)
    refused = subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(tmp_path / "refused"),
                              "--steps", "6", "--restart-lr", "5e-4"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "300"})
    assert refused.returncode != 0 and "--restart-lr" in refused.stderr and "--isolate-from" in refused.stderr


def test_the_linear_patch_embedding_computes_what_the_convolution_does():
    model = new_model(0, llm_layers=1, llm_mlp=32)
    embed = model.model.visual.patch_embed
    pixels = torch.randn(40, embed.proj.weight[0].numel())
    expected = embed(pixels)
    linear_patch_embedding(model)
    assert "forward" in vars(embed), "the embedding was rewritten"
    torch.testing.assert_close(embed(pixels), expected, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_train_as_the_eager_model_does():
    """``--compile`` (the default) changes a step's speed, not what it computes: same logits and
    gradients as eager, up to float rounding, with every block run by a compiled graph."""
    torch._dynamo.reset()
    eager = new_model(0, llm_layers=2, llm_mlp=64).train()
    fast = copy.deepcopy(eager)
    linear_patch_embedding(fast)
    compile_blocks(fast)
    tokenizer = build_tokenizer()
    batch = items("train", 3, tasks=("text", "color"))
    inputs = encode(batch, tokenizer, eager.config, with_answers=True)
    labels = inputs.pop("labels")
    inputs.pop("questions")
    logits = {}
    for name, model in (("eager", eager), ("fast", fast)):
        with torch.enable_grad():  # the suite runs without autograd (conftest)
            logits[name] = model(**inputs).logits
            sum(answer_loss_per_task(logits[name], labels, batch, tokenizer).values()).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "a decoder layer and a vision block compiled"
    torch.testing.assert_close(logits["fast"], logits["eager"], rtol=1e-4, atol=1e-4)
    for (name, slow), fast_param in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(fast_param.grad, slow.grad, rtol=1e-3, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_padding_after_the_rows_keeps_every_answers_logits_without_a_mask():
    """``--speedups`` pads chained rows at their end and drops the attention mask: each answer
    token gets the logits and loss of the left-padded, masked batch."""
    model, tokenizer = new_model(0, llm_layers=2, llm_mlp=64).eval(), build_tokenizer()
    batch = items("train", 6, tasks=("text", "count", "spatial"))
    inputs = encode(batch, tokenizer, model.config, with_answers=True)
    labels = inputs.pop("labels")
    assert (inputs["attention_mask"] == 0).any(), "some rows are padded"
    before = {key: value.clone() for key, value in inputs.items()}
    moved, moved_labels = padding_after(inputs, labels)
    assert all(torch.equal(inputs[key], before[key]) for key in before), "the caller's inputs are not changed"
    assert "attention_mask" not in moved and "questions" not in moved
    assert (moved["input_ids"][:, 0] == tokenizer.bos_token_id).all(), "every row starts at its first column"
    chained = {key: value for key, value in inputs.items() if key != "questions"}
    padded_logits, moved_logits = model(**chained).logits, model(**moved).logits
    torch.testing.assert_close(moved_logits[:, :-1][moved_labels[:, 1:] != -100],
                               padded_logits[:, :-1][labels[:, 1:] != -100], rtol=1e-4, atol=1e-4)
    padded_loss = answer_loss_per_task(padded_logits, labels, batch, tokenizer)
    moved_loss = answer_loss_per_task(moved_logits, moved_labels, batch, tokenizer)
    for task, loss in padded_loss.items():
        torch.testing.assert_close(moved_loss[task], loss, rtol=1e-4, atol=1e-5)


def test_frozen_attention_leaves_the_last_layers_attention_as_it_was_and_trains_the_rest(tmp_path):
    subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(tmp_path), "--steps", "1",
                    "--batch", "3", "--threads", "1", "--tasks", "text", "--llm-layers", "2", "--llm-mlp", "64",
                    "--frozen-attention", "1", "--no-speedups"], check=True, capture_output=True)
    before, after = new_model(0, llm_layers=2, llm_mlp=64).state_dict(), load_model(tmp_path).state_dict()
    frozen = [name for name in before if "layers.1.self_attn" in name and "visual" not in name]
    trained = [name for name in before if "layers.0.self_attn" in name or "layers.1.mlp" in name]
    assert frozen and trained
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert not any(torch.equal(before[name], after[name]) for name in trained)
    refused = subprocess.run([sys.executable, "-m", "luvc.fidelity.train", "--out", str(tmp_path / "refused"),
                              "--llm-layers", "2", "--frozen-attention", "3"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "300"})
    assert refused.returncode != 0 and "--frozen-attention" in refused.stderr and "2 decoder layers" in refused.stderr
