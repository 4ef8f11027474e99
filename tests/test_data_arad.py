"""ARAD-1K / MST++ layout reader (`cswin_jax/data/arad.py`): formats, orientation, splits, errors.

Every file here is written by the test itself (tiny 6x5 or 8x10 scenes); values are compared
exactly (the reader must not touch HSI values) unless a tolerance is stated.
"""

import pathlib

import h5py
import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from configs import base
from cswin_jax.data import arad
from cswin_jax.data.synthetic import write_mat73

H, W = 6, 5


def _cube(h=H, w=W, bands=31, seed=0):
    # Distinct values per (row, col, band) so any axis mix-up shows.
    return np.random.default_rng(seed).uniform(0.01, 1, (h, w, bands)).astype(np.float32)


def _write_png(path, h=H, w=W, seed=0):
    rgb = np.random.default_rng(seed).integers(10, 240, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _layout(root: pathlib.Path, stems=("ARAD_1K_0001", "ARAD_1K_0002"), valid=("ARAD_1K_0002",)):
    """A tiny MST++ layout with PNG RGB (lossless, so RGB checks are exact) and v7.3 cubes."""
    for folder in ("Train_RGB", "Train_Spec", "split_txt"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        _write_png(root / "Train_RGB" / f"{stem}.png", seed=i)
        write_mat73(root / "Train_Spec" / f"{stem}.mat", _cube(seed=i))
    train = [s for s in stems if s not in valid]
    (root / "split_txt" / "train_list.txt").write_text("".join(s + "\n" for s in train))
    (root / "split_txt" / "valid_list.txt").write_text("".join(s + "\n" for s in valid))
    return root


# --------------------------------------------------------------------------------------------
# Cube formats
# --------------------------------------------------------------------------------------------


def test_mat73_cube_stored_band_width_height_is_read_as_hwc(tmp_path):
    cube = _cube()
    path = tmp_path / "scene.mat"
    write_mat73(path, cube)
    with h5py.File(path, "r") as f:
        assert f["cube"].shape == (31, W, H)  # MATLAB H x W x C reversed on disk
    assert path.read_bytes()[:10] == b"MATLAB 7.3"
    out = arad.read_cube(path, rgb_hw=(H, W))
    assert out.dtype == np.float32 and out.shape == (H, W, 31)
    np.testing.assert_array_equal(out, cube)  # values untouched


def test_mat_v5_cube_read_through_scipy(tmp_path):
    cube = _cube()
    path = tmp_path / "scene.mat"
    scipy.io.savemat(path, {"cube": cube.astype(np.float64), "bands": np.arange(400, 701, 10)})
    assert not h5py.is_hdf5(path)
    out = arad.read_cube(path, rgb_hw=(H, W))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, cube)


@pytest.mark.parametrize("band_first", [False, True])
def test_npy_and_h5_cubes_with_band_axis_first_or_last(tmp_path, band_first):
    cube = _cube()
    stored = cube.transpose(2, 0, 1) if band_first else cube
    np.save(tmp_path / "scene.npy", stored)
    with h5py.File(tmp_path / "scene.h5", "w") as f:
        f["cube"] = stored
    np.testing.assert_array_equal(arad.read_cube(tmp_path / "scene.npy", rgb_hw=(H, W)), cube)
    np.testing.assert_array_equal(arad.read_cube(tmp_path / "scene.h5", rgb_hw=(H, W)), cube)


def test_compressed_chunked_cube_read_through_h5py(tmp_path):
    # MATLAB writes large v7.3 variables chunked and gzip-compressed: not memory-mappable.
    cube = _cube(h=12, w=10)
    path = tmp_path / "scene.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("cube", data=cube.T, chunks=(31, 4, 4), compression="gzip")
    reader = arad.CubeReader(path, rgb_hw=(12, 10))
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
    assert arad.read_cube(path).shape == (W, H, 31)  # no RGB to compare against: as stored
    np.testing.assert_array_equal(arad.read_cube(path, rgb_hw=(H, W)), cube)
    # Windowed (lazy) reads follow the same fix.
    reader = arad.CubeReader(path, rgb_hw=(H, W))
    np.testing.assert_array_equal(reader.read_window(1, 2, 3, 2), cube[1:4, 2:4])
    reader.close()


# --------------------------------------------------------------------------------------------
# RGB
# --------------------------------------------------------------------------------------------


def test_rgb_min_max_over_all_pixels_and_channels_jointly(tmp_path):
    rgb = _write_png(tmp_path / "a.png")
    out = arad.read_rgb(tmp_path / "a.png")
    expected = (rgb.astype(np.float64) - rgb.min()) / (rgb.max() - rgb.min())
    assert out.dtype == np.float32 and out.shape == (H, W, 3)
    # float32 arithmetic on 8-bit inputs: error below 1e-6.
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0, abs=1e-6)


def test_rgb_normalisation_is_joint_not_per_channel(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = [[0, 100], [50, 100]], 200, [[20, 60], [40, 60]]
    Image.fromarray(rgb).save(tmp_path / "b.png")
    out = arad.read_rgb(tmp_path / "b.png")
    # Global min 0, max 200: blue's maximum 60 maps to 0.3, not 1 (float32: 1e-6).
    np.testing.assert_allclose(out[..., 2].max(), 0.3, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 1.0, atol=1e-6)


def test_constant_rgb_gives_zeros_not_nan():
    out = arad.normalize_rgb(np.full((4, 4, 3), 77, np.uint8))
    assert np.array_equal(out, np.zeros((4, 4, 3), np.float32))


# --------------------------------------------------------------------------------------------
# Split files and layout
# --------------------------------------------------------------------------------------------


def test_split_file_edge_cases(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(
        b"\xef\xbb\xbfARAD_1K_0003\r\n\r\n  ARAD_1K_0001.mat  \r\n\n"
        b"Train_Spec/ARAD_1K_0002.jpg\r\n# a comment\nARAD_1K_0001\nARAD_1K_0004"  # no final \n
    )
    assert arad.read_split_file(path) == [
        "ARAD_1K_0001",
        "ARAD_1K_0002",
        "ARAD_1K_0003",
        "ARAD_1K_0004",
    ]


def test_list_scenes_reads_layout_and_excludes(tmp_path):
    root = _layout(tmp_path, stems=("ARAD_1K_0001", "ARAD_1K_0314", "ARAD_1K_0002"))
    train = arad.list_scenes(root, "train", excluded_scenes=["ARAD_1K_0314"])
    assert [s.stem for s in train] == ["ARAD_1K_0001"]
    assert train[0].rgb_path == root / "Train_RGB" / "ARAD_1K_0001.png"
    assert train[0].cube_path == root / "Train_Spec" / "ARAD_1K_0001.mat"
    valid = arad.list_scenes(root, "valid")
    assert [s.stem for s in valid] == ["ARAD_1K_0002"]
    scenes = arad.FileScenes(valid)
    rgb, hsi = scenes.load(0)
    assert scenes.sizes == [(H, W)] and rgb.shape == (H, W, 3) and hsi.shape == (H, W, 31)


def test_valid_folders_preferred_when_present(tmp_path):
    root = _layout(tmp_path)
    (root / "Valid_RGB").mkdir()
    (root / "Valid_Spec").mkdir()
    _write_png(root / "Valid_RGB" / "ARAD_1K_0002.png", seed=9)
    write_mat73(root / "Valid_Spec" / "ARAD_1K_0002.mat", _cube(seed=9))
    (scene,) = arad.list_scenes(root, "valid")
    assert scene.rgb_path.parent.name == "Valid_RGB" and scene.cube_path.parent.name == "Valid_Spec"


def test_rgb_only_test_split(tmp_path):
    root = _layout(tmp_path)
    (root / "Test_RGB").mkdir()
    _write_png(root / "Test_RGB" / "ARAD_1K_0951.png")
    (scene,) = arad.list_scenes(root, "test", require_cubes=False)
    assert scene.stem == "ARAD_1K_0951" and scene.cube_path is None
    assert arad.FileScenes([scene]).load(0)[1] is None


# --------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file or key and the fix
# --------------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*data\.data_dir"):
        arad.check_layout(tmp_path / "nowhere")


@pytest.mark.parametrize("folder", ["Train_RGB", "Train_Spec", "split_txt"])
def test_missing_layout_folder(tmp_path, folder):
    root = _layout(tmp_path)
    for path in (root / folder).iterdir():
        path.unlink()
    (root / folder).rmdir()
    with pytest.raises(FileNotFoundError, match=rf"{folder} is missing.*MST\+\+ layout"):
        arad.list_scenes(root, "train")


def test_split_entry_without_rgb(tmp_path):
    root = _layout(tmp_path)
    (root / "split_txt" / "train_list.txt").write_text("ARAD_1K_0001\nARAD_1K_0099\n")
    with pytest.raises(
        FileNotFoundError, match=r"'ARAD_1K_0099' has no RGB image.*remove the line"
    ):
        arad.list_scenes(root, "train")


def test_split_entry_without_cube(tmp_path):
    root = _layout(tmp_path)
    (root / "Train_Spec" / "ARAD_1K_0001.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"'ARAD_1K_0001' has no cube.*excluded_scenes"):
        arad.list_scenes(root, "train")


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
        arad.read_cube(path)


def test_wrong_band_count(tmp_path):
    path = tmp_path / "ARAD_1K_0007.mat"
    write_mat73(path, _cube(bands=16))
    with pytest.raises(ValueError, match=r"ARAD_1K_0007\.mat: expected 'cube' with 31 bands"):
        arad.read_cube(path)


def test_size_mismatch_after_orientation_fix(tmp_path):
    path = tmp_path / "ARAD_1K_0008.mat"
    write_mat73(path, _cube(h=7, w=5))
    with pytest.raises(ValueError, match=r"ARAD_1K_0008\.mat: cube is 7x5.*RGB image is 6x5"):
        arad.read_cube(path, rgb_hw=(H, W))


def test_size_mismatch_in_layout_fails_at_construction(tmp_path):
    root = _layout(tmp_path)
    write_mat73(root / "Train_Spec" / "ARAD_1K_0001.mat", _cube(h=4, w=4))
    with pytest.raises(ValueError, match=r"ARAD_1K_0001\.mat: cube is 4x4"):
        arad.FileScenes(arad.list_scenes(root, "train"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_jpeg(tmp_path, damage):
    path = tmp_path / "ARAD_1K_0009.jpg"
    if damage == "garbage":
        path.write_bytes(b"not a jpeg at all")
    else:
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"ARAD_1K_0009\.jpg: unreadable image.*re-export"):
        arad.read_rgb(path)


def test_truncated_mat(tmp_path):
    path = tmp_path / "ARAD_1K_0010.mat"
    write_mat73(path, _cube(h=32, w=32))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"ARAD_1K_0010\.mat: cannot open.*truncated or corrupt"):
        arad.read_cube(path)


def test_truncated_mat_v5(tmp_path):
    path = tmp_path / "ARAD_1K_0011.mat"
    scipy.io.savemat(path, {"cube": _cube(h=32, w=32)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"ARAD_1K_0011\.mat: cannot read as MATLAB.*truncated"):
        arad.read_cube(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_cube(tmp_path, bad):
    cube = _cube()
    cube[2, 3, 4] = bad
    path = tmp_path / "ARAD_1K_0012.mat"
    write_mat73(path, cube)
    with pytest.raises(ValueError, match=r"ARAD_1K_0012\.mat: cube holds 1 NaN/Inf"):
        arad.read_cube(path)


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
        arad.read_cube(path, limits=arad.CubeLimits())
    arad.read_cube(path)  # without limits only NaN/Inf are checked


def test_cube_limits_tolerance_and_maximum_come_from_the_config(tmp_path):
    cube = _cube()
    cube[0, 0, :5] = -0.02  # five small negatives: noise of a calibration, or a sign error
    path = tmp_path / "ARAD_1K_0014.mat"
    write_mat73(path, cube)
    config = base.get_config()
    with pytest.raises(ValueError, match=r"5 of 930 values are below -0\.01 \(min -0\.02\)"):
        arad.read_cube(path, limits=arad.CubeLimits.from_config(config))
    config.data.negative_tolerance = 0.05
    arad.read_cube(path, limits=arad.CubeLimits.from_config(config))
    config.data.max_value = 0.5
    with pytest.raises(ValueError, match=r"above data\.max_value=0\.5"):
        arad.read_cube(path, limits=arad.CubeLimits.from_config(config))
    old = ml_collections.ConfigDict({"model": {}})  # a checkpoint's config from before the keys
    assert arad.CubeLimits.from_config(old) == arad.CubeLimits()


def test_empty_split(tmp_path):
    root = _layout(tmp_path)
    (root / "split_txt" / "train_list.txt").write_text("\r\n\n  \n")
    with pytest.raises(ValueError, match=r"train_list\.txt: the train split is empty"):
        arad.list_scenes(root, "train")
    # Everything excluded is empty too.
    (root / "split_txt" / "train_list.txt").write_text("ARAD_1K_0001\n")
    with pytest.raises(ValueError, match=r"empty after removing data\.excluded_scenes"):
        arad.list_scenes(root, "train", excluded_scenes=["ARAD_1K_0001"])
