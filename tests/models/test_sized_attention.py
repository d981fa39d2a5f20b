"""Size-weighted attention equals proportional attention (a log-size bias on the logits): in the vision
tower always, in the LLM with ``proportional_llm_attention``."""

from __future__ import annotations

import pytest
import torch
from conftest import generate, greedy_without_cache
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

import luvc
from luvc.examples import build_model, model_config, vlm_inputs


def reference(attn, hidden, cu_seqlens, rope, sizes):
    """Eager attention with log(size) added to every key's logit, per cu_seqlens segment."""
    seq = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = hf.apply_rotary_pos_emb_vision(q, k, *rope)
    outs = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        logits = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling + sizes[a:b].log()
        outs.append(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[a:b]))
    return attn.proj(torch.cat(outs).reshape(seq, -1))


@pytest.mark.parametrize("family", ["qwen2-vl-tiny", "qwen2.5-vl-tiny"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_sized_attention_is_proportional_attention(attn_impl, family):
    model = build_model(family, attn=attn_impl)
    luvc.compile(model, "identity")
    visual = model.model.visual
    attn = visual.blocks[0].attn
    torch.manual_seed(0)
    hidden = torch.randn(20, visual.blocks[0].attn.qkv.in_features)
    positions = torch.rand(20, 2) * 6
    rope = visual.rotary_pos_emb(hidden, positions)
    cu_seqlens = torch.tensor([0, 12, 20], dtype=torch.int32)
    sizes = torch.randint(1, 5, (20,)).float()
    with torch.no_grad():
        out = attn(hidden, cu_seqlens=cu_seqlens, position_embeddings=rope, luvc_sizes=sizes)
        torch.testing.assert_close(out, reference(attn, hidden, cu_seqlens, rope, sizes), rtol=1e-4, atol=1e-5)
        plain = attn(hidden, cu_seqlens=cu_seqlens, position_embeddings=rope)
        ones = attn(hidden, cu_seqlens=cu_seqlens, position_embeddings=rope, luvc_sizes=torch.ones(20))
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_sized_clip_attention_is_proportional_attention(attn_impl):
    """The CLIP variant (LLaVA's tower), batched [images, tokens, dim], against a log-size bias."""
    model = build_model("llava-tiny", attn=attn_impl)
    luvc.compile(model, "identity")
    attn = model.model.vision_tower.encoder.layers[0].self_attn
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, attn.embed_dim)
    sizes = torch.randint(1, 5, (2, 9)).float()
    with torch.no_grad():
        out, _ = attn(hidden, None, luvc_sizes=sizes)
        shape = (2, 9, attn.num_heads, attn.head_dim)
        q, k, v = (proj(hidden).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale + sizes.log()[:, None, None, :]
        ref = attn.out_proj(torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(2, 9, -1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_flash_form_equals_the_bias_form():
    """FlashAttention's form (sizes in the values, q/k/v padded to one width) is exact, checked on CPU."""
    from luvc.runtime.sized_attention import log_sizes, size_weighted, unweight

    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 4, 10) for _ in range(3))  # [tokens, heads, head_dim]
    sizes = torch.randint(1, 6, (12,)).float()
    scale = 10 ** -0.5
    qp, kp, vp = size_weighted(q, k, v, sizes[:, None, None])
    assert qp.shape[-1] == kp.shape[-1] == vp.shape[-1] == 16
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flash_form = unweight(sdpa(*(t.transpose(0, 1) for t in (qp, kp, vp)), scale=scale).transpose(0, 1), 10)
    bias_form = sdpa(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=log_sizes(sizes, q.dtype), scale=scale)
    torch.testing.assert_close(flash_form, bias_form.transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_a_key_of_size_two_attends_like_two_copies_of_it():
    """The LLM's mask with ``key_sizes``: a merged key of size s weighs as s identical keys."""
    from luvc.runtime.llm import attention_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    twice = [0, 1, 1, 2]  # key 1 repeated, the query's own key last
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, twice], v[:, :, twice],
        attn_mask=attention_mask(torch.ones(1, 4, dtype=torch.bool), 1, "sdpa", torch.float32))
    for impl in ("sdpa", "eager"):
        mask = attention_mask(torch.ones(1, 3, dtype=torch.bool), 1, impl, torch.float32,
                              key_sizes=torch.tensor([[1.0, 2.0, 1.0]]))
        sized = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(sized, full, rtol=1e-5, atol=1e-6)


MERGE_THEN_PRUNE = {
    "name": "merge-then-prune", "proportional_llm_attention": True,
    "vision": [{"transform": "orthogonal_merge", "at": [1, 2], "params": {"ratio": 0.25}}],
    "llm": [{"transform": "spectrum_prune", "at": 1, "params": {"keep": 0.5}}],
}


@pytest.mark.parametrize("family", ["qwen2-vl-tiny", "llava-tiny"])
def test_proportional_llm_attention_changes_answers_only_where_tokens_merged(family, astronaut):
    inputs = vlm_inputs([[astronaut]], prompts=[(10, 11, 12)], config=model_config(family))
    model = build_model(family)
    plain = luvc.compile(model, {**MERGE_THEN_PRUNE, "proportional_llm_attention": False})(**inputs).logits
    luvc.uncompile(model)
    luvc.compile(model, {**MERGE_THEN_PRUNE, "vision": []})
    unmerged_sized = model(**inputs).logits
    luvc.uncompile(model)
    luvc.compile(model, {**MERGE_THEN_PRUNE, "vision": [], "proportional_llm_attention": False})
    torch.testing.assert_close(unmerged_sized, model(**inputs).logits)  # every size is 1: no change
    luvc.uncompile(model)
    luvc.compile(model, MERGE_THEN_PRUNE)
    sized = model(**inputs).logits
    assert not torch.allclose(sized, plain)
    torch.testing.assert_close(generate(model, inputs), greedy_without_cache(model, inputs, 4))  # the KV cache


def test_proportional_llm_attention_refuses_flash_attention(monkeypatch):
    model = build_model("qwen2-vl-tiny")
    monkeypatch.setattr(model.config.get_text_config(), "_attn_implementation", "flash_attention_2")
    with pytest.raises(luvc.CompileError, match="proportional_llm_attention"):
        luvc.compile(model, MERGE_THEN_PRUNE)
    assert getattr(model, "_luvc", None) is None
