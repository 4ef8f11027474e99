"""Per-pixel error maps consistent with the metrics, and worst-pixel selection."""

import numpy as np
import pytest
from stand_in_models import BANDS

from cswin_jax import error_maps, metrics


def test_error_maps_agree_with_metrics():
    """Means of the per-pixel maps equal the global metrics (all pixels have 31 bands):
    MRAE to 1e-5 relative, SAM to 1e-3 degrees (float32 acos rounding near 0)."""
    truth = np.random.default_rng(1).uniform(0.05, 1.0, (24, 32, BANDS)).astype(np.float32)
    pred = truth * np.random.default_rng(2).uniform(0.8, 1.2, truth.shape).astype(np.float32)
    assert error_maps.mrae_map(pred, truth).mean() == pytest.approx(
        float(metrics.mrae(pred, truth)), 1e-5
    )
    assert error_maps.sam_map(pred, truth).mean() == pytest.approx(
        float(metrics.sam(pred, truth)), abs=1e-3
    )
    np.testing.assert_allclose(error_maps.sam_map(truth, truth), 0.0, atol=0.05)


def test_worst_pixels_finds_planted_errors():
    truth = np.random.default_rng(3).uniform(0.05, 1.0, (64, 64, BANDS)).astype(np.float32)
    pred = truth.copy()
    pred[10, 50] *= 3.0
    pred[40, 5] *= 2.0
    chosen = error_maps.worst_pixels(pred, truth, count=2)
    assert chosen[:2] == [(10, 50), (40, 5)] and len(chosen) == 3
    inside = error_maps.worst_pixels(pred, truth, count=1, crop=(30, 0, 64, 64))
    assert inside[0] == (40, 5)
