"""Polynomial maps from a pixel's RGB to its bands: the features and the two fits.

* Features: the monomials of a pixel's RGB of total degree <= `order`: order 1 is
  [1, r, g, b] (linear + bias, 4 features), order 2 adds the 6 degree-2 monomials (10),
  order 3 the 10 degree-3 ones (20).
* Fit (`fit`): every feature but the constant is standardised with its mean and standard
  deviation over the given pixels (the same polynomial space, a far better conditioned
  system), then `np.linalg.lstsq` solves for all bands at once in float64. `objective='mrae'`
  instead minimises the mean relative absolute error by iteratively reweighted least squares
  (`fit_mrae`).

`cswin_jax.floor` samples the training pixels, fits these maps and scores them.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

ORDERS = (1, 2, 3)
ORDER_NAMES = {1: "linear + bias", 2: "quadratic", 3: "cubic"}
OBJECTIVES = ("lsq", "mrae")  # least squares (the floor) | MRAE by reweighted least squares
MRAE_FIT_ITERATIONS = 50
MRAE_FIT_MIN_RELATIVE_RESIDUAL = 1e-4  # IRLS weight cap: |r| / y below this counts as this


def monomials(order: int) -> list[tuple[int, ...]]:
    """Channel index tuples of the non-constant monomials of degree <= `order`, by degree:
    order 2 -> (0,), (1,), (2,), (0, 0), (0, 1), ..., (2, 2)."""
    if order not in ORDERS:
        raise ValueError(f"polynomial order {order!r}: use one of {ORDERS}")
    return [
        combo
        for degree in range(1, order + 1)
        for combo in itertools.combinations_with_replacement(range(3), degree)
    ]


def polynomial_features(rgb: np.ndarray, order: int) -> np.ndarray:
    """rgb: [N, 3] -> [N, F] float64, the monomials of `monomials(order)` (no constant)."""
    rgb = np.asarray(rgb, np.float64)
    columns = [np.prod(rgb[:, list(combo)], axis=1) for combo in monomials(order)]
    return np.stack(columns, axis=1)


@dataclasses.dataclass(frozen=True)
class PolynomialFloor:
    """A fitted per-pixel polynomial map RGB -> bands.

    Attributes:
      order: polynomial order (1, 2 or 3).
      feature_mean, feature_scale: [F] standardisation of the monomial features.
      weights: [F + 1, bands] float64 on [1, standardised features].
    """

    order: int
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    weights: np.ndarray
    objective: str = "lsq"

    @property
    def name(self) -> str:
        fitted = ", MRAE fit" if self.objective == "mrae" else ""
        return f"order {self.order} ({ORDER_NAMES[self.order]}{fitted})"

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """rgb: [..., 3] float in [0, 1] (normalised as the readers do) -> [..., bands] float32."""
        rgb = np.asarray(rgb)
        flat = rgb.reshape(-1, 3)
        features = (polynomial_features(flat, self.order) - self.feature_mean) / self.feature_scale
        hsi = features @ self.weights[1:] + self.weights[0]
        return hsi.astype(np.float32).reshape(*rgb.shape[:-1], self.weights.shape[1])


def fit(rgb: np.ndarray, hsi: np.ndarray, order: int, objective: str = "lsq") -> PolynomialFloor:
    """Polynomial fit of `order`: least squares, or MRAE (`objective='mrae'`, `fit_mrae`).
    rgb: [N, 3], hsi: [N, bands]."""
    if objective not in OBJECTIVES:
        raise ValueError(f"floor objective {objective!r}: use one of {OBJECTIVES}")
    rgb, hsi = np.asarray(rgb), np.asarray(hsi, np.float64)
    if rgb.ndim != 2 or rgb.shape[1] != 3 or hsi.ndim != 2 or len(hsi) != len(rgb):
        raise ValueError(f"floor fit: expected rgb [N, 3] and hsi [N, bands], got {rgb.shape} "
                         f"and {hsi.shape}")  # fmt: skip
    features = polynomial_features(rgb, order)
    if len(features) <= features.shape[1]:
        raise ValueError(
            f"floor fit: {len(features)} pixels for {features.shape[1] + 1} order-{order} "
            "coefficients per band; sample more pixels (eval.floor_pixels / --pixels)"
        )
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature: lstsq's minimum norm
    design = np.concatenate([np.ones((len(features), 1)), (features - mean) / scale], axis=1)
    weights, *_ = np.linalg.lstsq(design, hsi, rcond=None)
    if objective == "mrae":
        weights = fit_mrae(design, hsi, weights)
    return PolynomialFloor(order, mean, scale, weights, objective)


def fit_mrae(
    design: np.ndarray, hsi: np.ndarray, weights: np.ndarray, iterations: int = MRAE_FIT_ITERATIONS
) -> np.ndarray:
    """Weights minimising mean |design @ w - hsi| / hsi per band, from `weights`.

    Iteratively reweighted least squares: |r| / y = r^2 / (y^2 |r| / y), so each round solves
    the least-squares problem weighted by 1 / (y^2 max(|r| / y, 1e-4)) with the previous
    round's residuals r (all bands at once through their normal equations). Pixels whose
    truth is not positive are left out (MRAE is undefined there).

    Args:
      design: [N, F] float64 (constant column first).
      hsi: [N, bands] float64.
      weights: [F, bands] starting point (the least-squares solution).
    Returns:
      [F, bands] float64.
    """
    positive = np.all(hsi > 0, axis=1)
    design, hsi = design[positive], hsi[positive]
    if len(design) <= design.shape[1]:
        raise ValueError("floor fit (objective 'mrae'): too few pixels with positive spectra")
    for _ in range(iterations):
        relative = np.abs(design @ weights - hsi) / hsi
        u = 1.0 / (hsi * hsi * np.maximum(relative, MRAE_FIT_MIN_RELATIVE_RESIDUAL))  # [N, B]
        gram = np.einsum("nf,nb,ng->bfg", design, u, design)
        rhs = np.einsum("nf,nb->bf", design, u * hsi)
        weights = np.linalg.solve(gram, rhs[..., None])[..., 0].T
    return weights
