"""Cube files: reading 31-band cubes (whole or in windows), checking their values, writing them.

Cubes (`read_cube`, `CubeReader` for windowed reads):
  * `.mat` v7.3 (HDF5, read with h5py): dataset `cube` stored (31, W, H), because MATLAB's
    column-major H x W x C is reversed on disk.
  * `.mat` v5 (scipy.io.loadmat): variable `cube`, H x W x 31.
  * `.npy` / `.h5` (dataset `cube`): band axis first or last, spatial axes (H, W).
  A cube whose spatial axes come out transposed relative to its RGB image is fixed (the
  common H/W swap), anything else that does not match the RGB size is an error. Values are
  returned as float32 [H, W, 31], untouched, after `check_cube` (finite, and within
  `CubeLimits` when given).

Writing (`write_cube`, by suffix): `.mat` MATLAB v7.3 exactly like the ARAD-1K files
(`write_mat73`: `cube` stored (31, W, H) single, plus `bands` and `norm_factor`), `.h5`
(`cube` [H, W, 31] float32, attribute `wavelengths_nm`), `.npy` ([H, W, 31] float32).

The band grid and the file-error hint come from `cswin_jax.io`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import h5py
import numpy as np
from absl import logging

from cswin_jax import io as hsi_io

CUBE_KEY = "cube"
CUBE_FORMATS = ("mat", "h5", "npy")  # what `write_cube` writes
_MAT73_HEADER = (
    "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2026 "
    "HDF5 schema 1.00 ."
)


# ---------------------------------------------------------------------------------------------
# Reading and checks
# ---------------------------------------------------------------------------------------------


def _cube_layout(path, shape, fmt, num_bands):
    """Stored axes (h_axis, w_axis, band_axis) of a 3-D cube before the orientation fix."""
    if len(shape) != 3:
        raise ValueError(
            f"{path}: '{CUBE_KEY}' has shape {tuple(shape)}; expected a 3-D cube with "
            f"{num_bands} bands"
        )
    if fmt == "mat73":
        # HDF5 holds MATLAB arrays with the axis order reversed: H x W x C -> (C, W, H).
        if shape[0] == num_bands:
            return 2, 1, 0
        if shape[2] == num_bands:
            return 1, 0, 2
    else:
        if shape[2] == num_bands:
            return 0, 1, 2
        if shape[0] == num_bands:
            return 1, 2, 0
    raise ValueError(
        f"{path}: expected '{CUBE_KEY}' with {num_bands} bands on its first or last axis, "
        f"found shape {tuple(shape)}; the model reads {num_bands}-band cubes (400-700 nm, 10 nm)"
    )


class CubeReader:
    """An open cube file with random-access windows, for lazy reading.

    The orientation fix is resolved at opening: `shape` is (H, W, bands) as the RGB image sees
    it. v7.3 / .h5 files with an unchunked `cube` and .npy files are memory-mapped, chunked
    (compressed) HDF5 cubes keep an open h5py handle, v5 files (which scipy cannot read
    partially) are loaded whole.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        *,
        rgb_hw: tuple[int, int] | None = None,
        num_bands: int = hsi_io.NUM_BANDS,
    ):
        self.path = pathlib.Path(path)
        self._file = None
        self._array, fmt = self._open()
        h_axis, w_axis, self._band_axis = _cube_layout(self.path, self._array.shape, fmt, num_bands)
        stored = self._array.shape
        hw = (stored[h_axis], stored[w_axis])
        if rgb_hw is not None and hw != tuple(rgb_hw):
            if hw[::-1] == tuple(rgb_hw):
                logging.log_first_n(
                    logging.INFO,
                    "%s: cube stored with H and W swapped relative to its RGB; transposing",
                    5,
                    self.path,
                )
                h_axis, w_axis = w_axis, h_axis
                hw = hw[::-1]
            else:
                self.close()
                raise ValueError(
                    f"{self.path}: cube is {hw[0]}x{hw[1]} (HxW, also tried transposed) but its "
                    f"RGB image is {rgb_hw[0]}x{rgb_hw[1]}; the pair must show the same scene at "
                    f"the same size, or {hsi_io.EXCLUDE_HINT}"
                )
        self._h_axis, self._w_axis = h_axis, w_axis
        self.shape = (hw[0], hw[1], stored[self._band_axis])

    def _open(self):
        suffix = self.path.suffix.lower()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: cube file is missing; {hsi_io.EXCLUDE_HINT}")
        if suffix == ".npy":
            try:
                return np.load(self.path, mmap_mode="r", allow_pickle=False), "npy"
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"{self.path}: unreadable .npy cube ({err}); re-create it or "
                    f"{hsi_io.EXCLUDE_HINT}"
                ) from err
        if suffix == ".mat" and not h5py.is_hdf5(self.path):
            return self._load_mat_v5(), "matv5"
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise ValueError(
                f"{self.path}: cannot open as HDF5 / MATLAB v7.3 ({err}); the file is truncated "
                f"or corrupt: re-download it or {hsi_io.EXCLUDE_HINT}"
            ) from err
        if CUBE_KEY not in self._file or not isinstance(self._file[CUBE_KEY], h5py.Dataset):
            keys = sorted(self._file.keys())
            self.close()
            raise ValueError(
                f"{self.path}: expected key '{CUBE_KEY}' with {hsi_io.NUM_BANDS} bands, found "
                f"keys {keys}; save the cube under '{CUBE_KEY}'"
            )
        dataset = self._file[CUBE_KEY]
        fmt = "mat73" if suffix == ".mat" else "h5"
        offset = dataset.id.get_offset()
        if dataset.chunks is None and offset is not None and dataset.dtype.kind == "f":
            # An unchunked, uncompressed dataset is one plain array in the file: memory-map it
            # so windows are numpy slices (a patch read through HDF5's hyperslab machinery
            # costs milliseconds).
            array = np.memmap(self.path, dtype=dataset.dtype, mode="r", offset=offset,
                              shape=dataset.shape)  # fmt: skip
            self.close()
            return array, fmt
        return dataset, fmt

    def _load_mat_v5(self) -> np.ndarray:
        import scipy.io  # noqa: PLC0415  (only v5 files need scipy)

        try:
            contents = scipy.io.loadmat(self.path)
        except Exception as err:  # scipy raises ValueError, TypeError, OSError on bad files
            raise ValueError(
                f"{self.path}: cannot read as MATLAB v5 or v7.3 ({err}); the file is truncated "
                f"or corrupt: re-download it or {hsi_io.EXCLUDE_HINT}"
            ) from err
        if CUBE_KEY not in contents:
            keys = sorted(k for k in contents if not k.startswith("__"))
            raise ValueError(
                f"{self.path}: expected key '{CUBE_KEY}' with {hsi_io.NUM_BANDS} bands, found "
                f"keys {keys}; save the cube under '{CUBE_KEY}'"
            )
        return np.asarray(contents[CUBE_KEY])

    def read_window(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Returns [height, width, bands] float32 from pixel (row, col) of the oriented cube."""
        index = [slice(None)] * 3
        index[self._h_axis] = slice(row, row + height)
        index[self._w_axis] = slice(col, col + width)
        try:
            window = self._array[tuple(index)]
        except OSError as err:  # h5py: a chunk could not be read (truncated file)
            raise ValueError(
                f"{self.path}: read failed ({err}); re-download it or {hsi_io.EXCLUDE_HINT}"
            ) from err
        window = np.transpose(window, (self._h_axis, self._w_axis, self._band_axis))
        return np.asarray(window, dtype=np.float32)

    def read(self, limits: CubeLimits | None = None) -> np.ndarray:
        """The whole oriented cube, [H, W, bands] float32, checked finite (and against
        `limits` when given)."""
        cube = np.ascontiguousarray(self.read_window(0, 0, self.shape[0], self.shape[1]))
        check_cube(cube, self.path, limits)
        return cube

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


@dataclasses.dataclass(frozen=True)
class CubeLimits:
    """What a cube may hold (`data.negative_tolerance`, `data.max_value`): finite values in
    [-negative_tolerance, max_value], and not all zero. A sign error or a missing scaling on
    export shows up here, at load, instead of as a model that trains on garbage."""

    negative_tolerance: float = 0.01
    max_value: float = 10.0

    @classmethod
    def from_config(cls, config) -> CubeLimits:
        """The run's `data.*` limits; a config saved before these keys existed gets the
        defaults."""
        data = config.get("data") or {}
        return cls(
            float(data.get("negative_tolerance", cls.negative_tolerance)),
            float(data.get("max_value", cls.max_value)),
        )


def check_finite(cube: np.ndarray, path) -> None:
    """Raises if `cube` holds NaN or Inf, naming the file."""
    if not np.isfinite(cube).all():
        bad = int(cube.size - np.count_nonzero(np.isfinite(cube)))
        raise ValueError(
            f"{path}: cube holds {bad} NaN/Inf values; re-export the file without them or "
            f"{hsi_io.EXCLUDE_HINT}"
        )


def check_cube(
    cube: np.ndarray, path, limits: CubeLimits | None = None, *, whole: bool = True
) -> None:
    """Raises if `cube` breaks `limits` (NaN/Inf, values below -negative_tolerance or above
    max_value, or, for a `whole` cube rather than a window of one, all zero), naming the file
    and the count of offending values."""
    check_finite(cube, path)
    if limits is None:
        return
    if whole and not np.any(cube):
        raise ValueError(f"{path}: cube is all zero; re-export it or {hsi_io.EXCLUDE_HINT}")
    negative = int(np.count_nonzero(cube < -limits.negative_tolerance))
    if negative:
        raise ValueError(
            f"{path}: {negative} of {cube.size} values are below "
            f"-{limits.negative_tolerance:g} (min {float(cube.min()):.4g}); check the sign of the "
            f"export, raise data.negative_tolerance if they are noise, or {hsi_io.EXCLUDE_HINT}"
        )
    high = int(np.count_nonzero(cube > limits.max_value))
    if high:
        raise ValueError(
            f"{path}: {high} of {cube.size} values are above data.max_value="
            f"{limits.max_value:g} (max {float(cube.max()):.4g}); scale the cube to reflectance "
            f"(about 0..1), raise data.max_value, or {hsi_io.EXCLUDE_HINT}"
        )


def read_cube(
    path: str | pathlib.Path,
    *,
    rgb_hw: tuple[int, int] | None = None,
    num_bands: int = hsi_io.NUM_BANDS,
    limits: CubeLimits | None = None,
) -> np.ndarray:
    """Reads a cube file. Returns [H, W, bands] float32, values untouched.

    rgb_hw: (H, W) of the scene's RGB image; when given, a cube with H and W swapped is
    transposed to match, and any other size mismatch raises. limits: the values allowed (see
    `CubeLimits`); None checks only that they are finite.
    """
    reader = CubeReader(path, rgb_hw=rgb_hw, num_bands=num_bands)
    try:
        return reader.read(limits)
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_mat73(path: str | pathlib.Path, cube: np.ndarray, norm_factor: float = 1.0) -> None:
    """Writes an H x W x C cube as a MATLAB v7.3 file (HDF5 with the MATLAB userblock).

    cube: [H, W, C] float32. On disk `cube` is (C, W, H) single, as MATLAB writes it.
    """
    path = pathlib.Path(path)
    with h5py.File(path, "w", userblock_size=512) as f:
        stored = f.create_dataset("cube", data=np.ascontiguousarray(cube.T, dtype=np.float32))
        stored.attrs["MATLAB_class"] = np.bytes_("single")
        bands = f.create_dataset(
            "bands", data=hsi_io.WAVELENGTHS_NM[: cube.shape[-1]].astype(np.float64)[:, None]
        )
        bands.attrs["MATLAB_class"] = np.bytes_("double")
        factor = f.create_dataset("norm_factor", data=np.array([[norm_factor]], np.float64))
        factor.attrs["MATLAB_class"] = np.bytes_("double")
    header = _MAT73_HEADER.ljust(116).encode("ascii") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\x00"))


def write_cube(path: str | pathlib.Path, cube: np.ndarray) -> pathlib.Path:
    """Writes `cube` [H, W, 31] in the format given by the file suffix (.mat / .h5 / .npy)."""
    path = pathlib.Path(path)
    cube = np.ascontiguousarray(cube, dtype=np.float32)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "mat":
        write_mat73(path, cube)
    elif fmt == "h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("cube", data=cube, compression="gzip", compression_opts=4)
            f["cube"].attrs["layout"] = "HWC"
            f["cube"].attrs["wavelengths_nm"] = hsi_io.WAVELENGTHS_NM[: cube.shape[-1]]
    elif fmt == "npy":
        np.save(path, cube)
    else:
        raise ValueError(f"{path}: unknown cube format {fmt!r}; use one of {CUBE_FORMATS}")
    return path
