"""Predict CLI: tiled vs whole-frame cubes, folder handling (a bad image among good ones),
output folders, and bad checkpoints. Image and cube files themselves: tests/test_io.py."""

import os

import h5py
import numpy as np
import pytest
from PIL import Image
from stand_in_models import BANDS, conv_model, write_tiny_checkpoint

from cswin_jax import cubes, inference, predict


def _pixels(height, width, channels=3, dtype=np.uint8, seed=0):
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (height, width, channels), dtype=dtype)


# ------------------------------------------------------------------------- output folder, inputs


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        predict.ensure_writable_dir(blocker / "cubes")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                predict.ensure_writable_dir(locked)
        finally:
            locked.chmod(0o755)


def test_list_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        predict.list_inputs(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="holds no"):
        predict.list_inputs(tmp_path)
    Image.fromarray(_pixels(4, 4)).save(tmp_path / "a.png")
    Image.fromarray(_pixels(4, 4)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"share the stem\(s\) \['a'\]"):
        predict.list_inputs(tmp_path)


# ----------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def conv():
    return conv_model()


@pytest.mark.parametrize("height,width", [(482, 512), (97, 131)])
def test_tiled_and_whole_cubes_agree_away_from_seams(tmp_path, conv, height, width):
    """Translation-equivariant stand-in (5x5 conv): the written cubes agree within 1e-4
    away from tile seams (3-pixel margin; the conv sees 2 pixels), and read back in the ARAD
    orientation."""
    Image.fromarray(_pixels(height, width, seed=height)).save(tmp_path / "photo.png")
    inputs = [tmp_path / "photo.png"]
    written_cubes = {}
    for mode in ("whole", "tiled"):
        out = tmp_path / mode
        out.mkdir()
        written, failed = predict.run(
            conv, inputs, out, fmt="mat", tiled=mode == "tiled", clamp=False, preview=True
        )
        assert not failed and [p.name for p in written] == ["photo.mat", "photo_preview.png"]
        with h5py.File(out / "photo.mat", "r") as f:
            assert f["cube"].shape == (BANDS, width, height)
        written_cubes[mode] = cubes.read_cube(out / "photo.mat")
        with Image.open(out / "photo_preview.png") as preview:
            assert preview.size == (width, height) and preview.mode == "RGB"
    away = ~inference.seam_mask(height, width, 128, 16, margin=3)
    np.testing.assert_allclose(
        written_cubes["tiled"][away], written_cubes["whole"][away], rtol=0, atol=1e-4
    )


def test_folder_with_a_bad_image_writes_the_others(tmp_path, conv):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(_pixels(20, 24)).save(images / "good.png")
    Image.fromarray(_pixels(20, 24, channels=1)[..., 0], "L").save(images / "gray.png")
    out = tmp_path / "out"
    out.mkdir()
    written, failed = predict.run(conv, predict.list_inputs(images), out, fmt="npy")
    assert [p.name for p in written] == ["good.npy"]
    assert (
        list(failed) == [str(images / "gray.png")]
        and "grayscale" in failed[str(images / "gray.png")]
    )
    cube = np.load(out / "good.npy")
    assert cube.shape == (20, 24, BANDS) and cube.min() >= 0 and cube.max() <= 1  # clamped


# ----------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_cli_end_to_end(tmp_path, tiny_checkpoint):
    """Tiny generator checkpoint, --tiled (64-pixel tiles from its config.eval): a 97x131
    photo gives a .mat cube readable like the ARAD files, and a preview PNG."""
    Image.fromarray(_pixels(97, 131)).save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    status = predict.main(
        ["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "photo.jpg"),
         "--output", str(out), "--format", "mat", "--preview", "--tiled"]
    )  # fmt: skip
    assert status == 0
    with h5py.File(out / "photo.mat", "r") as f:
        cube = f["cube"][:].T
    assert cube.shape == (97, 131, BANDS) and np.isfinite(cube).all()
    assert cube.min() >= 0 and cube.max() <= 1 and cube.std() > 0  # clamped, not constant
    with Image.open(out / "photo_preview.png") as preview:
        assert preview.size == (131, 97)


def test_cli_bad_checkpoints(tmp_path):
    Image.fromarray(_pixels(16, 16)).save(tmp_path / "photo.png")
    args = ["--input", str(tmp_path / "photo.png"), "--output", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.main(["--checkpoint", str(tmp_path / "missing"), *args])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        predict.main(["--checkpoint", str(tmp_path / "empty"), *args])
    other = write_tiny_checkpoint(tmp_path / "other", base_channels=8, params_channels=16)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        predict.main(["--checkpoint", str(other), *args])
