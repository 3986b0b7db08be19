"""Test helpers: tiny transformers models, their weights as pipo blocks, and two generation loops.

- :data:`CASES` builds a tiny Hugging Face model per family variant (fp32, fixed seed).
- :func:`spec_from_config` / :func:`blocks_from_model` are a minimal test-side stand-in for the real
  readers in ``pipo.io`` (HF config -> ModelSpec, HF parameter names -> canonical block dicts).
- :func:`pipo_generate` composes the pipo.ops layer functions the way the engine does (each step's
  tokens packed 1-D per row and padded to a bucket, :mod:`pipo.ops.rows`; prefill, then one token
  per row and step into the per-row KV caches); :func:`hf_generate` runs transformers on one
  prompt, recomputing the whole sequence each step, as the reference.
"""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from pipo.io.spec import ModelSpec, RopeScaling, block_layer, block_part
from pipo.ops.layers import embed, head, mlp_block
from pipo.ops.rope import rope_tables
from pipo.ops.rows import PackedRows, pack_rows, row_attention_block, row_attention_inputs
from pipo.ops.sampling import SamplingParams, sample
from pipo.ops.traits import block_tensor_names

SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA_LIKE = dict(SIZES, num_key_value_heads=2, intermediate_size=96, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, rope_parameters=LLAMA3_ROPE)),
    "llama_bias_tied": lambda: LlamaForCausalLM(LlamaConfig(
        **LLAMA_LIKE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "opt": lambda: OPTForCausalLM(OPTConfig(**SIZES, ffn_dim=96, word_embed_proj_dim=64, init_std=0.1,
                                            do_layer_norm_before=True, dropout=0.0)),
}

_DECODER = "model.layers.{i}."
HF_NAMES = {  # family -> block part -> canonical name -> HF parameter name
    "llama": {
        "embed": {"tok": "model.embed_tokens.weight"},
        "attn": {"norm_w": _DECODER + "input_layernorm.weight",
                 **{f"w{p}": _DECODER + f"self_attn.{p}_proj.weight" for p in "qkvo"},
                 **{f"b{p}": _DECODER + f"self_attn.{p}_proj.bias" for p in "qkvo"}},
        "mlp": {"norm_w": _DECODER + "post_attention_layernorm.weight",
                **{f"w_{p}": _DECODER + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
                **{f"b_{p}": _DECODER + f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}},
        "head": {"norm_w": "model.norm.weight", "w_out": "lm_head.weight"},
    },
    "opt": {
        "embed": {"tok": "model.decoder.embed_tokens.weight",
                  "pos": "model.decoder.embed_positions.weight"},
        "attn": {"norm_w": "model.decoder.layers.{i}.self_attn_layer_norm.weight",
                 "norm_b": "model.decoder.layers.{i}.self_attn_layer_norm.bias",
                 **{f"{k}{p}": f"model.decoder.layers.{{i}}.self_attn.{n}_proj.{kind}"
                    for p, n in zip("qkvo", ("q", "k", "v", "out"))
                    for k, kind in (("w", "weight"), ("b", "bias"))}},
        "mlp": {"norm_w": "model.decoder.layers.{i}.final_layer_norm.weight",
                "norm_b": "model.decoder.layers.{i}.final_layer_norm.bias",
                "w_up": "model.decoder.layers.{i}.fc1.weight", "b_up": "model.decoder.layers.{i}.fc1.bias",
                "w_down": "model.decoder.layers.{i}.fc2.weight",
                "b_down": "model.decoder.layers.{i}.fc2.bias"},
        "head": {"norm_w": "model.decoder.final_layer_norm.weight",
                 "norm_b": "model.decoder.final_layer_norm.bias", "w_out": "lm_head.weight"},
    },
}
HF_NAMES["mistral"] = HF_NAMES["qwen2"] = HF_NAMES["llama"]


def build_case(name: str, seed: int = 0):
    """(hf_model in eval mode, ModelSpec, {block name: canonical weights}) for a CASES entry."""
    torch.manual_seed(seed)
    model = CASES[name]().eval()
    spec = spec_from_config(model.config)
    return model, spec, blocks_from_model(model, spec)


def spec_from_config(c) -> ModelSpec:
    """Minimal HF config -> ModelSpec for the tiny test models."""
    family = c.model_type
    if family == "opt":
        return ModelSpec(family="opt", vocab_size=c.vocab_size, hidden=c.hidden_size,
                         n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                         n_kv_heads=c.num_attention_heads, head_dim=c.hidden_size // c.num_attention_heads,
                         ffn=c.ffn_dim, max_positions=c.max_position_embeddings,
                         tie_embeddings=True, attention_bias=c.enable_bias, mlp_bias=c.enable_bias)
    rope = c.rope_parameters
    scaling = None
    if rope.get("rope_type") == "llama3":
        scaling = RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                              rope["original_max_position_embeddings"])
    return ModelSpec(family=family, vocab_size=c.vocab_size, hidden=c.hidden_size,
                     n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                     ffn=c.intermediate_size, max_positions=c.max_position_embeddings,
                     norm_eps=c.rms_norm_eps, rope_theta=rope["rope_theta"], rope_scaling=scaling,
                     tie_embeddings=c.tie_word_embeddings,
                     attention_bias=bool(getattr(c, "attention_bias", False)),
                     mlp_bias=bool(getattr(c, "mlp_bias", False)))


def blocks_from_model(model, spec: ModelSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Every block's canonical weights; fails if a name is unmapped or an HF parameter goes unused."""
    state = dict(model.named_parameters(remove_duplicate=False))
    names = HF_NAMES[spec.family]
    used, blocks = set(), {}
    for block in spec.block_names():
        layer, part = block_layer(block), block_part(block)
        hf = {canon: names[part][canon].format(i=layer) for canon in block_tensor_names(spec, part)}
        blocks[block] = {canon: state[key].detach() for canon, key in hf.items()}
        used |= set(hf.values())
    assert used == set(state), f"unused HF parameters: {sorted(set(state) - used)}"
    return blocks


def packed_step(tokens: list[list[int]], starts: list[int], pad: int, trash: int
                ) -> tuple[torch.Tensor, PackedRows, torch.Tensor]:
    """(ids [1, T], PackedRows, index [b] of each row's last token) for one step: row i's
    ``tokens[i]`` at positions ``starts[i]..``, then ``pad`` padding tokens (id 0, KV to ``trash``)."""
    feed = [(row, start, len(seq)) for row, (start, seq) in enumerate(zip(starts, tokens))]
    flat = [i for seq in tokens for i in seq]
    rows = pack_rows(feed, len(flat) + pad, trash, len(tokens))
    ids = torch.tensor([flat + [0] * pad])                             # [1, T]
    last = torch.tensor([len(seq) for seq in tokens]).cumsum(0) - 1    # [b]
    return ids, rows, last


def pipo_generate(spec: ModelSpec, blocks: dict, prompts: list[list[int]], n_new: int,
                  params: SamplingParams = SamplingParams(), dtype: torch.dtype = torch.float32,
                  pad: int = 3):
    """Generate n_new tokens per prompt the engine's way: (tokens [b, n_new], [logits [b, V]] * n_new).

    ``dtype`` is the compute dtype: the caller passes ``blocks`` already in it, as the engine does.
    Every step is padded with ``pad`` tokens whose KV goes to the trash slot (the caches' last);
    also returns the KV caches so tests can check that the trash slot stayed finite.
    """
    b, trash = len(prompts), max(len(p) for p in prompts) + n_new
    shape = (b, spec.n_kv_heads, trash + 1, spec.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(spec.n_layers)]
    rope = rope_tables(spec, spec.max_positions)
    feed, starts, tokens, all_logits = [list(p) for p in prompts], [0] * b, [], []
    for _ in range(n_new):
        ids, rows, last = packed_step(feed, starts, pad, trash)
        prep = row_attention_inputs(rows, spec, rope, dtype)
        x = embed(blocks["embed"], ids, rows.positions[None], spec)   # [1, T, hidden]
        for layer, (k_cache, v_cache) in enumerate(caches):
            x = row_attention_block(blocks[f"L{layer}.attn"], x, k_cache, v_cache, prep, spec)
            x = mlp_block(blocks[f"L{layer}.mlp"], x, spec)            # [1, T, hidden]
        logits = head(blocks["head"], x[0, last], spec)                # [b, V]
        starts = [s + len(f) for s, f in zip(starts, feed)]
        new = sample(logits, params)                                   # [b]
        feed = [[int(i)] for i in new]
        tokens.append(new[:, None])
        all_logits.append(logits)
    return torch.cat(tokens, dim=1), all_logits, caches


@torch.no_grad()
def hf_generate(model, prompt: list[int], n_new: int):
    """Greedy reference on one unpadded prompt: (tokens [n_new], [logits [V]] * n_new)."""
    seq = torch.tensor([prompt])                                       # [1, t]
    tokens, all_logits = [], []
    for _ in range(n_new):
        logits = model(seq).logits[0, -1].float()                     # [V]
        token = int(logits.argmax())
        tokens.append(token)
        all_logits.append(logits)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)         # [1, t+1]
    return torch.tensor(tokens), all_logits
