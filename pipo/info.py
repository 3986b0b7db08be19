"""``pipo info``: a readable description of a model and of the plan for a budget."""

from __future__ import annotations

from collections import Counter

from pipo.plan import Plan, estimate_block_nbytes


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def describe(engine, plan: Plan) -> str:
    """Architecture, parameter count, bytes per block, and where the plan puts each block."""
    spec = engine.spec
    from pipo.engine.weights import placed_sizes

    sizes = placed_sizes(engine.source, engine.device, engine.dtype, engine.options.int4_group())
    n_params = sum(estimate_block_nbytes(spec, 1).values())
    if spec.tie_embeddings:
        n_params -= spec.vocab_size * spec.hidden
    lines = [
        f"model       {spec.name or engine.source.path}",
        f"family      {spec.family}: {spec.n_layers} layers, hidden {spec.hidden}, ffn {spec.ffn}, "
        f"{spec.n_heads} heads / {spec.n_kv_heads} KV heads of {spec.head_dim}, "
        f"vocab {spec.vocab_size}, context {spec.max_positions}",
        f"parameters  {n_params / 1e6:.1f} M",
        f"blocks      embed {_size(sizes['embed'])}, attn {_size(sizes['L0.attn'])}, "
        f"mlp {_size(sizes['L0.mlp'])}, head {_size(sizes['head'])} "
        f"({engine.dtype}, weights {engine.options.weights})",
        f"total       {_size(sum(sizes.values()))}",
        "",
        f"plan        batch {plan.batch} (micro-batch {plan.micro_batch} x {plan.n_micro}), "
        f"max_len {plan.max_len}, schedule {plan.schedule}",
    ]
    tiers = Counter(tier for _, tier in plan.placement)
    lines.append("placement   " + ", ".join(f"{n} blocks {tier}" for tier, n in tiers.items()))
    slots = plan.slot_sizes(sizes) if plan.streamed() else [0]
    lines.append(f"resident    {_size(plan.resident_nbytes)}; weight slots "
                 f"{plan.n_weight_slots}, {_size(sum(slots))} (largest {_size(max(slots))})")
    kv_where = ("a disk file (offloaded)" if plan.kv_disk else "host (offloaded)"
                if plan.kv_offloaded else "device")
    lines.append(f"kv cache    {_size(plan.kv_nbytes)} on {kv_where}")
    streamed = sum(sizes[b] for b in plan.streamed())
    lines.append(f"per step    {_size(streamed)} of weights streamed")
    return "\n".join(lines)
