"""Non-negative least squares on relative error: the probe's fits (compute, disk reads)."""

from __future__ import annotations

import numpy as np


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients ``c >= 0`` minimising ``sum(((a @ c - y) / y) ** 2)`` (active set: drop the
    most negative, refit), so small and large measurements weigh alike."""
    scale = 1.0 / np.maximum(y, 1e-9)
    a, y = a * scale[:, None], y * scale
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef
