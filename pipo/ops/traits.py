"""How the supported model families differ: one small table of :class:`Traits`.

The model math in :mod:`pipo.ops.layers` is written once; every difference between families is a
field here (norm kind, MLP kind, position kind, which projections carry a bias). A new family is a
new row in :data:`TRAITS`, never a copied forward pass.

Bias fields are ``True`` (the family always has the bias), ``False`` (never) or ``None`` ("follow
the spec": ``spec.attention_bias`` for q/k/v/o, ``spec.mlp_bias`` for the MLP), as Llama's config
switches them. :func:`traits_for` resolves the ``None`` entries against a spec.

The layer functions add a bias when the block's weights dict holds it; the resolved bias fields say
which canonical tensors a weight reader must produce (:func:`block_tensor_names`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from pipo.errors import ModelFormatError
from pipo.io.spec import SUPPORTED_FAMILIES, ModelSpec, block_part


@dataclass(frozen=True, slots=True)
class Traits:
    """What one model family does differently.

    norm: ``"rms"`` (RMSNorm, weight only) or ``"layer"`` (LayerNorm, weight and bias).
    mlp: ``"gated_silu"`` (down(silu(gate(x)) * up(x))) or ``"relu"`` (down(relu(up(x)))).
    positions: ``"rope"`` (rotary, applied to q and k) or ``"learned"`` (added to the embeddings).
    position_offset: index of position 0 in the learned table (OPT reserves 2 rows).
    qkv_bias, o_bias, mlp_bias: ``True``/``False``, or ``None`` to follow the spec's flags.
    """

    norm: str
    mlp: str
    positions: str
    position_offset: int = 0
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None


TRAITS: dict[str, Traits] = {
    "llama": Traits(norm="rms", mlp="gated_silu", positions="rope"),
    "mistral": Traits(norm="rms", mlp="gated_silu", positions="rope"),
    "qwen2": Traits(norm="rms", mlp="gated_silu", positions="rope",
                    qkv_bias=True, o_bias=False, mlp_bias=False),
    "opt": Traits(norm="layer", mlp="relu", positions="learned", position_offset=2,
                  qkv_bias=True, o_bias=True, mlp_bias=True),
}
assert set(TRAITS) == set(SUPPORTED_FAMILIES), "every supported family needs one row of traits"


@lru_cache(maxsize=None)
def traits_for(spec: ModelSpec) -> Traits:
    """The traits of ``spec.family`` with every bias field resolved to ``True``/``False``.

    Raises :class:`ModelFormatError` for a family pipo does not support.
    """
    if spec.family not in TRAITS:
        raise ModelFormatError(
            f"Model family {spec.family!r} is not supported; pipo runs {', '.join(TRAITS)}.")
    row = TRAITS[spec.family]
    return replace(
        row,
        qkv_bias=_resolve(row.qkv_bias, spec.attention_bias),
        o_bias=_resolve(row.o_bias, spec.attention_bias),
        mlp_bias=_resolve(row.mlp_bias, spec.mlp_bias),
    )


def _resolve(fixed: bool | None, from_spec: bool) -> bool:
    """A family's fixed bias choice, or the spec's flag where the family leaves it open."""
    return bool(from_spec) if fixed is None else fixed


def block_tensor_names(spec: ModelSpec, part: str) -> tuple[str, ...]:
    """Canonical tensor names a block of kind ``part`` (embed/attn/mlp/head) holds for ``spec``."""
    t = traits_for(spec)
    norm = ("norm_w", "norm_b") if t.norm == "layer" else ("norm_w",)
    if part == "embed":
        return ("tok", "pos") if t.positions == "learned" else ("tok",)
    if part == "attn":
        names = norm + ("wq", "wk", "wv", "wo")
        names += ("bq", "bk", "bv") if t.qkv_bias else ()
        return names + (("bo",) if t.o_bias else ())
    if part == "mlp":
        names = norm + ("w_up", "w_down")
        names += ("w_gate",) if t.mlp == "gated_silu" else ()
        if t.mlp_bias:
            names += ("b_up", "b_down") + (("b_gate",) if t.mlp == "gated_silu" else ())
        return names
    if part == "head":
        return norm + ("w_out",)
    raise ValueError(f"unknown block part {part!r}")


def complete_layout(spec: ModelSpec, layout: dict[str, dict], where) -> dict[str, dict]:
    """Tie the head to the embedding when the spec says so, then require every block's tensors.

    ``layout`` maps block -> {canonical name: anything}; raises ModelFormatError naming ``where``
    and the first block that lacks a tensor.
    """
    if spec.tie_embeddings and "tok" in layout["embed"]:
        layout["head"]["w_out"] = layout["embed"]["tok"]
    for block, found in layout.items():
        missing = sorted(set(block_tensor_names(spec, block_part(block))) - found.keys())
        if missing:
            raise ModelFormatError(f"{where}: block {block} lacks tensor(s) {', '.join(missing)}.")
    return layout
