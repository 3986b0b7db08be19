"""The same random model as a Hugging Face transformers model, built without a slow init.

``from_config`` runs every layer's initializer (260 s for a 6.7B model on an H200). Instead the
model is built with empty (meta) parameters under ``accelerate.init_empty_weights`` and then takes
our tensors with ``load_state_dict(assign=True)``: no init, no copy. Names map from pipo's canonical
block tensors (:mod:`pipo.io.spec`) to each family's HF names; OPT and the llama family are covered.
"""

from __future__ import annotations

from typing import Any

import torch

from pipo.errors import PipoError
from pipo.io.spec import ModelSpec, block_layer, block_part

_LLAMA_NAMES = {
    "embed": {"tok": "model.embed_tokens.weight"},
    "attn": {"norm_w": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
             "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
             "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
             "bo": "self_attn.o_proj.bias"},
    "mlp": {"norm_w": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
            "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
            "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias",
            "b_down": "mlp.down_proj.bias"},
    "head": {"norm_w": "model.norm.weight", "w_out": "lm_head.weight"},
}
_OPT_NAMES = {
    "embed": {"tok": "model.decoder.embed_tokens.weight",
              "pos": "model.decoder.embed_positions.weight"},
    "attn": {"norm_w": "self_attn_layer_norm.weight", "norm_b": "self_attn_layer_norm.bias",
             **{f"{k}{p}": f"self_attn.{proj}_proj.{kind}"
                for p, proj in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))
                for k, kind in (("w", "weight"), ("b", "bias"))}},
    "mlp": {"norm_w": "final_layer_norm.weight", "norm_b": "final_layer_norm.bias",
            "w_up": "fc1.weight", "b_up": "fc1.bias", "w_down": "fc2.weight",
            "b_down": "fc2.bias"},
    "head": {"norm_w": "model.decoder.final_layer_norm.weight",
             "norm_b": "model.decoder.final_layer_norm.bias", "w_out": "lm_head.weight"},
}
_LAYER_PREFIX = {"opt": "model.decoder.layers.{i}.", "llama": "model.layers.{i}."}


def hf_name(spec: ModelSpec, block: str, name: str) -> str:
    """The HF state-dict name of canonical tensor ``name`` of ``block``."""
    table = _OPT_NAMES if spec.family == "opt" else _LLAMA_NAMES
    part = block_part(block)
    layer = block_layer(block)
    prefix = "" if layer is None else _LAYER_PREFIX["opt" if spec.family == "opt" else "llama"]
    return prefix.format(i=layer) + table[part][name]


def hf_config(spec: ModelSpec):
    """A transformers config of ``spec``'s architecture (OPT or llama)."""
    import transformers

    if spec.family == "opt":
        return transformers.OPTConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.n_layers,
            ffn_dim=spec.ffn, num_attention_heads=spec.n_heads,
            max_position_embeddings=spec.max_positions, do_layer_norm_before=True,
            word_embed_proj_dim=spec.hidden, enable_bias=spec.attention_bias,
            tie_word_embeddings=spec.tie_embeddings, pad_token_id=spec.pad_id,
            bos_token_id=spec.bos_id, eos_token_id=None)
    if spec.family != "llama":
        raise PipoError(f"HF baselines support opt and llama shapes, not {spec.family}")
    scaling = spec.rope_scaling
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta} if scaling is None else {
        "rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_positions}
    return transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions, rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta, rope_scaling=rope, rope_parameters=rope,
        tie_word_embeddings=spec.tie_embeddings, attention_bias=spec.attention_bias,
        mlp_bias=spec.mlp_bias, pad_token_id=spec.pad_id, bos_token_id=spec.bos_id,
        eos_token_id=None)


def hf_state_dict(source, dtype: torch.dtype, *, own_copies: bool = False) -> dict[str, Any]:
    """HF-named tensors of every block of ``source`` in ``dtype``.

    Tensors are shared between layers when the source shares them, unless ``own_copies``
    (accelerate's offload bookkeeping wants one tensor per parameter).
    """
    out: dict[str, torch.Tensor] = {}
    cast: dict[int, torch.Tensor] = {}
    for block in source.spec.block_names():
        for name, value in source.read_block(block).items():
            if not isinstance(value, torch.Tensor):
                raise PipoError("HF baselines need dense weights (run them on fp16 workloads)")
            if id(value) not in cast:
                cast[id(value)] = value.to(dtype)
            tensor = cast[id(value)]
            out[hf_name(source.spec, block, name)] = tensor.clone() if own_copies else tensor
    return out


def build_hf_model(source, dtype: torch.dtype = torch.float32, *, own_copies: bool = False):
    """The transformers model of ``source``'s weights (on CPU, eval mode), built without init."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config(source.spec), dtype=dtype)
    state = hf_state_dict(source, dtype, own_copies=own_copies)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if source.spec.tie_embeddings:
        model.tie_weights()
    missing = [m for m in missing if not (source.spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise PipoError(f"HF model names do not match: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    return model.eval()
