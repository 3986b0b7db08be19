"""Rotary position embeddings: the cos/sin tables (with Llama-3.1 scaling) and their application.

Convention: the "rotate half" layout of Hugging Face checkpoints. A head vector is split into its
first and second halves (x1, x2); position p rotates the pair (x1[i], x2[i]) by angle p * inv_freq[i].
The tables are ``[n_positions, head_dim]`` with the angles repeated for both halves.

The tables are computed once per run by the caller (:func:`rope_tables`) and passed to every
attention block; they are indexed by absolute token position, so they must cover the largest
position a request can reach.
"""

from __future__ import annotations

import math

import torch

from pipo.io.spec import ModelSpec, RopeScaling


def rope_tables(spec: ModelSpec, n_positions: int, device=None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [n_positions, head_dim], for positions 0..n_positions-1.

    Angles are computed in fp32 (as transformers does) and only then cast to ``dtype``.
    """
    inv_freq = inverse_frequencies(spec)                             # [head_dim/2]
    positions = torch.arange(n_positions, dtype=torch.float32)       # [n]
    angles = torch.outer(positions, inv_freq)                        # [n, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)                     # [n, head_dim]
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def inverse_frequencies(spec: ModelSpec) -> torch.Tensor:
    """Rotation speed of each dimension pair, [head_dim/2] fp32, with ``spec.rope_scaling`` applied."""
    dims = torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float()  # [head_dim/2]
    inv_freq = 1.0 / (spec.rope_theta ** (dims / spec.head_dim))        # [head_dim/2]
    if spec.rope_scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, spec.rope_scaling)         # [head_dim/2]
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama-3.1 frequency scaling: slow frequencies / factor, fast ones kept, a smooth ramp between."""
    low_freq_wavelen = s.original_max_positions / s.low_freq_factor   # longer waves get divided
    high_freq_wavelen = s.original_max_positions / s.high_freq_factor  # shorter waves are kept
    wavelen = 2 * math.pi / inv_freq                                   # [head_dim/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)  # [head_dim/2]
    smooth = ((s.original_max_positions / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))              # [head_dim/2]
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled      # [head_dim/2]
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)  # [head_dim/2]
    return torch.where(medium, smoothed, scaled)                       # [head_dim/2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, t, head_dim] by angles already gathered at its positions.

    ``cos``/``sin`` broadcastable to x, in its dtype (see ``pipo.ops.rows.row_attention_inputs``).
    """
    x1, x2 = x.chunk(2, dim=-1)                                        # 2 x [b, heads, t, head_dim/2]
    rotated = torch.cat([-x2, x1], dim=-1)                             # [b, heads, t, head_dim]
    return x * cos + rotated * sin                                     # [b, heads, t, head_dim]
