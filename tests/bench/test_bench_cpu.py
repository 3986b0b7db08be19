"""``pipo bench`` on the CPU: the command end to end on a tiny random model, and its parts.

Benchmarks are never timed in tests; these check that the command runs, writes valid JSON with
BENCH.md's fields and trace files, that the metric definitions hold on known numbers, that the
workload table matches BENCH.md's FlexGen command, that the random model and its transformers twin
produce the same tokens, and that the FlexGen shim gets past the tokenizer offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from pipo.bench import baselines, metrics
from pipo.bench.flexgen_shim import StubTokenizer
from pipo.bench.random_model import RandomModel
from pipo.bench.workloads import WORKLOADS, resolve
from pipo.cli import main
from pipo.errors import PipoError
from pipo.ops.traits import block_tensor_names

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"system", "schedule", "steps", "t_prefill_s", "t_decode_s", "prefill_tok_s",
            "decode_tok_s", "total_tok_s", "compute_busy_frac", "gpu_busy_frac", "nvml_util_pct",
            "h2d_nbytes_per_step", "link_gbps", "link_limit_s_per_step", "step_s",
            "achieved_h2d_gbps", "pipeline_efficiency", "peak_gpu_nbytes", "gpu_cap_nbytes",
            "pinned_nbytes", "host_data_nbytes", "torch_pinned_nbytes"}


def test_bench_runs_a_tiny_workload_end_to_end_and_writes_json_and_traces(tmp_path, capsys):
    out, traces = tmp_path / "bench.json", tmp_path / "traces"
    code = main(["bench", "--device", "cpu", "--workload", "quick", "--shape", "tiny-opt",
                 "--prompt-len", "8", "--gen-len", "4", "--batch", "4", "--micro-batch", "2",
                 "--out", str(out), "--trace-dir", str(traces)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["workload"]["shape"] == "tiny-opt" and doc["link_gbps"] > 0
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["torch"] == torch.__version__
    assert [r["schedule"] for r in doc["rows"]] == ["pipo", "flexgen", "sequential"]
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row) and "error" not in row
        assert row["steps"] == 4 and row["total_tok_s"] > 0 and row["decode_tok_s"] > 0
        assert row["total_tok_s"] == pytest.approx(4 * 4 / (row["t_prefill_s"] + row["t_decode_s"]))
        assert 0 < row["compute_busy_frac"] <= 1.0
        assert row["h2d_nbytes_per_step"] > 0 and row["pipeline_efficiency"] > 0
        trace = json.loads(Path(row["trace"]["chrome_trace"]).read_text())
        assert {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"} >= \
            {"compute", "load_weight", "load_kv", "save_kv"}
        assert Path(row["trace"]["timeline_png"]).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "total tok/s" in printed and "sequential" in printed


def test_bench_refuses_cuda_without_a_gpu_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda", "--workload", "quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


def test_bench_rejects_bad_choices_clearly(capsys):
    assert main(["bench", "--device", "cpu", "--workload", "smollm", "--baselines", "flexgen"]) == 2
    assert "one baseline: transformers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--schedules", "pipo,fast"])
    assert "unknown fast" in capsys.readouterr().err


def test_throughput_definitions_are_flexgens():
    t = metrics.throughput(batch=32, prompt_len=512, gen_len=32, prefill_s=2.0, decode_s=6.2)
    assert t.prefill_tok_s == pytest.approx(32 * 512 / 2.0)
    assert t.decode_tok_s == pytest.approx(32 * 31 / 6.2)
    assert t.total_tok_s == pytest.approx(32 * 32 / 8.2)


def test_busy_fraction_counts_overlapping_intervals_once():
    assert metrics.busy_fraction([(0.0, 1.0), (0.5, 1.5), (3.0, 4.0)], 5.0) == pytest.approx(0.5)
    assert metrics.busy_fraction([], 0.0) == 0.0


def test_w1_bytes_per_step_and_link_limit_match_bench_md():
    w = WORKLOADS["W1"]
    from pipo.plan import fixed_plan

    spec = w.spec()
    plan = fixed_plan(spec, {b: 1 for b in spec.block_names()}, "host", batch=w.batch,
                      micro_batch=w.micro_batch, max_len=w.prompt_len + w.gen_len, kv_offload=True)
    step = metrics.decode_step_bytes(spec, plan, prompt_len=w.prompt_len, gen_len=w.gen_len,
                                     dtype_nbytes=2)
    assert step.weights_nbytes / 1e9 == pytest.approx(13.3, rel=0.08)  # BENCH.md: 12.4 GB + head
    assert step.kv_load_nbytes / 1e9 == pytest.approx(8.9, rel=0.05)
    link = metrics.link_report(step, link_gbps=55.0, decode_s=31 * 0.5, n_decode_steps=31)
    assert w.batch / link.link_limit_s == pytest.approx(83, rel=0.08)  # BENCH.md: W1 ~83 tok/s
    assert link.pipeline_efficiency == pytest.approx(link.link_limit_s / 0.5)
    assert link.achieved_gbps == pytest.approx(step.h2d_nbytes / 0.5 / 1e9)


def test_workloads_give_bench_mds_flexgen_command():
    args = baselines.flexgen_args(WORKLOADS["W1"], "/tmp/off", "/tmp/log")
    assert " ".join(args[:15]) == ("--model facebook/opt-6.7b --path _DUMMY_ --offload-dir /tmp/off "
                                   "--percent 0 100 0 100 100 0 --gpu-batch-size 8")
    assert args[args.index("--num-gpu-batches") + 1] == "4"
    assert "--compress-weight" in baselines.flexgen_args(WORKLOADS["W2"], "o", "l")
    assert WORKLOADS["W3"].flexgen_percent() == (0, 100, 100, 0, 100, 0)
    assert WORKLOADS["W5"].flexgen_percent() is None


def test_resolve_overrides_fields_and_refuses_nonsense():
    w = resolve("W1", shape="tiny-llama", gen_len=5, batch=4)
    assert (w.shape, w.gen_len, w.batch, w.micro_batch, w.n_micro) == ("tiny-llama", 5, 4, 4, 1)
    with pytest.raises(PipoError, match="unknown workload"):
        resolve("W9")
    with pytest.raises(PipoError, match="micro_batch"):
        resolve("W1", batch=2, micro_batch=4)


def test_flexgen_output_is_parsed():
    text = ("peak gpu mem: 1.312 GB\tprojected: False\nprefill latency: 20.5 s\tprefill "
            "throughput: 799.2 token/s\ndecode latency: 1.2 s\tdecode throughput: 826.7 token/s\n"
            "total latency: 21.7 s\ttotal throughput: 47.3 token/s")
    found = baselines.parse_flexgen_output(text)
    assert found == {"prefill_tok_s": 799.2, "decode_tok_s": 826.7, "total_tok_s": 47.3,
                     "t_prefill_s": 20.5, "t_decode_s": 1.2, "peak_gpu_gb": 1.312}


def test_the_stub_tokenizer_left_pads_to_the_requested_length():
    out = StubTokenizer()(["Paris is the capital city of"], padding="max_length", max_length=12)
    assert out.input_ids == [[1, 1, 1, 1, 1, 2, 32826, 16, 5, 812, 343, 9]]


def test_the_flexgen_shim_gets_past_the_tokenizer_offline(tmp_path):
    """FlexGen from the carried wheels: it prints its sizes (after the tokenizer) and then, on a
    machine without CUDA, fails when it allocates on the GPU."""
    wheels = sorted((ROOT / "benchmarks" / "wheels").glob("*.whl"))
    if not any(w.name.startswith("flexgen-") for w in wheels):
        pytest.skip("no FlexGen wheel in benchmarks/wheels")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this would run FlexGen for real")
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    args = ["--model", "facebook/opt-125m", "--path", "_DUMMY_", "--offload-dir",
            str(tmp_path / "off"), "--percent", "0", "100", "0", "100", "100", "0",
            "--gpu-batch-size", "2", "--prompt-len", "16", "--gen-len", "2"]
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "pipo.bench.flexgen_shim", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    watchdog = threading.Timer(90, proc.kill)  # FlexGen's copy threads die first; it may hang
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("init weight..."):
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    out = "".join(seen)
    assert "model size:" in out and "init weight..." in out, out[-2000:]


@pytest.mark.parametrize("shape", ["tiny-opt", "tiny-llama"])
def test_random_model_has_every_canonical_tensor_and_no_zeros(shape):
    source = RandomModel(resolve("quick", shape=shape).spec())
    for block in source.spec.block_names():
        tensors = source.read_block(block)
        part = block if block in ("embed", "head") else block.split(".")[1]
        assert set(tensors) == set(block_tensor_names(source.spec, part))
        assert all(t.dtype == torch.float16 and t.abs().max() > 0 for t in tensors.values())
        assert source.block_nbytes(block) == sum(t.numel() * 2 for t in tensors.values())
    quant = RandomModel(source.spec, int4_group=32)
    assert type(quant.read_block("L0.mlp")["w_up"]).__name__ == "QuantTensor"
    assert quant.block_nbytes("L0.mlp") < source.block_nbytes("L0.mlp") / 2


@pytest.mark.parametrize("shape", ["tiny-opt", "tiny-llama"])
def test_transformers_twin_of_the_random_model_makes_pipos_tokens(shape):
    from pipo.bench.hf_models import build_hf_model
    from pipo.bench.pipo_runs import make_engine, make_source, random_prompts

    w = resolve("quick", shape=shape, prompt_len=8, gen_len=6, batch=2, micro_batch=1)
    source = make_source(w)
    prompts = random_prompts(w, w.prompt_len)
    prompts[1] = prompts[1][::-1]
    with make_engine(w, source, "cpu", "pipo", trace=False) as engine:
        want = engine.generate_ids(prompts, w.gen_len).tokens
    ids = torch.tensor(prompts)
    new, prefill_s, decode_s = baselines.hf_generate_timed(build_hf_model(source), ids,
                                                           torch.ones_like(ids), w.gen_len)
    assert new.tolist() == want and prefill_s > 0 and decode_s > 0


@pytest.mark.slow
def test_the_smollm_comparison_runs_and_both_sides_make_every_token():
    pytest.importorskip("gguf")
    from pipo.bench import cpu

    try:
        from pipo.io.default_model import default_model_path

        default_model_path()
    except PipoError:
        pytest.skip("default model not installed")
    result = cpu.run_smollm(batches=(2,), gen_len=4, repeats=1)
    row = result["rows"][0]
    assert row["tokens_per_row"] == [4, 4] and row["ratio"] > 0
    assert "| 2 | 4 |" in cpu.format_table(result)
