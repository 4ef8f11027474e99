"""Polynomial maps RGB -> bands: the monomials, exact recovery of linear and quadratic maps,
the MRAE objective, and the input checks."""

import numpy as np
import pytest
from stand_in_models import BANDS

from cswin_jax import metrics, polynomial_fit


def _random_map(order, seed=0):
    """rgb [N, 3] in [0, 1] and hsi = a random polynomial of exactly `order` in it."""
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0.0, 1.0, (2000, 3))
    features = np.concatenate(
        [np.ones((len(rgb), 1)), polynomial_fit.polynomial_features(rgb, order)], 1
    )
    coefficients = rng.normal(0.0, 0.5, (features.shape[1], BANDS))
    return rgb, features @ coefficients


def test_monomials():
    assert [len(polynomial_fit.monomials(k)) + 1 for k in polynomial_fit.ORDERS] == [4, 10, 20]
    assert polynomial_fit.monomials(2)[3:5] == [(0, 0), (0, 1)]
    with pytest.raises(ValueError, match="polynomial order 4"):
        polynomial_fit.monomials(4)


def test_recovers_a_linear_map_exactly():
    """Order 1 fit to an affine map predicts new pixels to float32 rounding."""
    rng = np.random.default_rng(1)
    matrix, bias = rng.uniform(-1, 1, (3, BANDS)), rng.uniform(0, 1, BANDS)
    rgb = rng.uniform(0, 1, (500, 3))
    fitted = polynomial_fit.fit(rgb, rgb @ matrix + bias, order=1)
    assert fitted.weights.shape == (4, BANDS)
    new = rng.uniform(0, 1, (7, 9, 3))
    np.testing.assert_allclose(fitted.predict(new), new @ matrix + bias, rtol=1e-6, atol=1e-6)
    assert fitted.predict(new).dtype == np.float32 and fitted.predict(new).shape == (7, 9, BANDS)


def test_recovers_a_quadratic_map_at_order_2_not_1():
    rgb, hsi = _random_map(order=2)
    for order in (2, 3):
        pred = polynomial_fit.fit(rgb[:1500], hsi[:1500], order).predict(rgb[1500:])
        np.testing.assert_allclose(pred, hsi[1500:], rtol=1e-5, atol=1e-5)
    linear = polynomial_fit.fit(rgb[:1500], hsi[:1500], 1).predict(rgb[1500:])
    assert np.abs(linear - hsi[1500:]).max() > 1e-2


def test_mrae_objective():
    """objective='mrae' recovers an exact affine map as least squares does, and on pixels of
    two scenes at different scales reaches a lower MRAE than least squares (which the bright
    scene pulls), close to the per-band minimum a brute-force search over scale finds."""
    rng = np.random.default_rng(3)
    matrix, bias = rng.uniform(0.1, 1, (3, BANDS)), rng.uniform(0.05, 0.2, BANDS)
    rgb = rng.uniform(0, 1, (800, 3))
    exact = polynomial_fit.fit(rgb, rgb @ matrix + bias, order=1, objective="mrae")
    assert exact.name == "order 1 (linear + bias, MRAE fit)" and exact.objective == "mrae"
    np.testing.assert_allclose(exact.predict(rgb), rgb @ matrix + bias, rtol=1e-5)

    # The same map, but the second half of the pixels (another "scene") is 5x brighter in
    # the truth only: no polynomial of the RGB can fit both, and the two objectives disagree.
    hsi = (rgb @ matrix + bias) * np.where(np.arange(800) < 400, 1.0, 5.0)[:, None]
    lsq, mrae_fit = (polynomial_fit.fit(rgb, hsi, 1, objective) for objective in ("lsq", "mrae"))
    score = lambda f: float(metrics.mrae(f.predict(rgb), hsi.astype(np.float32)))  # noqa: E731
    assert score(mrae_fit) < 0.8 * score(lsq)
    # MRAE of c * (the true map) is minimised near c = 1 here (half the pixels need 1, half 5,
    # and undershooting the bright half costs (5 - c) / 5 < overshooting the dark one).
    best = min(
        float(metrics.mrae((c * (rgb @ matrix + bias)).astype(np.float32), hsi.astype(np.float32)))
        for c in np.linspace(0.5, 5, 91)
    )
    assert score(mrae_fit) <= best + 1e-3
    with pytest.raises(ValueError, match="floor objective 'l1'"):
        polynomial_fit.fit(rgb, hsi, 1, "l1")


def test_fit_checks_its_inputs():
    with pytest.raises(ValueError, match="expected rgb \\[N, 3\\]"):
        polynomial_fit.fit(np.zeros((10, 4)), np.zeros((10, BANDS)), 1)
    with pytest.raises(ValueError, match="eval.floor_pixels"):
        polynomial_fit.fit(
            np.zeros((15, 3)), np.zeros((15, BANDS)), 3
        )  # 15 pixels, 20 coefficients
