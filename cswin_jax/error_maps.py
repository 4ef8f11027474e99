"""Per-pixel and per-band reconstruction errors of a predicted cube, for the figures.

Plain numpy on [H, W, 31] cubes, with the metrics' epsilon (`cswin_jax.metrics` scores the
same quantities on device); `worst_pixels` picks the pixels whose spectra are worth plotting.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-8  # the original's MRAE / SAM epsilon


def mrae_map(hsi_pred: np.ndarray, hsi_true: np.ndarray) -> np.ndarray:
    """[H, W] per-pixel MRAE: mean over bands of |p - t| / (t + 1e-8), as the original's MRAE."""
    return np.mean(np.abs(hsi_pred - hsi_true) / (hsi_true + _EPS), axis=-1)


def sam_map(hsi_pred: np.ndarray, hsi_true: np.ndarray) -> np.ndarray:
    """[H, W] per-pixel spectral angle in degrees (eps 1e-8 normalisation, as the metric)."""
    pred = hsi_pred / np.maximum(np.linalg.norm(hsi_pred, axis=-1, keepdims=True), _EPS)
    true = hsi_true / np.maximum(np.linalg.norm(hsi_true, axis=-1, keepdims=True), _EPS)
    cos = np.clip(np.sum(pred * true, axis=-1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def band_errors(hsi_pred: np.ndarray, hsi_true: np.ndarray) -> dict[str, np.ndarray]:
    """Per-band ([31]) MRAE, RMSE and mean signed error over all pixels."""
    diff = hsi_pred - hsi_true
    return {
        "mrae": np.mean(np.abs(diff) / (hsi_true + _EPS), axis=(0, 1)),
        "rmse": np.sqrt(np.mean(diff**2, axis=(0, 1))),
        "bias": np.mean(diff, axis=(0, 1)),
    }


def worst_pixels(
    hsi_pred: np.ndarray,
    hsi_true: np.ndarray,
    count: int = 3,
    crop: tuple[int, int, int, int] | None = None,
    min_distance: int | None = None,
) -> list[tuple[int, int]]:
    """The `count` pixels with the highest per-pixel MRAE (inside `crop`), at least
    `min_distance` pixels apart (default: a tenth of the image side, so that one bad region
    does not take every slot), plus the median-error pixel last."""
    errors = mrae_map(hsi_pred, hsi_true)
    if min_distance is None:
        min_distance = max(1, max(errors.shape) // 10)
    mask = np.zeros_like(errors, bool)
    if crop is None:
        mask[:] = True
    else:
        mask[crop[0] : crop[2], crop[1] : crop[3]] = True
    candidates = np.flatnonzero(mask.ravel())
    order = candidates[np.argsort(-errors.ravel()[candidates], kind="stable")]
    chosen: list[tuple[int, int]] = []
    width = errors.shape[1]
    for flat in order:
        y, x = divmod(int(flat), width)
        if all(max(abs(y - cy), abs(x - cx)) >= min_distance for cy, cx in chosen):
            chosen.append((y, x))
        if len(chosen) == count:
            break
    median_flat = order[len(order) // 2]
    chosen.append(divmod(int(median_flat), width))
    return chosen
