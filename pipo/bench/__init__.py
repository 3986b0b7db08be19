"""``pipo bench``: benchmark workloads, random-weight models, metrics and baselines (BENCH.md).

Modules: :mod:`~pipo.bench.cli` (the command), :mod:`~pipo.bench.workloads` (W1–W7, quick,
smollm), :mod:`~pipo.bench.random_model` (fast random weights), :mod:`~pipo.bench.metrics`
(throughput, busy %, link limit, efficiency), :mod:`~pipo.bench.pipo_runs` (pipo's rows),
:mod:`~pipo.bench.baselines` (FlexGen, HF accelerate, transformers), :mod:`~pipo.bench.cpu`
(the CPU comparison on the default model), :mod:`~pipo.bench.steptrace` (one step's timeline).
"""
