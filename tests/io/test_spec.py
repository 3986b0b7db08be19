"""ModelSpec from Hugging Face configs (made with transformers' own config classes), and name rules."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from pipo.errors import ModelFormatError
from pipo.io.hf_config import load_spec, spec_from_hf_config
from pipo.io.spec import SUPPORTED_FAMILIES, RopeScaling, compile_name_rules, match_name_rules

SIZES = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}


def test_llama_sizes_ids_and_defaults():
    config = LlamaConfig(**SIZES, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=[2, 7])
    spec = spec_from_hf_config(config.to_dict(), name="tiny")
    assert (spec.family, spec.vocab_size, spec.hidden, spec.n_layers) == ("llama", 100, 64, 3)
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.ffn) == (4, 2, 16, 96)
    assert (spec.max_positions, spec.norm_eps, spec.rope_theta) == (4096, 1e-6, 10000.0)
    assert (spec.bos_id, spec.eos_ids, spec.pad_id, spec.name) == (1, (2, 7), None, "tiny")
    assert not spec.tie_embeddings and not spec.attention_bias and not spec.mlp_bias
    assert spec.rope_scaling is None and spec.sliding_window is None
    assert spec.block_names()[:3] == ["embed", "L0.attn", "L0.mlp"] and spec.block_names()[-1] == "head"


def test_llama3_rope_scaling_both_spellings():
    config = LlamaConfig(**SIZES, max_position_embeddings=4096, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    expected = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=1024)
    v5 = spec_from_hf_config(config.to_dict())  # transformers 5 writes rope_parameters
    assert v5.rope_scaling == expected and v5.rope_theta == 500000.0
    v4 = {**LlamaConfig(**SIZES, max_position_embeddings=4096).to_dict(), "rope_theta": 500000.0}
    v4.pop("rope_parameters")
    v4["rope_scaling"] = {**LLAMA3_ROPE, "type": "llama3"}
    assert spec_from_hf_config(v4) == v5


def test_llama_biases_and_explicit_head_dim():
    config = LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True, head_dim=32, tie_word_embeddings=True)
    spec = spec_from_hf_config(config.to_dict())
    assert spec.attention_bias and spec.mlp_bias and spec.tie_embeddings and spec.head_dim == 32


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"type": "yarn", "factor": 4.0}])
def test_other_rope_scalings_are_refused(rope):
    config = {**LlamaConfig(**SIZES).to_dict(), "rope_scaling": rope}
    with pytest.raises(ModelFormatError, match="rope scaling type .* not supported"):
        spec_from_hf_config(config)


def test_mistral_records_sliding_window():
    spec = spec_from_hf_config(MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=512).to_dict())
    assert (spec.family, spec.n_kv_heads, spec.sliding_window, spec.head_dim) == ("mistral", 2, 512, 16)


def test_qwen2_has_qkv_bias():
    config = Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=5)
    spec = spec_from_hf_config(config.to_dict())
    assert spec.family == "qwen2" and spec.attention_bias and not spec.mlp_bias
    assert spec.tie_embeddings and spec.eos_ids == (5,)
    with pytest.raises(ModelFormatError, match="sliding_window"):
        spec_from_hf_config({**config.to_dict(), "use_sliding_window": True})


def test_opt_fields():
    config = OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=64)  # fmt: skip
    spec = spec_from_hf_config(config.to_dict())
    assert (spec.family, spec.hidden, spec.ffn, spec.n_heads, spec.n_kv_heads) == ("opt", 64, 96, 4, 4)
    assert (spec.max_positions, spec.norm_eps, spec.head_dim) == (128, 1e-5, 16)
    assert spec.tie_embeddings and spec.attention_bias and spec.mlp_bias
    assert (spec.bos_id, spec.eos_ids, spec.pad_id) == (2, (2,), 1)
    untied_key_absent = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings"}
    assert spec_from_hf_config(untied_key_absent).tie_embeddings  # OPT ties by default


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"do_layer_norm_before": False}, "OPT-350m-style post-norm models are not supported"),
        ({"word_embed_proj_dim": 32}, "word_embed_proj_dim"),
        ({"activation_function": "gelu"}, "activation 'gelu'"),
    ],
)
def test_unsupported_opt_variants(change, message):
    config = {**OPTConfig(hidden_size=64, num_attention_heads=4, word_embed_proj_dim=64).to_dict(), **change}
    with pytest.raises(ModelFormatError, match=message):
        spec_from_hf_config(config)


def test_unsupported_model_type_names_supported_families():
    with pytest.raises(ModelFormatError) as err:
        spec_from_hf_config({"model_type": "gpt_neox", "vocab_size": 10})
    assert "gpt_neox" in str(err.value) and all(f in str(err.value) for f in SUPPORTED_FAMILIES)


def test_missing_required_key():
    config = LlamaConfig(**SIZES).to_dict()
    del config["intermediate_size"]
    with pytest.raises(ModelFormatError, match="intermediate_size"):
        spec_from_hf_config(config)


def test_load_spec_from_directory(tmp_path):
    LlamaConfig(**SIZES).save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.family == "llama" and spec.name == tmp_path.name and spec.eos_ids == (2,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [9, 2, 8]}')
    assert load_spec(tmp_path).eos_ids == (2, 9, 8)
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        load_spec(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not a readable JSON config"):
        load_spec(tmp_path)


def test_name_rules_fill_templates_with_short_groups():
    rules = compile_name_rules(
        ((r"blk\.(?P<i>\d+)\.attn_(?P<p>q|output)\.(?P<k>weight|bias)", "L{i}.attn", "{k}{p}"),), prefix=r"(?:x\.)?"
    )
    assert match_name_rules(rules, "blk.3.attn_q.bias") == ("L3.attn", "bq")
    assert match_name_rules(rules, "x.blk.0.attn_output.weight") == ("L0.attn", "wo")
    assert match_name_rules(rules, "blk.0.attn_q.weight.extra") is None
