"""Tiny random models saved by transformers, and transformers' own greedy output on them."""

from __future__ import annotations

import pytest
import torch

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict()),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True)),
}
PROMPTS = [[3, 17, 42, 8, 99, 5, 61], [7, 12, 88]]
NEW_TOKENS = 32
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
SMOL_NEW_TOKENS = 24


def make_config(family: str):
    """A tiny config of ``family``: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128."""
    import transformers

    class_name, extra = FAMILY_CONFIGS[family]
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if family == "opt":
        common.update(dict(num_hidden_layers=2, enable_bias=True))
    else:
        common.update(dict(intermediate_size=128, num_key_value_heads=2))
    return getattr(transformers, class_name)(**common, **extra)


def build_model(family: str, path):
    """Random fp32 model of ``family`` saved at ``path``; returns the HF model (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(make_config(family), dtype=torch.float32).eval()
    with torch.no_grad():  # larger-than-default weights so greedy tokens vary
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompts, new_tokens):
    """transformers' greedy tokens and per-step logits, each prompt run alone (no padding)."""
    out = []
    for prompt in prompts:
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True)
        tokens = gen.sequences[0, len(prompt):].tolist()
        out.append((tokens, torch.stack([step[0] for step in gen.logits]).float()))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (path, reference)} for every family, built once per test session."""
    models = {}
    for family in FAMILY_CONFIGS:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        model = build_model(family, path)
        models[family] = (path, hf_greedy(model, PROMPTS, NEW_TOKENS))
    return models


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' greedy completions of SMOL_PROMPTS on the default GGUF (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipo.io.default_model import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    texts = []
    for prompt in SMOL_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=SMOL_NEW_TOKENS, do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
