r"""Turn RGB photos into 31-band spectral cubes (400-700 nm, 10 nm steps).

Usage:
  python -m cswin_jax.predict --checkpoint runs/gan --input photos/ --output cubes/ \
      [--format mat|h5|npy] [--preview] [--tiled] [--ensemble]

Inputs: one image or a folder of images (.jpg/.jpeg/.png/.tif/.tiff/.bmp, not recursive),
read by `cswin_jax.io.read_rgb`:
  * 8-bit and 16-bit RGB (16-bit PNG/TIFF are read at full precision).
  * RGBA: the alpha channel is dropped (with a warning); the colour channels are used as is.
  * Palette images are expanded to RGB.
  * Grayscale images are rejected: one channel carries no colour to reconstruct spectra from.
  Every image gets the MST++ normalisation the model was trained with: a per-image min-max
  over all pixels and the three channels jointly (not /255).

Outputs, per image `<stem>`, in --output (`cswin_jax.cubes.write_cube`):
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

import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags, logging
from PIL import Image

import cswin_jax
from cswin_jax import cli, cubes, srgb
from cswin_jax import io as hsi_io

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


# ----------------------------------------------------------------------------- writing


def write_preview(path: str | pathlib.Path, cube: np.ndarray) -> pathlib.Path:
    """sRGB rendering of `cube` (CIE 1931 / D65, auto exposure) as an 8-bit PNG."""
    rendered = srgb.hsi_to_srgb(cube)
    Image.fromarray(np.round(rendered * 255).astype(np.uint8)).save(path)
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
    if fmt not in cubes.CUBE_FORMATS:
        raise ValueError(f"--format must be one of {cubes.CUBE_FORMATS}, got {fmt!r}")
    written, failed = [], {}
    for index, path in enumerate(inputs):
        start = time.perf_counter()
        try:
            rgb = hsi_io.read_rgb(path)
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
        written.append(cubes.write_cube(output_dir / f"{path.stem}.{fmt}", cube))
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


def define_weight_flags(
    flag_values: flags.FlagValues,
) -> tuple[flags.FlagHolder[bool], flags.FlagHolder[int | None], flags.FlagHolder[str]]:
    """`--raw_weights`, `--step`, `--dtype` on `flag_values`: which generator weights to restore
    and how to run them (`inference.load_generator`); predict and evaluate define the same."""
    raw_weights = flags.DEFINE_bool(
        "raw_weights",
        False,
        "Use the raw (not EMA) generator weights of a training checkpoint.",
        flag_values=flag_values,
    )
    step = flags.DEFINE_integer(
        "step", None, "Training step (only for delayed_sigmoid).", flag_values=flag_values
    )
    dtype = flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "Compute dtype (bfloat16: faster on GPUs; float32 weights and output).",
        flag_values=flag_values,
    )
    return raw_weights, step, dtype


_FLAGS = cli.program_flags()  # its own set: evaluate, floor, ... share names (cli.program_flags)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Checkpoint folder (training or converted). Required.",
    flag_values=_FLAGS,
    required=True,
)
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "An RGB image or a folder of images. Required.",
    flag_values=_FLAGS,
    required=True,
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Folder for the cubes (created if missing). Required.",
    flag_values=_FLAGS,
    required=True,
)
_FORMAT = flags.DEFINE_enum(
    "format", "mat", cubes.CUBE_FORMATS, "Cube file format.", flag_values=_FLAGS
)
_PREVIEW = flags.DEFINE_bool(
    "preview", False, "Also write an sRGB preview PNG per image.", flag_values=_FLAGS
)
_TILED = flags.DEFINE_bool(
    "tiled", False, "Tiled inference (the checkpoint's config.eval tiles).", flag_values=_FLAGS
)
_ENSEMBLE = flags.DEFINE_bool(
    "ensemble", False, "8-way flip/rotate self-ensemble.", flag_values=_FLAGS
)
_CLAMP = flags.DEFINE_bool(
    "clamp",
    True,
    "Clamp the cubes to [0, 1]; --noclamp keeps values outside.",
    flag_values=_FLAGS,
)
_RAW_WEIGHTS, _STEP, _DTYPE = define_weight_flags(_FLAGS)
_MAX_WHOLE_PIXELS = flags.DEFINE_integer(
    "max_whole_pixels",
    1 << 20,
    "Images with more pixels run tiled even without --tiled.",
    flag_values=_FLAGS,
)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `argv` are the arguments (None: sys.argv[1:]); returns the exit
    status (1 when some images failed)."""
    cli.parse_flags(_FLAGS, argv, __doc__)
    logging.set_verbosity(logging.INFO)
    from cswin_jax import inference

    output_dir = ensure_writable_dir(_OUTPUT.value)
    inputs = list_inputs(_INPUT.value)
    apply_fn, config = inference.load_generator(
        _CHECKPOINT.value, use_ema=not _RAW_WEIGHTS.value, step=_STEP.value, dtype=_DTYPE.value
    )
    written, failed = run(
        apply_fn,
        inputs,
        output_dir,
        fmt=_FORMAT.value,
        preview=_PREVIEW.value,
        tiled=_TILED.value,
        ensemble=_ENSEMBLE.value,
        clamp=_CLAMP.value,
        max_whole_pixels=_MAX_WHOLE_PIXELS.value,
        settings=inference.eval_settings(config),
    )
    print(f"wrote {len(written)} files to {output_dir}")
    for path, error in failed.items():
        print(f"FAILED {path}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main, flag_values=_FLAGS)
