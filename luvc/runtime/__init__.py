"""The shared runtime of a compiled VLM: what runs between and around the blocks of every family.

``compiled`` is the compiled model's forward (vision section, placeholder
rebuild, LLM section, decode); ``llm`` the decoder-layer and final-norm nodes
with their per-layer cache bookkeeping; ``sized_attention`` attention over
merged tokens that stand for several patches; ``vision_scores`` the attention
a vision token receives. Family adapters (``luvc.models``) build on these;
nothing here imports an adapter.
"""
