"""Images made for the attack tests: natural-like fields with the statistics the
ciphertext-only attack and the JPEG trace rely on (a plain module, not a test module)."""

from __future__ import annotations

import numpy as np


def smooth_fields(n: int, size: int, channels: int, seed: int, scale: float = 3.0) -> np.ndarray:
    """(n, size, size, channels) uint8: Gaussian-blurred noise with correlated channels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.normal(size=(n, size, size, 1)), (0, scale, scale, 0), mode="wrap")
    chroma = gaussian_filter(
        rng.normal(size=(n, size, size, channels)), (0, scale, scale, 0), mode="wrap"
    )
    x = base + 0.3 * chroma
    x = (x - x.mean()) / (x.std() * 4) + 0.5
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
