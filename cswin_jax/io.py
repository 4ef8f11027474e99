"""RGB photos and the band grid: decoding images, the MST++ input normalisation.

Every RGB image the package reads goes through here: the dataset readers (`cswin_jax.data`),
predict, evaluate and viz. Imported as `from cswin_jax import io as hsi_io`, so the standard
library's `io` keeps its name.

Bands: 31, at 400, 410, ..., 700 nm (`WAVELENGTHS_NM`, `NUM_BANDS`).

RGB (`read_image`, `read_rgb`):
  * default: 8-bit and 16-bit RGB (16-bit PNG/TIFF at full precision), RGBA with the alpha
    dropped (a warning when it held transparency), palette images expanded, CMYK / YCbCr /
    LAB / HSV converted; grayscale rejected (one channel carries no colour to reconstruct
    spectra from), as are images under 2x2.
  * `eight_bit=True`, the training data's decoding (the dataset readers): every image as 8-bit
    RGB through Pillow's `convert("RGB")`, as MST++'s `cv2.imread` gives it: 16-bit keeps its
    high byte, grayscale is repeated over the three channels. For 8-bit RGB files both give
    the same pixels.
  `read_rgb` applies the MST++ input normalisation (`normalize_rgb`): a per-image min-max
  over all pixels and the three channels jointly, to float32 [0, 1] (not /255).

Cubes are read, checked and written by `cswin_jax.cubes`.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging
from PIL import Image

WAVELENGTHS_NM = np.arange(400, 701, 10)
NUM_BANDS = len(WAVELENGTHS_NM)  # 31
# The fix named by every dataset file error (cube and image readers, `cswin_jax.data.arad`).
EXCLUDE_HINT = "add its stem to data.excluded_scenes to skip it"

# Pillow decodes 16-bit-per-channel RGB(A) into 8-bit modes by keeping the high byte; the
# matching little/big-endian raw mode of the same codec yields the low byte instead.
_SWAPPED_16BIT = {";16B": ";16L", ";16L": ";16B"}
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_CONVERTIBLE_MODES = ("CMYK", "YCbCr", "LAB", "HSV")


# ---------------------------------------------------------------------------------------------
# RGB
# ---------------------------------------------------------------------------------------------


def _swap_rawmode(rawmode: str) -> str | None:
    for tag, swapped in _SWAPPED_16BIT.items():
        if rawmode.endswith(tag):
            return rawmode[: -len(tag)] + swapped
    return None


def _tile_rawmode(tile) -> str:
    args = tile.args
    return args if isinstance(args, str) else str(args[0])


def _read_low_bytes(path: pathlib.Path) -> np.ndarray | None:
    """Low bytes of a 16-bit-per-channel RGB(A) image, or None when it is not one."""
    with Image.open(path) as image:
        tiles = list(image.tile)
        if not tiles:
            return None
        swapped_tiles = []
        for tile in tiles:
            swapped = _swap_rawmode(_tile_rawmode(tile))
            if swapped is None:
                return None
            args = swapped if isinstance(tile.args, str) else (swapped, *tile.args[1:])
            swapped_tiles.append(tile._replace(args=args))
        image.tile = swapped_tiles
        return np.asarray(image)


def _read_eight_bit(path: pathlib.Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        raise ValueError(
            f"{path}: unreadable image ({err}); re-export or re-download it, or {EXCLUDE_HINT}"
        ) from err


def read_image(path: str | pathlib.Path, *, eight_bit: bool = False) -> np.ndarray:
    """Decodes an RGB photo without normalising it.

    eight_bit: the training data's decoding (see the module docstring): any image Pillow can
      convert, as [H, W, 3] uint8, and an unreadable file names data.excluded_scenes.

    Returns:
      [H, W, 3] uint8, or uint16 for 16-bit PNG/TIFF unless `eight_bit`.

    Raises:
      FileNotFoundError: no such file (unless `eight_bit`: ValueError).
      ValueError: unreadable file, grayscale image, or a mode with no RGB meaning.
    """
    path = pathlib.Path(path)
    if eight_bit:
        return _read_eight_bit(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            if mode in _GRAYSCALE_MODES:
                raise ValueError(
                    f"{path}: grayscale image (mode {mode}); the model reconstructs spectra from "
                    "colour and needs a 3-channel RGB image. Convert it to RGB first if you "
                    "really want a (colourless) prediction"
                )
            if mode in _CONVERTIBLE_MODES:
                image = image.convert("RGB")
                mode = "RGB"
            if mode not in ("RGB", "RGBA"):
                raise ValueError(
                    f"{path}: unsupported image mode {mode}; save it as 8- or 16-bit RGB"
                )
            pixels = np.asarray(image)
    except (OSError, SyntaxError) as err:  # Pillow's errors for unreadable / truncated files
        raise ValueError(
            f"{path}: unreadable image ({err}); re-export it as JPEG, PNG or TIFF"
        ) from err
    low = _read_low_bytes(path)
    if low is not None and low.shape == pixels.shape:
        pixels = (pixels.astype(np.uint16) << 8) | low.astype(np.uint16)
    if pixels.shape[-1] == 4:
        alpha = pixels[..., 3]
        if alpha.min() < np.iinfo(alpha.dtype).max:  # some transparency is lost
            logging.warning("%s: RGBA image; the alpha channel is ignored", path)
        pixels = pixels[..., :3]
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"{path}: decoded to shape {pixels.shape}, expected [H, W, 3]")
    if min(pixels.shape[:2]) < 2:
        raise ValueError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}; need >= 2x2")
    return pixels


def normalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """MST++ input normalisation: per-image min-max over all pixels and channels jointly.

    rgb: [H, W, 3] any numeric dtype. Returns [H, W, 3] float32 in [0, 1]; zeros when the
    image is constant (range < 1e-12), as in the original.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    low, high = float(rgb.min()), float(rgb.max())
    if high - low < 1e-12:
        return np.zeros_like(rgb)
    return (rgb - np.float32(low)) * np.float32(1.0 / (high - low))


def read_rgb(path: str | pathlib.Path, *, eight_bit: bool = False) -> np.ndarray:
    """`read_image` then `normalize_rgb`: [H, W, 3] float32 in [0, 1], the model's input."""
    return normalize_rgb(read_image(path, eight_bit=eight_bit))
