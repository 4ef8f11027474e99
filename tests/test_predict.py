"""Predict CLI: image reading (8/16-bit, RGBA, grayscale, broken files), cube writers in the
ARAD orientation, tiled vs whole-frame cubes, folder handling and bad checkpoints/outputs."""

import os
import struct
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image
from stand_in_models import BANDS, conv_model, write_tiny_checkpoint

from cswin_jax import inference, predict
from cswin_jax.data import arad

# ----------------------------------------------------------------------------- image writers


def _write_png16(path, pixels):
    """Minimal 16-bit PNG writer (Pillow cannot write 16-bit RGB): filter 0, one IDAT."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _write_tiff16(path, pixels):
    """Minimal uncompressed little-endian 16-bit RGB TIFF (one strip)."""
    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    bits = struct.pack("<3H", 16, 16, 16)
    data_offset = 8 + len(bits)
    ifd_offset = data_offset + len(data)
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, 8),  # BitsPerSample -> the three shorts at offset 8
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, data_offset),
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(data)),
        (284, 3, 1, 1),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        if kind == 3 and count == 1:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, kind, count, value)
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + bits + data + ifd)


def _pixels(height, width, channels=3, dtype=np.uint8, seed=0):
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (height, width, channels), dtype=dtype)


# ----------------------------------------------------------------------------- reading


def test_reads_8bit_png_and_jpeg(tmp_path):
    pixels = _pixels(20, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "a.png"), pixels)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    decoded = predict.read_image(tmp_path / "a.jpg")
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("writer,suffix", [(_write_png16, "png"), (_write_tiff16, "tif")])
def test_reads_16bit_at_full_precision(tmp_path, writer, suffix):
    """Pillow alone keeps only the high byte of 16-bit RGB; the reader recovers all 16 bits."""
    pixels = _pixels(9, 13, dtype=np.uint16)
    path = tmp_path / f"deep.{suffix}"
    writer(path, pixels)
    decoded = predict.read_image(path)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, pixels)
    # MST++ min-max normalisation of the full-precision values.
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    np.testing.assert_allclose(predict.read_rgb(path), expected, rtol=0, atol=1e-6)


def test_rgba_drops_alpha(tmp_path):
    pixels = _pixels(8, 10, channels=4)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "rgba.png"), pixels[..., :3])
    deep = _pixels(8, 10, channels=4, dtype=np.uint16)
    _write_png16(tmp_path / "rgba16.png", deep)
    np.testing.assert_array_equal(predict.read_image(tmp_path / "rgba16.png"), deep[..., :3])


def test_palette_image_is_expanded(tmp_path):
    image = Image.fromarray(_pixels(8, 10)).convert("P")
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        predict.read_image(tmp_path / "palette.png"), np.asarray(image.convert("RGB"))
    )


def test_grayscale_is_rejected(tmp_path):
    Image.fromarray(_pixels(8, 10, channels=1)[..., 0], "L").save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray\.png: grayscale image \(mode L\)"):
        predict.read_image(tmp_path / "gray.png")
    _write_png16(tmp_path / "gray16.png", _pixels(8, 10, channels=1, dtype=np.uint16))
    with pytest.raises(ValueError, match="grayscale"):
        predict.read_image(tmp_path / "gray16.png")


def test_unreadable_and_missing_images(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        predict.read_image(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.read_image(tmp_path / "missing.png")
    Image.fromarray(_pixels(1, 10)).save(tmp_path / "line.png")
    with pytest.raises(ValueError, match="need >= 2x2"):
        predict.read_image(tmp_path / "line.png")


# ----------------------------------------------------------------------------- writing


def _cube(height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (height, width, BANDS)).astype(np.float32)


def test_mat_output_is_arad_oriented_v73(tmp_path):
    cube = _cube(7, 11)
    path = predict.write_cube(tmp_path / "scene.mat", cube)
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        stored = f["cube"][:]
    assert stored.shape == (BANDS, 11, 7)  # (31, W, H), as the ARAD-1K files
    np.testing.assert_array_equal(stored.T, cube)
    np.testing.assert_array_equal(arad.read_cube(path, rgb_hw=(7, 11)), cube)


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_h5_and_npy_round_trip(tmp_path, fmt):
    cube = _cube(7, 11)
    path = predict.write_cube(tmp_path / f"scene.{fmt}", cube)
    np.testing.assert_array_equal(predict.read_cube(path), cube)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown cube format 'png'"):
        predict.write_cube(tmp_path / "x.png", _cube(2, 2))


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
    cubes = {}
    for mode in ("whole", "tiled"):
        out = tmp_path / mode
        out.mkdir()
        written, failed = predict.run(
            conv, inputs, out, fmt="mat", tiled=mode == "tiled", clamp=False, preview=True
        )
        assert not failed and [p.name for p in written] == ["photo.mat", "photo_preview.png"]
        with h5py.File(out / "photo.mat", "r") as f:
            assert f["cube"].shape == (BANDS, width, height)
        cubes[mode] = predict.read_cube(out / "photo.mat")
        with Image.open(out / "photo_preview.png") as preview:
            assert preview.size == (width, height) and preview.mode == "RGB"
    away = ~inference.seam_mask(height, width, 128, 16, margin=3)
    np.testing.assert_allclose(cubes["tiled"][away], cubes["whole"][away], rtol=0, atol=1e-4)


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
