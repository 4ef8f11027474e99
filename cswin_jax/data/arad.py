"""ARAD-1K / MST++ layout reader: split files, RGB images and 31-band cubes.

Layout (MST++ convention; validation scenes also live in `Train_*`):

    <root>/Train_RGB/<stem>.jpg        8-bit RGB (also .jpeg / .png)
    <root>/Train_Spec/<stem>.mat       31-band cube (also .npy / .h5)
    <root>/split_txt/train_list.txt    one stem per line
    <root>/split_txt/valid_list.txt
    <root>/Valid_RGB, Valid_Spec       optional; searched first for the valid split
    <root>/Test_RGB (+ Test_Spec)      optional; the `test` split (RGB only when no cubes)

Files are read by `cswin_jax.io` and `cswin_jax.cubes` (whose docstring lists the cube formats
and the orientation fix): RGB with `eight_bit=True` (8-bit RGB as MST++'s cv2.imread gives
it), normalised by the MST++ per-image min-max; HSI as float32 [H, W, 31], untouched (ARAD
stores reflectance-like values in [0, 1]), checked against `cubes.CubeLimits`.

Every missing or unreadable file raises at construction with the file named and the fix.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from cswin_jax import cubes
from cswin_jax import io as hsi_io

RGB_SUFFIXES = (".jpg", ".jpeg", ".png")
CUBE_SUFFIXES = (".mat", ".npy", ".h5")
SPLIT_FILES = {"train": "train_list.txt", "valid": "valid_list.txt", "test": "test_list.txt"}
# Folders searched for each split, in order (MST++ keeps validation scenes in Train_*).
SPLIT_FOLDERS = {
    "train": (("Train_RGB", "Train_Spec"),),
    "valid": (("Valid_RGB", "Valid_Spec"), ("Train_RGB", "Train_Spec")),
    "test": (("Test_RGB", "Test_Spec"),),
}
REQUIRED_FOLDERS = ("Train_RGB", "Train_Spec", "split_txt")


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
                f"{searched}; add the file, remove the line, or {hsi_io.EXCLUDE_HINT}"
            )
        if cube_path is None and require_cubes:
            raise FileNotFoundError(
                f"{split_path}: scene {stem!r} has no cube ({'/'.join(CUBE_SUFFIXES)}) in "
                f"{rgb_path.parent.parent / SPLIT_FOLDERS[split][0][1]} or the matching *_Spec "
                f"folder; add the file, remove the line, or {hsi_io.EXCLUDE_HINT}"
            )
        scenes.append(SceneFiles(stem, rgb_path, cube_path))
    return scenes


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
        num_bands: int = hsi_io.NUM_BANDS,
        limits: cubes.CubeLimits | None = None,
    ):
        self.scenes = list(scenes)
        self.limits = limits
        self.stems = [s.stem for s in self.scenes]
        self.num_bands = num_bands
        self.has_cubes = all(s.cube_path is not None for s in self.scenes)
        self.sizes = []
        for scene in self.scenes:
            hw = hsi_io.read_image(scene.rgb_path, eight_bit=True).shape[:2]
            if scene.cube_path is not None:
                cubes.CubeReader(scene.cube_path, rgb_hw=hw, num_bands=num_bands).close()
            self.sizes.append(hw)

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb [H, W, 3] float32 in [0, 1], hsi [H, W, bands] float32 or None)."""
        scene = self.scenes[index]
        rgb = hsi_io.read_rgb(scene.rgb_path, eight_bit=True)
        if scene.cube_path is None:
            return rgb, None
        cube = cubes.read_cube(
            scene.cube_path, rgb_hw=rgb.shape[:2], num_bands=self.num_bands, limits=self.limits
        )
        return rgb, cube

    def open(self, index: int) -> OpenScene:
        """Decoded RGB plus an open cube for windowed reads (lazy mode)."""
        scene = self.scenes[index]
        rgb = hsi_io.read_rgb(scene.rgb_path, eight_bit=True)
        reader = cubes.CubeReader(scene.cube_path, rgb_hw=rgb.shape[:2], num_bands=self.num_bands)
        return OpenScene(rgb=rgb, read_hsi_window=reader.read_window, close=reader.close)


@dataclasses.dataclass
class OpenScene:
    """A scene held by the lazy cache: the RGB resident, the cube read by window.

    rgb: [H, W, 3] float32. read_hsi_window(row, col, height, width) -> [h, w, bands] float32.
    """

    rgb: np.ndarray
    read_hsi_window: object
    close: object = None
