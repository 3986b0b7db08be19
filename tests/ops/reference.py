"""Test helpers: tiny transformers models, their weights as pipo blocks, and two generation loops.

- :data:`CASES` builds a tiny Hugging Face model per family variant (fp32, fixed seed).
- :func:`spec_from_config` / :func:`blocks_from_model` are a minimal test-side stand-in for the real
  readers in ``pipo.io`` (HF config -> ModelSpec, HF parameter names -> canonical block dicts).
- :func:`pipo_generate` composes the pipo.ops layer functions the way the engine does (padded batch,
  prefill, then one token per step into the KV caches); :func:`hf_generate` runs transformers on one
  unpadded prompt, recomputing the whole sequence each step, as the reference.
"""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from pipo.io.spec import ModelSpec, RopeScaling, block_layer, block_part
from pipo.ops.layers import attention_block, embed, head, mlp_block, positions_from_mask, rope_tables
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


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, T], mask [b, T] bool) with every prompt right-aligned behind pad_id."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])   # [b, T]
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])  # [b, T]
    return ids, mask


def pipo_generate(spec: ModelSpec, blocks: dict, prompts: list[list[int]], n_new: int,
                  params: SamplingParams = SamplingParams(), dtype: torch.dtype = torch.float32):
    """Generate n_new tokens per prompt the engine's way: (tokens [b, n_new], [logits [b, V]] * n_new).

    ``dtype`` is the compute dtype: the caller passes ``blocks`` already in it, as the engine does.
    Also returns the KV caches so tests can check that pad slots stayed finite.
    """
    ids, mask = left_pad(prompts)                                      # [b, T] each
    b, width = ids.shape
    capacity = width + n_new
    shape = (b, spec.n_kv_heads, capacity, spec.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(spec.n_layers)]
    rope = rope_tables(spec, spec.max_positions)
    start, tokens, all_logits = 0, [], []
    for _ in range(n_new):
        positions = positions_from_mask(mask)[:, start:]               # [b, t]
        x = embed(blocks["embed"], ids, positions, spec)               # [b, t, hidden]
        for layer, (k_cache, v_cache) in enumerate(caches):
            x = attention_block(blocks[f"L{layer}.attn"], x, k_cache, v_cache, start, positions,
                                mask, spec, rope)                      # [b, t, hidden]
            x = mlp_block(blocks[f"L{layer}.mlp"], x, spec)            # [b, t, hidden]
        logits = head(blocks["head"], x[:, -1], spec)                  # [b, V]
        start += ids.shape[1]
        ids = sample(logits, params)[:, None]                          # [b, 1]
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], dim=1)  # [b, start+1]
        tokens.append(ids)
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
