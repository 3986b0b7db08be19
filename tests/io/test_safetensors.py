"""SafetensorsDir and open_model on tiny random models saved by transformers' ``save_pretrained``.

The expected tensor of every canonical name is taken from the HF *module* (``layer.self_attn.q_proj``
...), not from parameter names, so the test does not restate the reader's name table.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipo.errors import ModelFormatError
from pipo.io.safetensors_dir import SafetensorsDir
from pipo.io.source import WeightSource, open_model

LLAMA_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_SIZES)),
    "llama_tied_biased": lambda: LlamaForCausalLM(
        LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_SIZES, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_SIZES)),
    "opt": lambda: OPTForCausalLM(
        OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, word_embed_proj_dim=64)  # fmt: skip
    ),
}


def _linear(prefix, module):
    """``{w<prefix>: weight, b<prefix>: bias}`` of an nn.Linear (bias only when present)."""
    out = {f"w{prefix}": module.weight}
    if module.bias is not None:
        out[f"b{prefix}"] = module.bias
    return out


def _norm(module):
    """Canonical norm tensors of an RMSNorm / LayerNorm module."""
    out = {"norm_w": module.weight}
    if getattr(module, "bias", None) is not None:
        out["norm_b"] = module.bias
    return out


def _attn(norm, q, k, v, o):
    """Canonical attention block from its modules."""
    return {**_norm(norm), **_linear("q", q), **_linear("k", k), **_linear("v", v), **_linear("o", o)}


def expected_blocks(model) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical blocks read straight off the HF modules."""
    if isinstance(model, OPTForCausalLM):
        dec = model.model.decoder
        blocks = {"embed": {"tok": dec.embed_tokens.weight, "pos": dec.embed_positions.weight}}
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            blocks[f"L{i}.attn"] = _attn(layer.self_attn_layer_norm, att.q_proj, att.k_proj, att.v_proj, att.out_proj)
            mlp = {**_linear("_up", layer.fc1), **_linear("_down", layer.fc2)}
            blocks[f"L{i}.mlp"] = {**_norm(layer.final_layer_norm), **mlp}
        blocks["head"] = {**_norm(dec.final_layer_norm), "w_out": model.lm_head.weight}
        return blocks
    base = model.model
    blocks = {"embed": {"tok": base.embed_tokens.weight}}
    for i, layer in enumerate(base.layers):
        att, mlp = layer.self_attn, layer.mlp
        blocks[f"L{i}.attn"] = _attn(layer.input_layernorm, att.q_proj, att.k_proj, att.v_proj, att.o_proj)
        gated = {**_linear("_gate", mlp.gate_proj), **_linear("_up", mlp.up_proj), **_linear("_down", mlp.down_proj)}
        blocks[f"L{i}.mlp"] = {**_norm(layer.post_attention_layernorm), **gated}
    blocks["head"] = {**_norm(base.norm), "w_out": model.lm_head.weight}
    return blocks


def save_model(kind, directory, **save_kwargs):
    """Build a seeded tiny model of ``kind``, save it, and return it."""
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    model.save_pretrained(directory, **save_kwargs)
    return model


def assert_source_matches(source, model):
    """Every block equals the HF modules' parameters, exactly, with matching names and nbytes."""
    expected = expected_blocks(model)
    assert source.spec.block_names() == list(expected)
    for block, tensors in expected.items():
        got = source.read_block(block)
        assert set(got) == set(tensors), block
        for name, param in tensors.items():
            assert got[name].dtype == param.dtype and torch.equal(got[name], param.detach()), (block, name)
        assert source.block_nbytes(block) == sum(t.numel() * t.element_size() for t in got.values())


@pytest.mark.parametrize("kind", list(MODELS))
def test_single_file_equals_hf_parameters(kind, tmp_path):
    model = save_model(kind, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    source = open_model(tmp_path)
    assert isinstance(source, SafetensorsDir) and isinstance(source, WeightSource)
    assert_source_matches(source, model)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_sharded_equals_hf_parameters(kind, tmp_path):
    model = save_model(kind, tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_source_matches(open_model(tmp_path), model)


def test_bf16_is_returned_as_stored(tmp_path):
    torch.manual_seed(0)
    model = MODELS["llama"]().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert_source_matches(open_model(tmp_path), model)


def test_tensors_are_copies_not_file_views(tmp_path):
    model = save_model("llama", tmp_path)
    block = open_model(tmp_path).read_block("L0.mlp")
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    header_nbytes = int.from_bytes(data[:8], "little")
    data[8 + header_nbytes :] = bytes(len(data) - 8 - header_nbytes)  # zero every tensor in place
    with open(tmp_path / "model.safetensors", "r+b") as file:
        file.write(data)
    assert torch.equal(block["w_up"], model.model.layers[0].mlp.up_proj.weight.detach())


def test_truncated_file_is_reported_at_open(tmp_path):
    save_model("llama", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors is truncated"):
        open_model(tmp_path)


@pytest.mark.parametrize("garbage", [b"\xff" * 8, (20).to_bytes(8, "little") + b"{not json at all..."])
def test_corrupt_header_is_reported(tmp_path, garbage):
    save_model("llama", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(garbage + file.read_bytes()[len(garbage) :])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        open_model(tmp_path)


def test_missing_tensor_names_the_block(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"block L1\.mlp lacks tensor\(s\) w_down"):
        open_model(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    save_model("llama", tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        open_model(tmp_path)


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        open_model(tmp_path / "absent")
    with pytest.raises(ModelFormatError, match="not a model directory: expected config.json"):
        open_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match=r"not a model: expected a \.gguf file"):
        open_model(tmp_path / "notes.txt")
    LlamaConfig(**LLAMA_SIZES).save_pretrained(tmp_path / "config_only")
    with pytest.raises(ModelFormatError, match="holds neither model.safetensors"):
        open_model(tmp_path / "config_only")


def test_unprefixed_names_are_accepted(tmp_path):
    """Checkpoints saved from the base model (``layers.0...``) have no ``model.`` prefix."""
    from safetensors.torch import load_file, save_file

    model = save_model("llama", tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "bare")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    bare = {name.removeprefix("model."): t for name, t in tensors.items()}
    save_file(bare, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    assert_source_matches(open_model(tmp_path / "bare"), model)
