"""pipo.ops layer functions against transformers, on tiny random models of every family.

The pipo side runs two prompts of different lengths packed per row as the engine does (padded to a
bucket; prefill, then one token per row and step through the per-row KV caches); the reference
runs transformers on each prompt alone, without padding or cache.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pipo.errors import ModelFormatError
from pipo.io.spec import ModelSpec, RopeScaling
from pipo.ops.linear import linear
from pipo.ops.rope import rope_tables
from pipo.ops.rows import pack_rows, row_attention_inputs
from pipo.ops.traits import TRAITS, block_tensor_names, traits_for

from .reference import CASES, LLAMA3_ROPE, build_case, hf_generate, pipo_generate, spec_from_config

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 120, 33, 64]]
N_NEW = 9  # the prefill token, then 8 decode steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_transformers(case):
    model, spec, blocks = build_case(case)
    with torch.no_grad():
        tokens, logits, caches = pipo_generate(spec, blocks, PROMPTS, N_NEW)
    for row, prompt in enumerate(PROMPTS):
        want_tokens, want_logits = hf_generate(model, prompt, N_NEW)
        assert tokens[row].tolist() == want_tokens.tolist()
        for step in range(N_NEW):
            torch.testing.assert_close(logits[step][row], want_logits[step], atol=1e-4, rtol=0)
    for k_cache, v_cache in caches:  # padding's trash slot holds finite values: no NaN leaks
        assert torch.isfinite(k_cache).all() and torch.isfinite(v_cache).all()


@pytest.mark.parametrize("case", ["llama3", "opt"])
def test_bf16_prefill_matches_transformers_bf16(case):
    model, spec, blocks = build_case(case)
    blocks = {name: {k: t.to(torch.bfloat16) for k, t in w.items()} for name, w in blocks.items()}
    with torch.no_grad():
        _, logits, _ = pipo_generate(spec, blocks, PROMPTS, 1, dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    for row, prompt in enumerate(PROMPTS):
        _, want = hf_generate(model, prompt, 1)
        torch.testing.assert_close(logits[0][row], want[0], atol=0.05, rtol=0)  # a few bf16 ulps


def _tiny_spec(**overrides) -> ModelSpec:
    fields = dict(family="llama", vocab_size=128, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, ffn=96, max_positions=64)
    return ModelSpec(**(fields | overrides))


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "default", "rope_theta": 500000.0}])
def test_rope_tables_match_transformers(rope):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rope_parameters=rope)
    spec = spec_from_config(config)
    if rope["rope_type"] == "default":  # transformers keeps the default init inside the model class
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
        assert scale == 1.0
    angles = torch.outer(torch.arange(64).float(), inv_freq)
    cos, sin = rope_tables(spec, 64)
    assert cos.shape == sin.shape == (64, 16)
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos(), atol=0, rtol=0)
    torch.testing.assert_close(sin, torch.cat([angles, angles], -1).sin(), atol=0, rtol=0)


def test_llama3_scaling_touches_only_slow_frequencies():
    plain = rope_tables(_tiny_spec(), 8)[1]
    scaled = rope_tables(_tiny_spec(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)), 8)[1]
    assert torch.equal(plain[:, 0], scaled[:, 0])          # fastest frequency kept
    assert not torch.allclose(plain[:, 7], scaled[:, 7])   # slowest frequency divided by the factor


def test_pack_rows_positions_per_row_and_padding():
    rows = pack_rows([(0, 0, 3), (2, 5, 1)], bucket=6, trash=9, n_rows=3)
    assert rows.positions.tolist() == [0, 1, 2, 5, 0, 0]
    assert rows.kv_row.tolist() == [0, 0, 0, 2, 0, 0]
    assert rows.kv_slot.tolist() == [0, 1, 2, 5, 9, 9]       # padding writes the trash slot
    assert rows.step_rows.tolist() == [0, 2] and not rows.all_rows and rows.end == 6
    assert rows.query_pos.tolist() == [[0, 1, 2], [5, 0, 0]]


def test_row_attention_mask_sees_slots_up_to_each_query_position_per_row():
    spec = _tiny_spec()  # 4 query heads on 2 KV heads: each mask row repeats per head of a group
    rows = pack_rows([(0, 0, 3), (1, 2, 1)], bucket=4, trash=7, n_rows=2)
    mask = row_attention_inputs(rows, spec, None, torch.float32).mask
    assert mask.shape == (2, 1, 2 * 3, 3)
    prefill = [[True, False, False], [True, True, False], [True, True, True]]
    decode = [[True, True, True], [True, False, False], [True, False, False]]  # unused: position 0
    assert mask[0, 0].tolist() == prefill * 2 and mask[1, 0].tolist() == decode * 2
    keys, pos = torch.arange(rows.end), rows.query_pos            # the rule, for every row
    assert torch.equal(mask[:, 0, :3], keys[None, None] <= pos[:, :, None])


def test_linear_dense():
    x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
    torch.testing.assert_close(linear(x, w, b), x @ w.T + b)
    torch.testing.assert_close(linear(x, w), x @ w.T)


def test_linear_dispatches_quant_tensor_and_rejects_others(monkeypatch):
    quant = pytest.importorskip("pipo.ops.quant")
    dispatch = pytest.importorskip("pipo.ops.int4_dispatch")
    calls = []
    monkeypatch.setattr(dispatch, "int4_matmul", lambda x, w, b: calls.append((x, w, b)) or "int4")
    qw = object.__new__(quant.QuantTensor)  # only its type matters to the dispatch
    assert linear("x", qw, "b") == "int4" and calls == [("x", qw, "b")]
    with pytest.raises(TypeError):
        linear(torch.randn(2, 8), [[1.0]])


def test_traits_table_and_resolution():
    assert set(TRAITS) == {"llama", "mistral", "qwen2", "opt"}
    qwen = traits_for(_tiny_spec(family="qwen2"))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias) == (True, False, False)
    opt = traits_for(_tiny_spec(family="opt"))
    assert (opt.norm, opt.mlp, opt.positions, opt.position_offset) == ("layer", "relu", "learned", 2)
    assert opt.qkv_bias and opt.o_bias and opt.mlp_bias
    llama = traits_for(_tiny_spec(attention_bias=True))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias) == (True, True, False)
    assert block_tensor_names(_tiny_spec(), "mlp") == ("norm_w", "w_up", "w_down", "w_gate")


def test_unknown_family_is_a_model_format_error():
    with pytest.raises(ModelFormatError, match="not supported"):
        traits_for(_tiny_spec(family="gpt2"))
