"""Cube files (`cswin_jax/cubes.py`): formats and orientation, value checks, and the writers
in the ARAD orientation.

Every file here is written by the test itself (tiny scenes); values are compared exactly (the
reader must not touch HSI values) unless a tolerance is stated.
"""

import h5py
import ml_collections
import numpy as np
import pytest
import scipy.io

from configs import base
from cswin_jax import cubes
from cswin_jax.cubes import write_mat73
from cswin_jax.io import NUM_BANDS

H, W = 6, 5


def _cube(h=H, w=W, bands=NUM_BANDS, seed=0):
    # Distinct values per (row, col, band) so any axis mix-up shows.
    return np.random.default_rng(seed).uniform(0.01, 1, (h, w, bands)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Cubes: formats and orientation
# --------------------------------------------------------------------------------------------


def test_mat73_cube_stored_band_width_height_is_read_as_hwc(tmp_path):
    cube = _cube()
    path = tmp_path / "scene.mat"
    write_mat73(path, cube)
    with h5py.File(path, "r") as f:
        assert f["cube"].shape == (31, W, H)  # MATLAB H x W x C reversed on disk
    assert path.read_bytes()[:10] == b"MATLAB 7.3"
    out = cubes.read_cube(path, rgb_hw=(H, W))
    assert out.dtype == np.float32 and out.shape == (H, W, 31)
    np.testing.assert_array_equal(out, cube)  # values untouched


def test_mat_v5_cube_read_through_scipy(tmp_path):
    cube = _cube()
    path = tmp_path / "scene.mat"
    scipy.io.savemat(path, {"cube": cube.astype(np.float64), "bands": np.arange(400, 701, 10)})
    assert not h5py.is_hdf5(path)
    out = cubes.read_cube(path, rgb_hw=(H, W))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, cube)


@pytest.mark.parametrize("band_first", [False, True])
def test_npy_and_h5_cubes_with_band_axis_first_or_last(tmp_path, band_first):
    cube = _cube()
    stored = cube.transpose(2, 0, 1) if band_first else cube
    np.save(tmp_path / "scene.npy", stored)
    with h5py.File(tmp_path / "scene.h5", "w") as f:
        f["cube"] = stored
    np.testing.assert_array_equal(cubes.read_cube(tmp_path / "scene.npy", rgb_hw=(H, W)), cube)
    np.testing.assert_array_equal(cubes.read_cube(tmp_path / "scene.h5", rgb_hw=(H, W)), cube)


def test_compressed_chunked_cube_read_through_h5py(tmp_path):
    # MATLAB writes large v7.3 variables chunked and gzip-compressed: not memory-mappable.
    cube = _cube(h=12, w=10)
    path = tmp_path / "scene.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("cube", data=cube.T, chunks=(31, 4, 4), compression="gzip")
    reader = cubes.CubeReader(path, rgb_hw=(12, 10))
    assert isinstance(reader._array, h5py.Dataset)  # the windowed path through HDF5
    np.testing.assert_array_equal(reader.read_window(3, 2, 5, 6), cube[3:8, 2:8])
    np.testing.assert_array_equal(reader.read(), cube)
    reader.close()


@pytest.mark.parametrize("suffix", [".mat", ".npy"])
def test_transposed_cube_is_fixed_from_rgb_shape(tmp_path, suffix):
    cube = _cube()
    path = tmp_path / f"scene{suffix}"
    swapped = np.ascontiguousarray(cube.transpose(1, 0, 2))  # H and W swapped
    write_mat73(path, swapped) if suffix == ".mat" else np.save(path, swapped)
    assert cubes.read_cube(path).shape == (W, H, 31)  # no RGB to compare against: as stored
    np.testing.assert_array_equal(cubes.read_cube(path, rgb_hw=(H, W)), cube)
    # Windowed (lazy) reads follow the same fix.
    reader = cubes.CubeReader(path, rgb_hw=(H, W))
    np.testing.assert_array_equal(reader.read_window(1, 2, 3, 2), cube[1:4, 2:4])
    reader.close()


# --------------------------------------------------------------------------------------------
# Cubes: bad files and values, one clear error naming the file or key and the fix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v73", "v5"])
def test_mat_without_cube_lists_keys(tmp_path, version):
    path = tmp_path / "ARAD_1K_0042.mat"
    if version == "v5":
        scipy.io.savemat(path, {"rad": _cube(), "bands": np.arange(31)})
    else:
        with h5py.File(path, "w") as f:
            f["rad"] = _cube().T
            f["bands"] = np.arange(31)
    with pytest.raises(
        ValueError, match=r"ARAD_1K_0042\.mat: expected key 'cube'.*found keys \['bands', 'rad'\]"
    ):
        cubes.read_cube(path)


def test_wrong_band_count(tmp_path):
    path = tmp_path / "ARAD_1K_0007.mat"
    write_mat73(path, _cube(bands=16))
    with pytest.raises(ValueError, match=r"ARAD_1K_0007\.mat: expected 'cube' with 31 bands"):
        cubes.read_cube(path)


def test_size_mismatch_after_orientation_fix(tmp_path):
    path = tmp_path / "ARAD_1K_0008.mat"
    write_mat73(path, _cube(h=7, w=5))
    with pytest.raises(ValueError, match=r"ARAD_1K_0008\.mat: cube is 7x5.*RGB image is 6x5"):
        cubes.read_cube(path, rgb_hw=(H, W))


def test_truncated_mat(tmp_path):
    path = tmp_path / "ARAD_1K_0010.mat"
    write_mat73(path, _cube(h=32, w=32))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"ARAD_1K_0010\.mat: cannot open.*truncated or corrupt"):
        cubes.read_cube(path)


def test_truncated_mat_v5(tmp_path):
    path = tmp_path / "ARAD_1K_0011.mat"
    scipy.io.savemat(path, {"cube": _cube(h=32, w=32)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"ARAD_1K_0011\.mat: cannot read as MATLAB.*truncated"):
        cubes.read_cube(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_cube(tmp_path, bad):
    cube = _cube()
    cube[2, 3, 4] = bad
    path = tmp_path / "ARAD_1K_0012.mat"
    write_mat73(path, cube)
    with pytest.raises(ValueError, match=r"ARAD_1K_0012\.mat: cube holds 1 NaN/Inf"):
        cubes.read_cube(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: -c, r"930 of 930 values are below -0\.01.*sign of the export"),
        (lambda c: c * 4095, r"\d+ of 930 values are above data\.max_value=10.*scale the cube"),
        (lambda c: c * 0, r"cube is all zero"),
    ],
    ids=["negated", "unscaled", "all_zero"],
)
def test_cube_values_outside_the_limits_are_rejected_with_counts(tmp_path, edit, match):
    path = tmp_path / "ARAD_1K_0013.mat"
    write_mat73(path, edit(_cube()))
    with pytest.raises(ValueError, match=r"ARAD_1K_0013\.mat: " + match):
        cubes.read_cube(path, limits=cubes.CubeLimits())
    cubes.read_cube(path)  # without limits only NaN/Inf are checked


def test_cube_limits_tolerance_and_maximum_come_from_the_config(tmp_path):
    cube = _cube()
    cube[0, 0, :5] = -0.02  # five small negatives: noise of a calibration, or a sign error
    path = tmp_path / "ARAD_1K_0014.mat"
    write_mat73(path, cube)
    config = base.get_config()
    with pytest.raises(ValueError, match=r"5 of 930 values are below -0\.01 \(min -0\.02\)"):
        cubes.read_cube(path, limits=cubes.CubeLimits.from_config(config))
    config.data.negative_tolerance = 0.05
    cubes.read_cube(path, limits=cubes.CubeLimits.from_config(config))
    config.data.max_value = 0.5
    with pytest.raises(ValueError, match=r"above data\.max_value=0\.5"):
        cubes.read_cube(path, limits=cubes.CubeLimits.from_config(config))
    old = ml_collections.ConfigDict({"model": {}})  # a checkpoint's config from before the keys
    assert cubes.CubeLimits.from_config(old) == cubes.CubeLimits()


# --------------------------------------------------------------------------------------------
# Cubes: writing
# --------------------------------------------------------------------------------------------


def test_mat_output_is_arad_oriented_v73(tmp_path):
    cube = _cube(7, 11)
    path = cubes.write_cube(tmp_path / "scene.mat", cube)
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        stored = f["cube"][:]
    assert stored.shape == (NUM_BANDS, 11, 7)  # (31, W, H), as the ARAD-1K files
    np.testing.assert_array_equal(stored.T, cube)
    np.testing.assert_array_equal(cubes.read_cube(path, rgb_hw=(7, 11)), cube)


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_h5_and_npy_round_trip(tmp_path, fmt):
    cube = _cube(7, 11)
    path = cubes.write_cube(tmp_path / f"scene.{fmt}", cube)
    np.testing.assert_array_equal(cubes.read_cube(path), cube)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown cube format 'png'"):
        cubes.write_cube(tmp_path / "x.png", _cube(2, 2))
