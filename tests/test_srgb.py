"""sRGB rendering through CIE 1931 / D65: reference spectra, the output range, auto exposure."""

import numpy as np
import pytest
from stand_in_models import BANDS

from cswin_jax import srgb


def test_srgb_of_reference_spectra():
    """A perfect white reflector renders white (D65 is sRGB's white point; 1e-2 for the
    10 nm sampling of the CMFs), black renders black, a flat grey is neutral, and narrow
    bands land in the right channel."""
    white = srgb.hsi_to_srgb(np.ones((1, 1, BANDS)), exposure=1.0)[0, 0]
    np.testing.assert_allclose(white, 1.0, atol=1e-2)
    np.testing.assert_array_equal(srgb.hsi_to_srgb(np.zeros((1, 1, BANDS)), exposure=1.0), 0.0)
    grey = srgb.hsi_to_srgb(np.full((1, 1, BANDS), 0.18), exposure=1.0)[0, 0]
    assert np.ptp(grey) < 1e-2 and 0.4 < grey.mean() < 0.5  # sRGB encoding of Y = 0.18
    for nm, channel in ((450, 2), (540, 1), (640, 0)):
        spectrum = np.zeros((1, 1, BANDS))
        spectrum[..., (nm - 400) // 10] = 1.0
        colour = srgb.hsi_to_srgb(spectrum, exposure=3.0)[0, 0]
        assert np.argmax(colour) == channel, (nm, colour)


def test_srgb_range_and_auto_exposure():
    cube = np.random.default_rng(0).uniform(0.15, 3.0, (24, 32, BANDS)).astype(np.float32)
    image = srgb.hsi_to_srgb(cube)
    assert image.shape == (24, 32, 3) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and np.isfinite(image).all()
    with pytest.raises(ValueError, match="expected 31 bands"):
        srgb.hsi_to_srgb(np.ones((2, 2, 30)))
