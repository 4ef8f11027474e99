"""Renders 31-band cubes (400-700 nm, 10 nm steps) as sRGB images.

The cube is integrated against the CIE 1931 2-degree colour-matching functions under CIE D65
(both from colour-science, aligned to 400-700 nm in 10 nm steps), normalised so that a perfect
white reflector has Y = 1, then converted XYZ -> sRGB (gamma-encoded) and clipped to [0, 1].
"""

from __future__ import annotations

import functools

import numpy as np

from cswin_jax import io as hsi_io


@functools.lru_cache(maxsize=1)
def _xyz_matrix() -> np.ndarray:
    """[31, 3] float64: band reflectance -> CIE XYZ under D65, white reflector Y = 1."""
    import colour

    shape = colour.SpectralShape(400, 700, 10)
    cmfs = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"].copy().align(shape)
    d65 = colour.SDS_ILLUMINANTS["D65"].copy().align(shape)
    weighted = d65.values[:, None] * cmfs.values
    return weighted / np.sum(weighted[:, 1])


def hsi_to_xyz(hsi: np.ndarray) -> np.ndarray:
    """hsi: [..., 31] reflectance-like -> [..., 3] CIE XYZ (D65, white Y = 1)."""
    hsi = np.asarray(hsi, np.float64)
    if hsi.shape[-1] != hsi_io.NUM_BANDS:
        raise ValueError(
            f"expected {hsi_io.NUM_BANDS} bands (400-700 nm, 10 nm) last, got {hsi.shape}"
        )
    return hsi @ _xyz_matrix()


def auto_exposure(hsi: np.ndarray, percentile: float = 99.0) -> float:
    """Scale that maps the `percentile` luminance (Y) of `hsi` to 1 (ARAD cubes are
    normalised per scene, so many render dark at their native scale)."""
    luminance = hsi_to_xyz(hsi)[..., 1]
    level = float(np.percentile(luminance, percentile))
    return 1.0 / level if level > 1e-6 else 1.0


def hsi_to_srgb(hsi: np.ndarray, exposure: float | None = None) -> np.ndarray:
    """hsi: [H, W, 31] -> [H, W, 3] float32 gamma-encoded sRGB in [0, 1].

    exposure: multiplies XYZ before the sRGB conversion; None = `auto_exposure(hsi)`. Pass
    the ground truth's exposure when rendering a prediction beside it.
    """
    import colour

    if exposure is None:
        exposure = auto_exposure(hsi)
    xyz = hsi_to_xyz(hsi) * exposure
    srgb = colour.XYZ_to_sRGB(xyz)
    return np.clip(np.nan_to_num(srgb), 0.0, 1.0).astype(np.float32)
