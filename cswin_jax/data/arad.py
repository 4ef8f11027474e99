"""ARAD-1K / MST++ layout reader: split files, RGB images and 31-band cubes.

Layout (MST++ convention; validation scenes also live in `Train_*`):

    <root>/Train_RGB/<stem>.jpg        8-bit RGB (also .jpeg / .png)
    <root>/Train_Spec/<stem>.mat       31-band cube (also .npy / .h5)
    <root>/split_txt/train_list.txt    one stem per line
    <root>/split_txt/valid_list.txt
    <root>/Valid_RGB, Valid_Spec       optional; searched first for the valid split
    <root>/Test_RGB (+ Test_Spec)      optional; the `test` split (RGB only when no cubes)

Cube files:
  * `.mat` v7.3 (HDF5, read with h5py): dataset `cube` stored (31, W, H), because MATLAB's
    column-major H x W x C is reversed on disk.
  * `.mat` v5 (scipy.io.loadmat): variable `cube`, H x W x 31.
  * `.npy` / `.h5` (dataset `cube`): band axis first or last, spatial axes (H, W).
  A cube whose spatial axes come out transposed relative to the RGB image is fixed (the common
  H/W swap), anything else that does not match the RGB size is an error.

Values: HSI returned as float32 [H, W, 31], untouched (ARAD stores reflectance-like values in
[0, 1]). RGB: per-image min-max over all pixels and all three channels jointly, to float32
[0, 1] (the MST++ convention; a constant image gives zeros).

Every missing or unreadable file raises at construction with the file named and the fix.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import h5py
import numpy as np
from absl import logging
from PIL import Image

NUM_BANDS = 31
RGB_SUFFIXES = (".jpg", ".jpeg", ".png")
CUBE_SUFFIXES = (".mat", ".npy", ".h5")
CUBE_KEY = "cube"
SPLIT_FILES = {"train": "train_list.txt", "valid": "valid_list.txt", "test": "test_list.txt"}
# Folders searched for each split, in order (MST++ keeps validation scenes in Train_*).
SPLIT_FOLDERS = {
    "train": (("Train_RGB", "Train_Spec"),),
    "valid": (("Valid_RGB", "Valid_Spec"), ("Train_RGB", "Train_Spec")),
    "test": (("Test_RGB", "Test_Spec"),),
}
REQUIRED_FOLDERS = ("Train_RGB", "Train_Spec", "split_txt")
_EXCLUDE_HINT = "add its stem to data.excluded_scenes to skip it"


@dataclasses.dataclass(frozen=True)
class SceneFiles:
    """Paths of one scene; `cube_path` is None for RGB-only (test) scenes."""

    stem: str
    rgb_path: pathlib.Path
    cube_path: pathlib.Path | None


# ---------------------------------------------------------------------------------------------
# Layout and split files
# ---------------------------------------------------------------------------------------------


def check_layout(root: str | pathlib.Path) -> pathlib.Path:
    """Returns `root` as a Path after checking the MST++ folders exist."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist: set data.data_dir (or HSI_DATA_DIR) to an "
            "ARAD-1K copy in the MST++ layout (Train_RGB/, Train_Spec/, split_txt/), or use "
            "data.source='synthetic'"
        )
    for folder in REQUIRED_FOLDERS:
        if not (root / folder).is_dir():
            raise FileNotFoundError(
                f"{root / folder} is missing: the MST++ layout needs {root}/Train_RGB/<stem>.jpg, "
                f"{root}/Train_Spec/<stem>.mat and {root}/split_txt/{{train,valid}}_list.txt"
            )
    return root


def _strip_suffix(entry: str) -> str:
    for suffix in RGB_SUFFIXES + CUBE_SUFFIXES:
        if entry.lower().endswith(suffix):
            return entry[: -len(suffix)]
    return entry


def read_split_file(path: str | pathlib.Path) -> list[str]:
    """Stems listed in a split file, sorted as MST++ does.

    Tolerates CRLF line ends, a UTF-8 byte-order mark, blank lines, surrounding spaces, a
    missing final newline, `#` comments, folder prefixes and stems given with a file extension
    (`ARAD_1K_0001.mat`). Duplicates are dropped with a warning.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} is missing: write one scene stem per line (e.g. ARAD_1K_0001)"
        )
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    stems = []
    for line in text.splitlines():  # splitlines handles \n, \r\n and \r
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        entry = entry.replace("\\", "/").rsplit("/", 1)[-1]
        stems.append(_strip_suffix(entry))
    unique = sorted(set(stems))
    if len(unique) != len(stems):
        logging.warning("%s: %d duplicate entries ignored", path, len(stems) - len(unique))
    return unique


def _find_with_suffix(folder: pathlib.Path, stem: str, suffixes: Sequence[str]):
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def list_scenes(
    root: str | pathlib.Path,
    split: str,
    *,
    excluded_scenes: Sequence[str] = (),
    require_cubes: bool = True,
) -> list[SceneFiles]:
    """Files of every scene in `split` ('train' | 'valid' | 'test'), minus `excluded_scenes`.

    Raises when a listed stem has no RGB image, or (with `require_cubes`) no cube.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLIT_FILES)}")
    root = check_layout(root)
    split_path = root / "split_txt" / SPLIT_FILES[split]
    if split == "test" and not split_path.is_file():
        # RGB-only test images usually come without a list: take every image in Test_RGB.
        test_dir = root / "Test_RGB"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"{test_dir} is missing: the test split reads Test_RGB/")
        stems = sorted({p.stem for p in test_dir.iterdir() if p.suffix.lower() in RGB_SUFFIXES})
    else:
        stems = read_split_file(split_path)
    excluded = set(excluded_scenes)
    dropped = [s for s in stems if s in excluded]
    if dropped:
        logging.info("%s split: excluding %s (data.excluded_scenes)", split, dropped)
    stems = [s for s in stems if s not in excluded]
    if not stems:
        raise ValueError(
            f"{split_path}: the {split} split is empty after removing data.excluded_scenes "
            f"{sorted(excluded)}; list one scene stem per line"
        )
    folders = [(root / r, root / c) for r, c in SPLIT_FOLDERS[split] if (root / r).is_dir()]
    scenes = []
    for stem in stems:
        rgb_path = cube_path = None
        for rgb_dir, cube_dir in folders:
            rgb_path = _find_with_suffix(rgb_dir, stem, RGB_SUFFIXES)
            if rgb_path is not None:
                cube_path = _find_with_suffix(cube_dir, stem, CUBE_SUFFIXES)
                break
        searched = ", ".join(str(r) for r, _ in folders)
        if rgb_path is None:
            raise FileNotFoundError(
                f"{split_path}: scene {stem!r} has no RGB image ({'/'.join(RGB_SUFFIXES)}) in "
                f"{searched}; add the file, remove the line, or {_EXCLUDE_HINT}"
            )
        if cube_path is None and require_cubes:
            raise FileNotFoundError(
                f"{split_path}: scene {stem!r} has no cube ({'/'.join(CUBE_SUFFIXES)}) in "
                f"{rgb_path.parent.parent / SPLIT_FOLDERS[split][0][1]} or the matching *_Spec "
                f"folder; add the file, remove the line, or {_EXCLUDE_HINT}"
            )
        scenes.append(SceneFiles(stem, rgb_path, cube_path))
    return scenes


# ---------------------------------------------------------------------------------------------
# RGB
# ---------------------------------------------------------------------------------------------


def read_rgb_uint8(path: str | pathlib.Path) -> np.ndarray:
    """Decodes an 8-bit image. Returns [H, W, 3] uint8."""
    path = pathlib.Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        raise ValueError(
            f"{path}: unreadable image ({err}); re-export or re-download it, or {_EXCLUDE_HINT}"
        ) from err


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


def read_rgb(path: str | pathlib.Path) -> np.ndarray:
    """Reads and normalises an RGB image. Returns [H, W, 3] float32 in [0, 1]."""
    return normalize_rgb(read_rgb_uint8(path))


def rgb_size(path: str | pathlib.Path) -> tuple[int, int]:
    """(H, W) of an image after checking that it decodes."""
    return read_rgb_uint8(path).shape[:2]


# ---------------------------------------------------------------------------------------------
# Cubes
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
        num_bands: int = NUM_BANDS,
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
                    f"the same size, or {_EXCLUDE_HINT}"
                )
        self._h_axis, self._w_axis = h_axis, w_axis
        self.shape = (hw[0], hw[1], stored[self._band_axis])

    def _open(self):
        suffix = self.path.suffix.lower()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: cube file is missing; {_EXCLUDE_HINT}")
        if suffix == ".npy":
            try:
                return np.load(self.path, mmap_mode="r", allow_pickle=False), "npy"
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"{self.path}: unreadable .npy cube ({err}); re-create it or {_EXCLUDE_HINT}"
                ) from err
        if suffix == ".mat" and not h5py.is_hdf5(self.path):
            return self._load_mat_v5(), "matv5"
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise ValueError(
                f"{self.path}: cannot open as HDF5 / MATLAB v7.3 ({err}); the file is truncated "
                f"or corrupt: re-download it or {_EXCLUDE_HINT}"
            ) from err
        if CUBE_KEY not in self._file or not isinstance(self._file[CUBE_KEY], h5py.Dataset):
            keys = sorted(self._file.keys())
            self.close()
            raise ValueError(
                f"{self.path}: expected key '{CUBE_KEY}' with {NUM_BANDS} bands, found keys "
                f"{keys}; save the cube under '{CUBE_KEY}'"
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
                f"or corrupt: re-download it or {_EXCLUDE_HINT}"
            ) from err
        if CUBE_KEY not in contents:
            keys = sorted(k for k in contents if not k.startswith("__"))
            raise ValueError(
                f"{self.path}: expected key '{CUBE_KEY}' with {NUM_BANDS} bands, found keys "
                f"{keys}; save the cube under '{CUBE_KEY}'"
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
                f"{self.path}: read failed ({err}); re-download it or {_EXCLUDE_HINT}"
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
            f"{_EXCLUDE_HINT}"
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
        raise ValueError(f"{path}: cube is all zero; re-export it or {_EXCLUDE_HINT}")
    negative = int(np.count_nonzero(cube < -limits.negative_tolerance))
    if negative:
        raise ValueError(
            f"{path}: {negative} of {cube.size} values are below "
            f"-{limits.negative_tolerance:g} (min {float(cube.min()):.4g}); check the sign of the "
            f"export, raise data.negative_tolerance if they are noise, or {_EXCLUDE_HINT}"
        )
    high = int(np.count_nonzero(cube > limits.max_value))
    if high:
        raise ValueError(
            f"{path}: {high} of {cube.size} values are above data.max_value="
            f"{limits.max_value:g} (max {float(cube.max()):.4g}); scale the cube to reflectance "
            f"(about 0..1), raise data.max_value, or {_EXCLUDE_HINT}"
        )


def read_cube(
    path: str | pathlib.Path,
    *,
    rgb_hw: tuple[int, int] | None = None,
    num_bands: int = NUM_BANDS,
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
# Scene sources (shared by the ARAD layout and the synthetic set)
# ---------------------------------------------------------------------------------------------


class FileScenes:
    """Random-access scenes of one split of a layout on disk.

    Construction checks every file: each RGB image is decoded and each cube file opened, its
    key, band count and size checked against the RGB (`load` additionally checks the values of
    whole cubes against `limits`, so eager memory modes check every value before training
    starts).
    Picklable: holds only paths and sizes.

    Attributes: stems, sizes ((H, W) per scene), has_cubes.
    """

    def __init__(
        self,
        scenes: Sequence[SceneFiles],
        *,
        num_bands: int = NUM_BANDS,
        limits: CubeLimits | None = None,
    ):
        self.scenes = list(scenes)
        self.limits = limits
        self.stems = [s.stem for s in self.scenes]
        self.num_bands = num_bands
        self.has_cubes = all(s.cube_path is not None for s in self.scenes)
        self.sizes = []
        for scene in self.scenes:
            hw = rgb_size(scene.rgb_path)
            if scene.cube_path is not None:
                CubeReader(scene.cube_path, rgb_hw=hw, num_bands=num_bands).close()
            self.sizes.append(hw)

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb [H, W, 3] float32 in [0, 1], hsi [H, W, bands] float32 or None)."""
        scene = self.scenes[index]
        rgb = read_rgb(scene.rgb_path)
        if scene.cube_path is None:
            return rgb, None
        cube = read_cube(
            scene.cube_path, rgb_hw=rgb.shape[:2], num_bands=self.num_bands, limits=self.limits
        )
        return rgb, cube

    def open(self, index: int) -> OpenScene:
        """Decoded RGB plus an open cube for windowed reads (lazy mode)."""
        scene = self.scenes[index]
        rgb = read_rgb(scene.rgb_path)
        reader = CubeReader(scene.cube_path, rgb_hw=rgb.shape[:2], num_bands=self.num_bands)
        return OpenScene(rgb=rgb, read_hsi_window=reader.read_window, close=reader.close)


@dataclasses.dataclass
class OpenScene:
    """A scene held by the lazy cache: the RGB resident, the cube read by window.

    rgb: [H, W, 3] float32. read_hsi_window(row, col, height, width) -> [h, w, bands] float32.
    """

    rgb: np.ndarray
    read_hsi_window: object
    close: object = None
