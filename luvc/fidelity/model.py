"""The fidelity model: a small Qwen2-VL trained by the project on the task suite, and its inputs.

A real ``Qwen2VLForConditionalGeneration`` (14 px patches, a 1 x 1 merger, M-RoPE),
sized to train on a 2-core CPU: a 224 px image is 256 patches in the vision
tower and 256 tokens in the language model. Its tokenizer is word-level over
the suite's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from luvc.fidelity.tasks import SIZE, Item, vocabulary
from luvc.hf import set_attn_implementation

CHECKPOINT = Path(__file__).parent / "checkpoint"
SHIPPED = "luvc/fidelity/checkpoint (shipped)"  # how reports name CHECKPOINT, wherever luvc is installed
SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>", "<video>", "<vision_start>", "<vision_end>")
PATCH, MERGE, TEMPORAL = 14, 1, 2
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the special tokens, then every word of the suite."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + tuple(vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def fidelity_config(llm_layers: int = 8, llm_mlp: int = 384) -> Qwen2VLConfig:
    """The architecture the shipped checkpoint was trained with (by default; ``llm_layers`` and
    ``llm_mlp``, the LLM's depth and MLP width, try others)."""
    tokens = len(SPECIAL) + len(vocabulary())
    # rope_theta 1e4: with 32-dim heads, M-RoPE's height and width bands then turn slowly across the
    # image, as in the released models (1e6, 128-dim heads), so a question can find a visual token by
    # its content wherever it is. At theta 10 every band turned over a row of 16 patches and lookups by
    # content stayed near chance for 750 steps; where things are is the vision tower's to encode.
    text = dict(vocab_size=(tokens + 7) // 8 * 8, hidden_size=128, intermediate_size=llm_mlp,
                num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 7, 7], "rope_theta": 10000.0},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2, hidden_size=128, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                           vision_start_token_id=5, vision_end_token_id=6, tie_word_embeddings=True)
    return config


def new_model(seed: int = 0, attn: str = "sdpa", llm_layers: int = 8,
              llm_mlp: int = 384) -> Qwen2VLForConditionalGeneration:
    """The untrained fidelity model (``fidelity_config``'s architecture)."""
    config = fidelity_config(llm_layers, llm_mlp)
    for c in (config, config.text_config, config.vision_config):
        set_attn_implementation(c, attn)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def load_model(path: str | Path = CHECKPOINT, attn: str = "sdpa") -> Qwen2VLForConditionalGeneration:
    """A trained checkpoint (the shipped one by default), in eval mode."""
    path = Path(path)
    if not (path / "model.safetensors").exists() and not (path / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected config.json and model.safetensors "
                                "(train one with `python -m luvc.fidelity.train`)")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation=attn)
    model.generation_config.pad_token_id = 0
    return model.eval()


def load_tokenizer(path: str | Path = CHECKPOINT) -> PreTrainedTokenizerFast:
    path = Path(path)
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return build_tokenizer()


def patchify(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [patches, 3 * 2 * PATCH * PATCH] in the Qwen2-VL processor's layout
    (CLIP-normalised, the frame repeated to a temporal patch, merge units contiguous)."""
    h, w = image.shape[:2]
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    x = np.broadcast_to(x.transpose(2, 0, 1)[None], (TEMPORAL, 3, h, w))
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH))


def encode(batch: Sequence[Item], tokenizer, config, with_answers: bool = False) -> dict:
    """Model inputs for ``batch``: ``<bos> <vision_start> <image>*256 <vision_end> question``, left-padded.

    With ``with_answers`` (training), each row continues ``answer <eos>`` and
    then every other question about the same image with its answer, and
    ``labels`` mark the answer and end-of-sequence tokens: one image pass
    teaches several answers. ``questions`` numbers each token's question
    (1 for the first; 0 for padding and the image), for training that asks
    each one alone (``luvc.fidelity.train.isolate_questions``).
    """
    rows, labels, pixels, grids, questions = [], [], [], [], []
    for item in batch:
        h, w = item.image.shape[:2]
        gh, gw = h // PATCH, w // PATCH
        image = [config.vision_start_token_id] + [config.image_token_id] * (gh * gw // MERGE ** 2) + [
            config.vision_end_token_id]
        row = [tokenizer.bos_token_id] + image
        label = [-100] * len(row)
        question_of = [0] * len(row)
        pairs = [(item.question, item.answer), *item.more] if with_answers else [(item.question, None)]
        for number, (question, answer) in enumerate(pairs, 1):
            asked = tokenizer.encode(question, add_special_tokens=False)
            row += asked
            label += [-100] * len(asked)
            if answer is not None:
                target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
                row += target
                label += target
            question_of += [number] * (len(row) - len(question_of))
        rows.append(row)
        labels.append(label)
        questions.append(question_of)
        pixels.append(patchify(item.image))
        grids.append([1, gh, gw])
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.tensor(grids),
    }
    out["mm_token_type_ids"] = (out["input_ids"] == config.image_token_id).int()
    if with_answers:
        out["labels"] = torch.tensor([[-100] * (width - len(r)) + r for r in labels])
        out["questions"] = torch.tensor([[0] * (width - len(r)) + r for r in questions])
    return out


assert SIZE % (PATCH * MERGE) == 0
