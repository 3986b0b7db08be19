"""pipo against transformers and llama.cpp on the CPU, on the default real model (``pipo bench
--device cpu``).

All run SmolLM2-135M-Instruct with the *same* weights: pipo's default CPU path computes on the
GGUF's 4-bit blocks (torch's int4 kernel, Q8_0 head), transformers loads the same file with
``gguf_file=`` (dequantized, fp32), llama.cpp (llama-cpp-python, when installed: the ``llama``
extra) runs the GGUF itself, one prompt after another (its Python API decodes one sequence at a
time, so at batch > 1 its row is the prompts in turn). Same prompts
(pipo's tokenizer; left padding and the mask built once, used by both), greedy, exactly ``gen_len``
new tokens per row (eos ignored: pipo through a spec without eos ids, transformers through
``min_new_tokens``). Each side is warmed up once, then the two alternate ``repeats`` times and the
median of each is reported, so a noisy machine hits both alike. Throughput is BENCH.md's total
generation throughput (batch × gen_len / wall time of the generate call); prefill and decode are
split at the first new token.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from pipo.bench.baselines import hf_generate_timed

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "What is 17 times 23?",
    "Explain in one sentence why the sky is blue.",
    "List three fruits that are red:",
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you?",
)


class _NoEos:
    """A weight source seen through a spec without eos ids, so generation never stops early."""

    def __init__(self, source):
        self._source = source
        self.dropped_eos_ids = source.spec.eos_ids
        self.spec = dataclasses.replace(source.spec, eos_ids=())

    def __getattr__(self, name: str):
        return getattr(self._source, name)


def open_pipo(schedule: str = "pipo", trace: bool = False):
    """The pipo engine on the default model (CPU, its default path, everything resident)."""
    from pipo.engine import Engine, EngineOptions
    from pipo.io.source import open_model

    return Engine(_NoEos(open_model(None)), EngineOptions(device="cpu", schedule=schedule,
                                                          trace=trace))


def open_transformers(gguf_path):
    """transformers' LlamaForCausalLM from the same GGUF, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def encode(engine, batch: int) -> list[list[int]]:
    """Token ids of the first ``batch`` prompts (cycled when ``batch`` exceeds them)."""
    return [engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]


def time_pipo(engine, prompts: list[list[int]], gen_len: int) -> dict[str, Any]:
    """One timed pipo generation: tokens, wall, prefill and decode seconds."""
    t0 = time.perf_counter()
    gen = engine.generate_ids(prompts, gen_len)
    wall_s = time.perf_counter() - t0
    return {"tokens": gen.tokens, "wall_s": wall_s, "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, longest] left-padded with ``pad_id`` and their mask (bool, True at real
    tokens): transformers' batched input (pipo itself packs rows, no padding)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p):] = True
    return ids, mask


def time_hf(model, prompts: list[list[int]], gen_len: int, eos_id: int,
            pad_id: int) -> dict[str, Any]:
    """One timed transformers generation, same fields as :func:`time_pipo`."""
    ids, mask = left_pad(prompts, pad_id)
    t0 = time.perf_counter()
    new, prefill_s, decode_s = hf_generate_timed(model, ids, mask.long(), gen_len, eos_token_id=eos_id,
                                                 pad_token_id=pad_id)
    wall_s = time.perf_counter() - t0
    return {"tokens": new.tolist(), "wall_s": wall_s, "prefill_s": prefill_s, "decode_s": decode_s}


def _until(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens before the first eos: there transformers' ``min_new_tokens`` forbids eos, pipo (eos
    ignored) takes it, so later tokens legitimately differ."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def _summary(runs: list[dict], batch: int, gen_len: int) -> dict[str, Any]:
    wall_s = statistics.median(r["wall_s"] for r in runs)
    return {"tok_s": batch * gen_len / wall_s, "wall_s": wall_s,
            "wall_s_all": [round(r["wall_s"], 4) for r in runs],
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_s": statistics.median(r["decode_s"] for r in runs)}


def open_llama():
    """llama.cpp on the default GGUF with torch's thread count, or ``None`` when not installed."""
    from pipo.bench import llama_cpp
    from pipo.io.default_model import default_model_path

    if not llama_cpp.available():
        return None
    return llama_cpp.load(default_model_path(), n_threads=torch.get_num_threads(), n_ctx=1024)


def _llama_side(llm, prompts: list[list[int]], gen_len: int, repeats: int) -> dict[str, Any]:
    """llama.cpp's summary on the same prompts (a warm-up, then ``repeats`` runs)."""
    from pipo.bench import llama_cpp

    llama_cpp.sequential_timed(llm, prompts[:1], 4)
    runs = [llama_cpp.sequential_timed(llm, prompts, gen_len) for _ in range(repeats)]
    return _summary(runs, len(prompts), gen_len)


def compare_batch(engine, model, batch: int, gen_len: int, repeats: int, llm=None) -> dict[str, Any]:
    """pipo and transformers alternated ``repeats`` times on one batch size; medians and ratio.
    With ``llm`` (llama.cpp), its runs follow on the same prompts, and its ratio too."""
    prompts = encode(engine, batch)
    eos_id = engine.source.dropped_eos_ids[0]
    pad_id = engine.spec.pad_id if engine.spec.pad_id is not None else eos_id
    time_pipo(engine, prompts, 4)  # warm-up: compiles the step graphs, places weights
    time_hf(model, prompts, 4, eos_id, pad_id)
    pipo_runs, hf_runs = [], []
    for _ in range(repeats):
        pipo_runs.append(time_pipo(engine, prompts, gen_len))
        hf_runs.append(time_hf(model, prompts, gen_len, eos_id, pad_id))
    same = sum(_until(p, eos_id) == h[:len(_until(p, eos_id))]
               for p, h in zip(pipo_runs[0]["tokens"], hf_runs[0]["tokens"]))
    pipo, hf = _summary(pipo_runs, batch, gen_len), _summary(hf_runs, batch, gen_len)
    row = {"batch": batch, "gen_len": gen_len, "repeats": repeats, "pipo": pipo,
           "transformers": hf, "ratio": pipo["tok_s"] / hf["tok_s"],
           "rows_equal_until_eos": f"{same}/{batch}",
           "tokens_per_row": [len(t) for t in pipo_runs[0]["tokens"]]}
    if llm is not None:
        row["llama.cpp"] = _llama_side(llm, prompts, gen_len, repeats)
        row["ratio_llama"] = pipo["tok_s"] / row["llama.cpp"]["tok_s"]
    return row


def run_smollm(batches=(1, 8), gen_len: int = 64, repeats: int = 3,
               schedule: str = "pipo") -> dict[str, Any]:
    """The whole CPU comparison: one entry per batch size."""
    from pipo.io.default_model import default_model_path

    engine, llm = open_pipo(schedule), open_llama()
    try:
        model = open_transformers(default_model_path())
        rows = [compare_batch(engine, model, b, gen_len, repeats, llm) for b in batches]
    finally:
        engine.close()
        if llm is not None:
            llm.close()
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF; pipo " + engine.options.weights
                     + ", transformers dequantized fp32)",
            "llama.cpp": "llama-cpp-python" if llm is not None else "not installed: pip install -e .[llama]",
            "schedule": schedule, "torch_threads": torch.get_num_threads(), "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    lines = ["| batch | new tokens | pipo tok/s | transformers tok/s | pipo / transformers "
             "| rows equal until eos | llama.cpp tok/s | pipo / llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        llama = (f"{r['llama.cpp']['tok_s']:.1f} | {r['ratio_llama']:.2f}x" if "llama.cpp" in r
                 else f"{result.get('llama.cpp', '-')} | -")
        lines.append(f"| {r['batch']} | {r['gen_len']} | {r['pipo']['tok_s']:.1f} | "
                     f"{r['transformers']['tok_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['rows_equal_until_eos']} | {llama} |")
    return "\n".join(lines)
