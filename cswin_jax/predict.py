"""Turn RGB photos into 31-band spectral cubes (400-700 nm, 10 nm steps).

Usage:
  python -m cswin_jax.predict --checkpoint runs/gan --input photos/ --output cubes/ \
      [--format mat|h5|npy] [--preview] [--tiled] [--ensemble]

Inputs: one image or a folder of images (.jpg/.jpeg/.png/.tif/.tiff/.bmp, not recursive).
  * 8-bit and 16-bit RGB (16-bit PNG/TIFF are read at full precision).
  * RGBA: the alpha channel is dropped (with a warning); the colour channels are used as is.
  * Palette images are expanded to RGB.
  * Grayscale images are rejected: one channel carries no colour to reconstruct spectra from.
  Every image gets the MST++ normalisation the model was trained with: a per-image min-max
  over all pixels and the three channels jointly (not /255).

Outputs, per image `<stem>`, in --output:
  * `<stem>.mat`: MATLAB v7.3 (HDF5) with dataset `cube` stored (31, W, H) single, i.e. H x W x 31
    in MATLAB, exactly like the ARAD-1K files (read with h5py: `f['cube'][:].T` -> H x W x 31),
    plus `bands` (wavelengths, nm) and `norm_factor` (1).
  * `<stem>.h5`: dataset `cube` [H, W, 31] float32, attribute `wavelengths_nm`.
  * `<stem>.npy`: [H, W, 31] float32.
  * `<stem>_preview.png` with --preview: the cube rendered to sRGB (CIE 1931, D65).
  Values are clamped to [0, 1] unless --noclamp (NTIRE submissions are clamped). Exit status 1
when some images of a folder could not be read (the others are still written).

Inference runs on the whole frame; --tiled (or any image above --max_whole_pixels) runs
128-pixel tiles with overlap 16 and cosine blending (`cswin_jax.inference`).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
from absl import logging
from PIL import Image

import cswin_jax
from cswin_jax import cli
from cswin_jax.data import arad

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
FORMATS = ("mat", "h5", "npy")
WAVELENGTHS_NM = np.arange(400, 701, 10)

# Pillow decodes 16-bit-per-channel RGB(A) into 8-bit modes by keeping the high byte; the
# matching little/big-endian raw mode of the same codec yields the low byte instead.
_SWAPPED_16BIT = {";16B": ";16L", ";16L": ";16B"}


# ----------------------------------------------------------------------------- reading


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


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Decodes an RGB photo without normalising it.

    Returns:
      [H, W, 3] uint8 or uint16 (16-bit PNG/TIFF at full precision).

    Raises:
      ValueError: unreadable file, grayscale image, or a mode with no RGB meaning.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise ValueError(
                    f"{path}: grayscale image (mode {mode}); the model reconstructs spectra from "
                    "colour and needs a 3-channel RGB image. Convert it to RGB first if you "
                    "really want a (colourless) prediction"
                )
            if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
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


def read_rgb(path: str | pathlib.Path) -> np.ndarray:
    """Reads a photo and applies the MST++ normalisation. Returns [H, W, 3] float32 in [0, 1]."""
    return arad.normalize_rgb(read_image(path))


def read_cube(path: str | pathlib.Path) -> np.ndarray:
    """Reads a cube written by `write_cube` or an ARAD-1K file. Returns [H, W, 31] float32."""
    return arad.read_cube(path)


# ----------------------------------------------------------------------------- writing


def write_cube(path: str | pathlib.Path, cube: np.ndarray) -> pathlib.Path:
    """Writes `cube` [H, W, 31] in the format given by the file suffix (.mat / .h5 / .npy)."""
    from cswin_jax.data import synthetic

    path = pathlib.Path(path)
    cube = np.ascontiguousarray(cube, dtype=np.float32)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "mat":
        synthetic.write_mat73(path, cube)
    elif fmt == "h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("cube", data=cube, compression="gzip", compression_opts=4)
            f["cube"].attrs["layout"] = "HWC"
            f["cube"].attrs["wavelengths_nm"] = WAVELENGTHS_NM[: cube.shape[-1]]
    elif fmt == "npy":
        np.save(path, cube)
    else:
        raise ValueError(f"{path}: unknown cube format {fmt!r}; use one of {FORMATS}")
    return path


def write_preview(path: str | pathlib.Path, cube: np.ndarray) -> pathlib.Path:
    """sRGB rendering of `cube` (CIE 1931 / D65, auto exposure) as an 8-bit PNG."""
    from cswin_jax import viz

    srgb = viz.hsi_to_srgb(cube)
    Image.fromarray(np.round(srgb * 255).astype(np.uint8)).save(path)
    return pathlib.Path(path)


def ensure_writable_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Creates `path` if needed and checks a file can be written there."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as err:
        raise PermissionError(
            f"output folder {path} is not writable ({err.strerror or err}); pass --output "
            "pointing to a folder you can write to"
        ) from err
    return path


def list_inputs(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The image, or every image in the folder (sorted, not recursive)."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"--input folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ValueError(
            f"--input folder {path}: several images share the stem(s) {clashes}, so their "
            "cubes would overwrite each other; rename them"
        )
    return images


# ----------------------------------------------------------------------------- prediction


def run(
    apply_fn,
    inputs: Sequence[pathlib.Path],
    output_dir: pathlib.Path,
    *,
    fmt: str = "mat",
    preview: bool = False,
    tiled: bool = False,
    ensemble: bool = False,
    clamp: bool = True,
    max_whole_pixels: int = 1 << 20,
    settings: Any = None,
) -> tuple[list[pathlib.Path], dict[str, str]]:
    """Predicts every input and writes the cubes. Returns (written files, {image: error}).

    settings: the model's `config.eval` (`inference.eval_settings`), whose tiles serve
    --tiled and images over `max_whole_pixels`; None: the defaults of configs/base.py."""
    from cswin_jax import inference

    settings = inference.eval_settings({}) if settings is None else settings
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    written, failed = [], {}
    for index, path in enumerate(inputs):
        start = time.perf_counter()
        try:
            rgb = read_rgb(path)
        except (ValueError, FileNotFoundError) as err:
            if len(inputs) == 1:
                raise
            logging.error("skipping %s", err)
            failed[str(path)] = str(err)
            continue
        use_tiles = tiled or rgb.shape[0] * rgb.shape[1] > max_whole_pixels
        cube = inference.predict_frame(apply_fn, rgb, settings, tiled=use_tiles, ensemble=ensemble)
        if clamp:
            cube = np.clip(cube, 0.0, 1.0)
        written.append(write_cube(output_dir / f"{path.stem}.{fmt}", cube))
        if preview:
            written.append(write_preview(output_dir / f"{path.stem}_preview.png", cube))
        logging.info(
            "[%d/%d] %s: %dx%d -> %s (%s, %.2f s)",
            index + 1,
            len(inputs),
            path.name,
            rgb.shape[1],
            rgb.shape[0],
            written[-1 - int(preview)].name,
            "tiled" if use_tiles else "whole frame",
            time.perf_counter() - start,
        )
    return written, failed


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cswin_jax.predict", description="RGB photos -> 31-band spectral cubes."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder (training or converted)",
    )
    parser.add_argument("--input", required=True, help="an RGB image or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the cubes (created if missing)")
    parser.add_argument("--format", choices=FORMATS, default="mat", help="cube file format")
    parser.add_argument("--preview", action="store_true", help="also write an sRGB preview PNG")
    parser.add_argument(
        "--tiled",
        action="store_true",
        help="tiled inference (config.eval tiles)",
    )
    parser.add_argument("--ensemble", action="store_true", help="8-way flip/rotate self-ensemble")
    parser.add_argument(
        "--noclamp", dest="clamp", action="store_false", help="keep values outside [0, 1]"
    )
    parser.add_argument(
        "--raw_weights",
        dest="use_ema",
        action="store_false",
        help="use the raw (not EMA) generator weights of a training checkpoint",
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="training step (only for delayed_sigmoid)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (bfloat16: faster on GPUs, float32 weights and output)",
    )
    parser.add_argument(
        "--max_whole_pixels",
        type=int,
        default=1 << 20,
        help="images with more pixels run tiled even without --tiled",
    )
    cli.add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when some images failed)."""
    args = build_parser().parse_args(argv)
    logging.set_verbosity(logging.INFO)
    from cswin_jax import inference

    output_dir = ensure_writable_dir(args.output)
    inputs = list_inputs(args.input)
    apply_fn, config = inference.load_generator(
        args.checkpoint, use_ema=args.use_ema, step=args.step, dtype=args.dtype
    )
    written, failed = run(
        apply_fn,
        inputs,
        output_dir,
        fmt=args.format,
        preview=args.preview,
        tiled=args.tiled,
        ensemble=args.ensemble,
        clamp=args.clamp,
        max_whole_pixels=args.max_whole_pixels,
        settings=inference.eval_settings(config),
    )
    print(f"wrote {len(written)} files to {output_dir}")
    for path, error in failed.items():
        print(f"FAILED {path}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run_argparse(main)
