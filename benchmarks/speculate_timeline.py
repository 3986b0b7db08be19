"""Timeline PNG of speculative rounds: the int4 draft's DraftStep tasks on the compute lane while
the verify pass's first weight blocks stream from disk.

Example (from the repo root): ``PYTHONPATH=. python benchmarks/speculate_timeline.py --model
/tmp/smol-fp32 --out docs/img/speculate_round.png`` (the model: an offload store, ``pipo convert``).
"""

from __future__ import annotations

import argparse

from pipo.engine import Engine, EngineOptions
from pipo.engine.drafts import make_draft
from pipo.engine.speculate import Speculator
from pipo.io.source import open_model
from pipo.runtime.trace import timeline_png


def main() -> None:
    """Generate a few tokens speculatively with tracing on; draw one verify round."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weight-slots", type=int, default=4)
    args = p.parse_args()
    options = EngineOptions(placement="disk", trace=True, n_weight_slots=args.weight_slots)
    with Engine(open_model(args.model), options) as engine:
        ids = engine.tokenizer.encode("def fibonacci(n):")
        draft = make_draft("int4", engine, 128)
        spec = Speculator(engine, draft, k=4, adaptive=False)
        spec.generate_ids([ids], 12)
        spec.generate_ids([ids], 12)  # the second run is warm (kernels compiled)
        draft.close()
        rounds = spec.step_stats[1:]
        stats = max(rounds, key=lambda s: sum(r.name.startswith("DraftStep") for r in s.records))
        timeline_png(stats, args.out, title="verify pass with 4 draft steps (int4 draft, "
                                             "weights streamed from disk)")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
