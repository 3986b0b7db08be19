"""The device-memory refusal: the minimum it quotes is exactly the smallest budget that plans, in
one unit, with advice in the caller's terms (CLI flags or keyword arguments), never repeating an
option already given."""

from __future__ import annotations

import re

import pytest

from graphs.golden.regen import golden_spec
from pipo.cli import main
from pipo.cli_options import parse_size
from pipo.errors import DeviceMemoryTooSmall, PlanError, mib_up
from pipo.io.spec import ModelSpec
from pipo.plan import estimate_block_nbytes, make_plan, minimum_device_memory
from tests.e2e.conftest import build_model

WIDE = ModelSpec("llama", vocab_size=3000, hidden=96, n_layers=3, n_heads=4, n_kv_heads=2,
                 head_dim=24, ffn=200, max_positions=512)
CASES = [  # (spec, plan arguments)
    (golden_spec(), dict(batch=1, max_len=64)),
    (golden_spec(), dict(batch=4, max_len=200, micro_batch=2, kv_offload=True)),
    (golden_spec(), dict(batch=3, max_len=17, n_weight_slots=3, schedule="flexgen",
                         n_kv_slots=3, kv_offload=True)),
    (WIDE, dict(batch=8, max_len=512)),
    (WIDE, dict(batch=2, max_len=33, n_weight_slots=1, kv_dtype_nbytes=2)),
]


@pytest.mark.parametrize("spec,args", CASES)
def test_the_minimum_plans_and_one_byte_less_is_refused_with_the_same_minimum(spec, args):
    sizes = estimate_block_nbytes(spec, 4)
    minimum = minimum_device_memory(spec, sizes, **{"kv_offload": False, **args})
    make_plan(spec, sizes, device_memory=minimum, **args)
    for short in (minimum - 1, minimum // 2, 1):
        with pytest.raises(DeviceMemoryTooSmall) as refused:
            make_plan(spec, sizes, device_memory=short, **args)
        assert refused.value.minimum_nbytes == minimum
        assert f"at least device_memory=int({mib_up(minimum)} * 2**20)" in str(refused.value)
    quoted = parse_size(f"{mib_up(minimum)}MiB")  # the value as a user types it back
    assert minimum <= quoted < minimum + 2**20 // 10
    make_plan(spec, sizes, device_memory=quoted, **args)
    assert int(float(mib_up(minimum)) * 2**20) >= minimum  # the Python API's quoted form


def test_kv_offload_advice_is_exact_and_only_given_when_it_helps():
    spec, args = WIDE, dict(batch=8, max_len=512)
    sizes = estimate_block_nbytes(spec, 4)
    with pytest.raises(DeviceMemoryTooSmall) as refused:
        make_plan(spec, sizes, device_memory=1, **args)
    offloaded = refused.value.kv_offload_minimum_nbytes
    assert offloaded == minimum_device_memory(spec, sizes, kv_offload=True, **args)
    assert offloaded < refused.value.minimum_nbytes
    make_plan(spec, sizes, device_memory=offloaded, kv_offload=True, **args)
    with pytest.raises(DeviceMemoryTooSmall) as again:
        make_plan(spec, sizes, device_memory=1, kv_offload=True, **args)
    assert again.value.kv_offload_minimum_nbytes is None
    assert "kv_offload" not in str(again.value)


def test_bad_arguments_are_still_plan_errors_not_budget_errors():
    sizes = estimate_block_nbytes(golden_spec(), 4)
    with pytest.raises(PlanError, match="micro_batch"):
        minimum_device_memory(golden_spec(), sizes, batch=2, max_len=8, micro_batch=3)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget-llama")
    build_model("llama", path)
    return path


def _refusal(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: ") and err.count("\n") == 1, err
    return err


def test_cli_quotes_a_minimum_that_works_as_typed_in_flags(capsys, tiny_llama):
    """The planner already considers offloading the KV cache: one minimum, no --kv-offload advice;
    pinning a choice (here a KV slot count) quotes the minimum with that pin."""
    base = ["info", str(tiny_llama), "--batch", "4", "--micro-batch", "2", "--max-len", "256"]
    err = _refusal(capsys, base + ["--device-memory", "1KiB"])
    assert "--device-memory 1024 bytes is too small" in err and "device_memory=" not in err
    quoted = re.findall(r"--device-memory ([0-9.]+MiB)", err)
    assert len(quoted) == 1 and "--kv-offload" not in err
    assert main(base + ["--device-memory", quoted[0]]) == 0
    capsys.readouterr()
    pinned = _refusal(capsys, base + ["--device-memory", "1KiB", "--kv-offload", "--kv-slots", "4"])
    quoted_pinned = re.findall(r"--device-memory ([0-9.]+MiB)", pinned)
    assert len(quoted_pinned) == 1 and parse_size(quoted_pinned[0]) >= parse_size(quoted[0])
    assert main(base + ["--device-memory", quoted_pinned[0], "--kv-offload", "--kv-slots", "4"]) == 0


def test_cli_never_prints_the_minimum_equal_to_the_refused_budget(capsys, tiny_llama):
    from pipo import load

    with load(tiny_llama, device_memory=1) as engine, pytest.raises(DeviceMemoryTooSmall) as r:
        engine.plan_for(1, 64)
    minimum = r.value.minimum_nbytes
    err = _refusal(capsys, ["info", str(tiny_llama), "--max-len", "64",
                            "--device-memory", str(minimum - 1)])
    given, wanted = re.search(r"--device-memory ([0-9.]+ MiB|\d+ bytes) is too small.*"
                              r"--device-memory ([0-9.]+)MiB", err).groups()
    assert given != f"{wanted} MiB"
    assert main(["info", str(tiny_llama), "--max-len", "64", "--device-memory", str(minimum)]) == 0


def test_python_api_names_keyword_arguments(tiny_llama):
    from pipo import load

    with load(tiny_llama, device_memory=1024, micro_batch=2) as engine, \
            pytest.raises(DeviceMemoryTooSmall) as r:
        engine.plan_for(4, 256)
    text = str(r.value)
    assert text.startswith("device_memory=1024 is too small")
    assert "device_memory=int(" in text and "--" not in text
