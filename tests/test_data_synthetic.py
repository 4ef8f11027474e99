"""Synthetic scenes (`cswin_jax/data/synthetic.py`): layout, reproducibility, physical bounds.

Scenes are 40x48 (the generator has no size-specific code paths beyond the noise grids).
"""

import h5py
import numpy as np
import pytest

from cswin_jax import cubes
from cswin_jax import io as hsi_io
from cswin_jax.data import arad, synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.main(
        ["--out", str(root), "--train", "3", "--valid", "2", "--height", "40", "--width", "48",
         "--seed", "11"]
    )  # fmt: skip
    return root


def test_spectral_library_is_measured_and_on_the_31_band_grid():
    library = synthetic.spectral_library()
    reflectances = library["reflectances"]
    assert reflectances.shape == (450, 31)  # the 450 bundled colour-science reflectances
    assert reflectances.min() >= synthetic.REFLECTANCE_FLOOR and reflectances.max() <= 1.0
    for family in ("daylight", "tungsten", "fluorescent", "led"):
        spectra = np.stack(library["illuminants"][family])
        assert spectra.shape[1] == 31 and np.all(spectra >= 0) and np.allclose(spectra.max(1), 1)
    # Tungsten rises towards red, daylight (6500 K) is flatter: physically ordered.
    tungsten_a = library["illuminants"]["tungsten"][0]
    assert tungsten_a[-1] > 5 * tungsten_a[0]
    assert set(library["cameras"]) == {"nikon5100", "sigma", "canon5d2"}
    for sensitivity in library["cameras"].values():
        assert sensitivity.shape == (31, 3) and sensitivity.min() >= 0
        peaks = hsi_io.WAVELENGTHS_NM[np.argmax(sensitivity, axis=0)]
        assert peaks[0] > peaks[1] > peaks[2]  # R peaks at longer wavelengths than G than B


def test_writes_the_mst_layout_read_by_the_arad_reader(dataset):
    assert arad.read_split_file(dataset / "split_txt" / "train_list.txt") == [
        "SYNTH_0001",
        "SYNTH_0002",
        "SYNTH_0003",
    ]
    valid = arad.list_scenes(dataset, "valid")
    assert [s.stem for s in valid] == ["SYNTH_0004", "SYNTH_0005"]
    path = dataset / "Train_Spec" / "SYNTH_0001.mat"
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        assert f["cube"].shape == (31, 48, 40)  # (bands, W, H) as MATLAB writes H x W x C
        assert f["cube"].dtype == np.float32
        assert f["cube"].attrs["MATLAB_class"] == b"single"
        np.testing.assert_array_equal(f["bands"][:, 0], np.arange(400, 701, 10))
        assert f["norm_factor"][0, 0] > 0
    scenes = arad.FileScenes(arad.list_scenes(dataset, "train"))
    rgb, hsi = scenes.load(0)
    assert rgb.shape == (40, 48, 3) and hsi.shape == (40, 48, 31)


def test_physically_bounded(dataset):
    scenes = arad.FileScenes(arad.list_scenes(dataset, "train"))
    daylight = np.stack(synthetic.spectral_library()["illuminants"]["daylight"])
    dark_floor = (
        synthetic.INTERFACE_REFLECTION[0]
        * synthetic.AMBIENT_FILL[0]
        * 0.5
        * daylight.min()
        / (1.0 + synthetic.AMBIENT_FILL[1])
    )
    assert dark_floor > 5e-5  # without the ambient fill, LED scenes reached 2e-5
    for i in range(len(scenes)):
        hsi = cubes.read_cube(scenes.scenes[i].cube_path)
        assert np.isfinite(hsi).all()
        assert hsi.max() == pytest.approx(1.0, rel=1e-6)  # normalised by its maximum, as ARAD
        # No band is black, whatever the lamp (LED and sodium lamps have next to no blue):
        # every pixel gets at least the interface reflection x the weakest ambient skylight
        # (half occluded) in the dimmest daylight band, over the brightest possible radiance.
        assert hsi.min() >= dark_floor
        rgb_u8 = hsi_io.read_image(scenes.scenes[i].rgb_path, eight_bit=True)
        # Exposure to mean 0.18 x [0.6, 1.4], then noise, clipping and JPEG: loose bounds.
        assert 0.05 * 255 < rgb_u8.mean() < 0.4 * 255
        # The RGB is a noisy linear projection of the cube: least squares 31 -> 3 (+ bias)
        # explains most of the variance (noise, clipping and JPEG account for the rest).
        x = np.concatenate([hsi.reshape(-1, 31), np.ones((hsi[..., 0].size, 1))], axis=1)
        y = rgb_u8.reshape(-1, 3).astype(np.float64)
        residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        assert residual.var() / y.var() < 0.05


def test_scenes_are_spatially_smooth_not_white_noise(dataset):
    hsi = cubes.read_cube(dataset / "Train_Spec" / "SYNTH_0002.mat", rgb_hw=(40, 48))
    band = hsi[..., 15]
    neighbour_corr = np.corrcoef(band[:, :-1].ravel(), band[:, 1:].ravel())[0, 1]
    assert neighbour_corr > 0.8  # white noise would give ~0
    # Spectra are not all one material: pixels differ in spectral shape, not just brightness.
    shapes = hsi.reshape(-1, 31) / hsi.reshape(-1, 31).sum(1, keepdims=True)
    assert shapes.std(axis=0).max() > 1e-3


def test_reproducible_per_seed(dataset, tmp_path):
    synthetic.write_dataset(tmp_path, num_train=3, num_valid=0, height=40, width=48, seed=11)
    for stem in ("SYNTH_0001", "SYNTH_0003"):
        a = cubes.read_cube(dataset / "Train_Spec" / f"{stem}.mat")
        b = cubes.read_cube(tmp_path / "Train_Spec" / f"{stem}.mat")
        np.testing.assert_array_equal(a, b)
        jpeg = f"Train_RGB/{stem}.jpg"
        assert (dataset / jpeg).read_bytes() == (tmp_path / jpeg).read_bytes()
    other = tmp_path / "other"
    synthetic.write_dataset(other, num_train=1, num_valid=0, height=40, width=48, seed=12)
    assert not np.array_equal(
        cubes.read_cube(other / "Train_Spec" / "SYNTH_0001.mat"),
        cubes.read_cube(dataset / "Train_Spec" / "SYNTH_0001.mat"),
    )


def test_completion_marker_records_settings(dataset):
    assert synthetic.is_complete(dataset, num_train=3, num_valid=2, height=40, width=48, seed=11)
    assert not synthetic.is_complete(dataset, num_train=4)
    assert not synthetic.is_complete(dataset.parent / "absent")


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"--train >= 1"):
        synthetic.write_dataset("/nonexistent", num_train=0, num_valid=1)
