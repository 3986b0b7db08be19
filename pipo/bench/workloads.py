"""The benchmark workloads of ``BENCH.md`` as a table, and the model shapes they use.

A :class:`Workload` fixes everything that makes two numbers comparable: the model shape, prompt and
generation length, batch split, where weights and KV live, the weight dtype and the GPU memory cap.
``W1``–``W7`` are BENCH.md's table (OPT-6.7B shape unless noted); ``quick`` is a fast OPT-1.3B
iteration; ``smollm`` is the CPU comparison on the default real model (:mod:`pipo.bench.cpu`).
Command-line options override single fields (:func:`resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipo.errors import PipoError
from pipo.io.spec import ModelSpec, RopeScaling

GIB = 2**30


def _opt(name: str, hidden: int, n_layers: int, n_heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(family="opt", vocab_size=50272, hidden=hidden, n_layers=n_layers,
                     n_heads=n_heads, n_kv_heads=n_heads, head_dim=hidden // n_heads, ffn=ffn,
                     max_positions=2048, tie_embeddings=True, attention_bias=True, mlp_bias=True,
                     bos_id=2, eos_ids=(), pad_id=1, name=name)


def _llama(name: str, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int,
           vocab_size: int, max_positions: int = 8192,
           rope_scaling: RopeScaling | None = None) -> ModelSpec:
    return ModelSpec(family="llama", vocab_size=vocab_size, hidden=hidden, n_layers=n_layers,
                     n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=hidden // n_heads, ffn=ffn,
                     max_positions=max_positions, rope_theta=500000.0, norm_eps=1e-5, bos_id=1,
                     eos_ids=(), pad_id=0, name=name, rope_scaling=rope_scaling)


# Shapes: random weights of these architectures. eos_ids is empty so every run makes every token.
SHAPES: dict[str, ModelSpec] = {
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32, 8192),
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32, 16384),
    "opt-13b": _opt("opt-13b", 5120, 40, 40, 20480),
    "llama-3.1-8b": _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, 131072,
                           RopeScaling(8.0, 1.0, 4.0, 8192)),
    # Small shapes for tests and CPU smoke runs.
    "tiny-opt": replace(_opt("tiny-opt", 64, 2, 4, 128), vocab_size=512, max_positions=512),
    "tiny-llama": _llama("tiny-llama", 64, 2, 4, 2, 128, 512),
}


@dataclass(frozen=True)
class Workload:
    """One benchmark setting. ``placement`` is an EngineOptions placement (``host``: weights in CPU
    RAM, ``disk``: an offload store, ``auto``: pipo plans under ``gpu_memory``)."""

    id: str
    shape: str
    prompt_len: int
    gen_len: int
    batch: int
    micro_batch: int
    placement: str
    kv_offload: bool
    weights: str  # "fp16" or "int4"
    gpu_memory: int | None
    note: str = ""

    @property
    def n_micro(self) -> int:
        """Micro-batches per step."""
        return -(-self.batch // self.micro_batch)

    def spec(self) -> ModelSpec:
        """The model shape's spec."""
        return SHAPES[self.shape]

    def flexgen_percent(self) -> tuple[int, ...] | None:
        """FlexGen's ``--percent`` for this placement (``None`` when FlexGen has no equivalent)."""
        if self.placement != "host" or self.shape not in ("opt-1.3b", "opt-6.7b", "opt-13b"):
            return None
        return (0, 100, 0, 100, 100, 0) if self.kv_offload else (0, 100, 100, 0, 100, 0)


def _headline(id_: str, **fields) -> Workload:
    base = dict(shape="opt-6.7b", prompt_len=512, gen_len=32, batch=32, micro_batch=8,
                placement="host", kv_offload=True, weights="fp16", gpu_memory=6 * GIB)
    base.update(fields)
    return Workload(id_, **base)


WORKLOADS: dict[str, Workload] = {
    "W1": _headline("W1", note="weights CPU, KV CPU, fp16"),
    "W2": _headline("W2", weights="int4", note="weights CPU, KV CPU, int4"),
    "W3": _headline("W3", kv_offload=False, gpu_memory=None, note="weights CPU, KV GPU, fp16"),
    "W4": _headline("W4", kv_offload=False, weights="int4", gpu_memory=None,
                    note="weights CPU, KV GPU, int4"),
    "W5": _headline("W5", batch=1, micro_batch=1, placement="auto", kv_offload=False,
                    note="batch 1, pipo's own plan under the cap, fp16"),
    "W6": _headline("W6", placement="disk", weights="int4", note="weights on disk, KV CPU, int4"),
    "W7": _headline("W7", shape="opt-13b", weights="int4", note="OPT-13B, weights CPU, KV CPU"),
    "quick": _headline("quick", shape="opt-1.3b", prompt_len=256, gen_len=16, batch=8,
                       micro_batch=4, note="OPT-1.3B, weights CPU, KV CPU, fp16 (fast iteration)"),
}
SMOLLM = "smollm"
WORKLOAD_NAMES = (*WORKLOADS, SMOLLM)


def resolve(name: str, *, shape: str | None = None, prompt_len: int | None = None,
            gen_len: int | None = None, batch: int | None = None, micro_batch: int | None = None,
            gpu_memory: int | None = None, weights: str | None = None) -> Workload:
    """The workload ``name`` with any given field overridden; a clear error for unknown names."""
    if name not in WORKLOADS:
        raise PipoError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    if shape is not None and shape not in SHAPES:
        raise PipoError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    w = WORKLOADS[name]
    overrides = dict(shape=shape, prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                     gpu_memory=gpu_memory, weights=weights)
    w = replace(w, **{k: v for k, v in overrides.items() if v is not None})
    micro = micro_batch or min(w.micro_batch, w.batch)
    if micro > w.batch or w.gen_len < 2 or w.prompt_len < 1:
        raise PipoError(f"need micro_batch <= batch, gen_len >= 2 and prompt_len >= 1 "
                        f"(got {micro}, {w.batch}, {w.gen_len}, {w.prompt_len})")
    if w.prompt_len + w.gen_len > w.spec().max_positions:
        raise PipoError(f"prompt_len + gen_len exceeds the {w.shape} context of "
                        f"{w.spec().max_positions} tokens")
    return replace(w, micro_batch=micro)
