"""ARAD-1K / MST++ layout reader (`cswin_jax/data/arad.py`): splits, scene files, errors.

Every file here is written by the test itself (tiny 6x5 scenes). Reading the files themselves
(cube formats, orientation, value limits, RGB decoding): tests/test_io.py.
"""

import pathlib

import numpy as np
import pytest
from PIL import Image

from cswin_jax.cubes import write_mat73
from cswin_jax.data import arad

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


def test_size_mismatch_in_layout_fails_at_construction(tmp_path):
    root = _layout(tmp_path)
    write_mat73(root / "Train_Spec" / "ARAD_1K_0001.mat", _cube(h=4, w=4))
    with pytest.raises(ValueError, match=r"ARAD_1K_0001\.mat: cube is 4x4"):
        arad.FileScenes(arad.list_scenes(root, "train"))


def test_empty_split(tmp_path):
    root = _layout(tmp_path)
    (root / "split_txt" / "train_list.txt").write_text("\r\n\n  \n")
    with pytest.raises(ValueError, match=r"train_list\.txt: the train split is empty"):
        arad.list_scenes(root, "train")
    # Everything excluded is empty too.
    (root / "split_txt" / "train_list.txt").write_text("ARAD_1K_0001\n")
    with pytest.raises(ValueError, match=r"empty after removing data\.excluded_scenes"):
        arad.list_scenes(root, "train", excluded_scenes=["ARAD_1K_0001"])
