"""RGB photos (`cswin_jax/io.py`): decoding (8/16-bit, RGBA, palette, grayscale, broken files;
the dataset's 8-bit path) and the MST++ normalisation.

Every file here is written by the test itself (tiny images); values are compared exactly
unless a tolerance is stated.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cswin_jax import io as hsi_io

H, W = 6, 5


def _write_png(path, h=H, w=W, seed=0):
    rgb = np.random.default_rng(seed).integers(10, 240, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _pixels(height, width, channels=3, dtype=np.uint8, seed=0):
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (height, width, channels), dtype=dtype)


# --------------------------------------------------------------------------------------------
# RGB: decoding
# --------------------------------------------------------------------------------------------


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


def test_reads_8bit_png_and_jpeg(tmp_path):
    pixels = _pixels(20, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(hsi_io.read_image(tmp_path / "a.png"), pixels)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    decoded = hsi_io.read_image(tmp_path / "a.jpg")
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("writer,suffix", [(_write_png16, "png"), (_write_tiff16, "tif")])
def test_reads_16bit_at_full_precision(tmp_path, writer, suffix):
    """Pillow alone keeps only the high byte of 16-bit RGB; the reader recovers all 16 bits."""
    pixels = _pixels(9, 13, dtype=np.uint16)
    path = tmp_path / f"deep.{suffix}"
    writer(path, pixels)
    decoded = hsi_io.read_image(path)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, pixels)
    # MST++ min-max normalisation of the full-precision values.
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    np.testing.assert_allclose(hsi_io.read_rgb(path), expected, rtol=0, atol=1e-6)


def test_rgba_drops_alpha(tmp_path):
    pixels = _pixels(8, 10, channels=4)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(hsi_io.read_image(tmp_path / "rgba.png"), pixels[..., :3])
    deep = _pixels(8, 10, channels=4, dtype=np.uint16)
    _write_png16(tmp_path / "rgba16.png", deep)
    np.testing.assert_array_equal(hsi_io.read_image(tmp_path / "rgba16.png"), deep[..., :3])


def test_palette_image_is_expanded(tmp_path):
    image = Image.fromarray(_pixels(8, 10)).convert("P")
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        hsi_io.read_image(tmp_path / "palette.png"), np.asarray(image.convert("RGB"))
    )


def test_grayscale_is_rejected(tmp_path):
    Image.fromarray(_pixels(8, 10, channels=1)[..., 0], "L").save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray\.png: grayscale image \(mode L\)"):
        hsi_io.read_image(tmp_path / "gray.png")
    _write_png16(tmp_path / "gray16.png", _pixels(8, 10, channels=1, dtype=np.uint16))
    with pytest.raises(ValueError, match="grayscale"):
        hsi_io.read_image(tmp_path / "gray16.png")


def test_unreadable_and_missing_images(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        hsi_io.read_image(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hsi_io.read_image(tmp_path / "missing.png")
    Image.fromarray(_pixels(1, 10)).save(tmp_path / "line.png")
    with pytest.raises(ValueError, match="need >= 2x2"):
        hsi_io.read_image(tmp_path / "line.png")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_jpeg(tmp_path, damage):
    path = tmp_path / "ARAD_1K_0009.jpg"
    if damage == "garbage":
        path.write_bytes(b"not a jpeg at all")
    else:
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(
        ValueError, match=r"ARAD_1K_0009\.jpg: unreadable image.*re-export.*excluded_scenes"
    ):
        hsi_io.read_rgb(path, eight_bit=True)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_dataset_path_agrees_with_the_general_reader_on_8bit_files(tmp_path, suffix):
    """`eight_bit=True` (the dataset readers) decodes an 8-bit RGB file to the same pixels as
    the general reader, and as the loader's former `Image.convert("RGB")` decoding."""
    path = tmp_path / f"scene.{suffix}"
    Image.fromarray(_pixels(20, 30)).save(path, **({"quality": 90} if suffix == "jpg" else {}))
    eight = hsi_io.read_image(path, eight_bit=True)
    with Image.open(path) as image:
        np.testing.assert_array_equal(eight, np.asarray(image.convert("RGB"), dtype=np.uint8))
    general = hsi_io.read_image(path)
    assert eight.dtype == general.dtype == np.uint8
    np.testing.assert_array_equal(eight, general)
    np.testing.assert_array_equal(
        hsi_io.read_rgb(path, eight_bit=True), hsi_io.read_rgb(path)
    )  # bit-identical float32


def test_16bit_png_keeps_its_precision_and_the_dataset_path_its_high_byte(tmp_path):
    pixels = _pixels(9, 13, dtype=np.uint16, seed=3)
    path = tmp_path / "deep.png"
    _write_png16(path, pixels)
    np.testing.assert_array_equal(hsi_io.read_image(path), pixels)
    assert np.any(pixels & 0xFF)  # low bytes the 8-bit path drops
    np.testing.assert_array_equal(hsi_io.read_image(path, eight_bit=True), pixels >> 8)


def test_dataset_path_repeats_grayscale_over_the_channels(tmp_path):
    """The dataset readers keep decoding grayscale files (as cv2.imread does for MST++); the
    general reader rejects them (`test_grayscale_is_rejected`)."""
    gray = _pixels(8, 10, channels=1)[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(
        hsi_io.read_image(tmp_path / "gray.png", eight_bit=True), np.repeat(gray[..., None], 3, -1)
    )


# --------------------------------------------------------------------------------------------
# RGB: MST++ normalisation
# --------------------------------------------------------------------------------------------


def test_rgb_min_max_over_all_pixels_and_channels_jointly(tmp_path):
    rgb = _write_png(tmp_path / "a.png")
    out = hsi_io.read_rgb(tmp_path / "a.png", eight_bit=True)
    expected = (rgb.astype(np.float64) - rgb.min()) / (rgb.max() - rgb.min())
    assert out.dtype == np.float32 and out.shape == (H, W, 3)
    # float32 arithmetic on 8-bit inputs: error below 1e-6.
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0, abs=1e-6)


def test_rgb_normalisation_is_joint_not_per_channel(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = [[0, 100], [50, 100]], 200, [[20, 60], [40, 60]]
    Image.fromarray(rgb).save(tmp_path / "b.png")
    out = hsi_io.read_rgb(tmp_path / "b.png", eight_bit=True)
    # Global min 0, max 200: blue's maximum 60 maps to 0.3, not 1 (float32: 1e-6).
    np.testing.assert_allclose(out[..., 2].max(), 0.3, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 1.0, atol=1e-6)


def test_constant_rgb_gives_zeros_not_nan():
    out = hsi_io.normalize_rgb(np.full((4, 4, 3), 77, np.uint8))
    assert np.array_equal(out, np.zeros((4, 4, 3), np.float32))
