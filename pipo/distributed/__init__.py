"""Batch generation on a Ray cluster: one pipo engine per Ray worker, Ray Data moving the rows.

pipo does not schedule across machines itself; it fits into Ray Data's offline-inference pattern:
``dataset.map_batches(PipoPredictor, fn_constructor_kwargs={"config": config}, ...)`` starts one
actor per worker, each opening one engine (its own weights placement, KV cache and lanes) with the
same :class:`~pipo.engine.EngineOptions`, and Ray handles placement, retries and data movement.

- :mod:`pipo.distributed.predictor`: :class:`GenerationConfig` (what every worker needs, picklable)
  and :class:`PipoPredictor` (the stateful callable). Neither imports Ray.
- :mod:`pipo.distributed.buckets`: length bucketing and putting rows back in input order (pure).
- :mod:`pipo.distributed.job`: ``pipo generate --input ... --ray``: the JSONL job on Ray Data.

Ray is an optional extra (``pip install -e .[ray]``); it is imported only by the job, when
``--ray`` is used. See docs/distributed.md.
"""

from pipo.distributed.predictor import GenerationConfig, PipoPredictor

__all__ = ["GenerationConfig", "PipoPredictor"]
