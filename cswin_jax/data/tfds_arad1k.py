"""TFDS builder `arad1k`: the ARAD-1K / MST++ layout as array_record files, without TensorFlow.

Manual download: point `manual_dir` at a folder in the MST++ layout (ARAD-1K, or the
synthetic set). `prepare()` reads it with `cswin_jax.data.arad`, `cswin_jax.io` and
`cswin_jax.cubes` (same checks, same orientation fix) and writes `train` / `valid` splits of

    {'stem': str, 'rgb': [H, W, 3] uint8 (the JPEG as decoded), 'hsi': [H, W, 31] float32 (zlib)}

as array_record shards. Reading back (`TfdsScenes`) goes through
`tfds.builder_from_directory(...).as_data_source(split)`: random access, no TensorFlow, and
picklable into grain workers without this module's builder class. The MST++ RGB min-max
normalisation is applied at read time, exactly as for files.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cswin_jax import cubes
from cswin_jax import io as hsi_io
from cswin_jax.data import arad

NAME = "arad1k"
SPLITS = ("train", "valid")


class Arad1k(tfds.core.GeneratorBasedBuilder):
    """ARAD-1K in the MST++ layout (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and valid splits of the MST++ layout."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place ARAD-1K in the MST++ layout (Train_RGB/, Train_Spec/, split_txt/) in manual_dir; "
        "the data needs CodaLab registration (NTIRE 2022 spectral recovery)."
    )

    # TFDS looks for checksums / README files next to the builder's module through
    # `code_path`, which needs `importlib_resources` for modules inside a package; this builder
    # downloads nothing and describes itself in `_info`, so it has no code folder to search.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, excluded_scenes=("ARAD_1K_0314",), num_bands=hsi_io.NUM_BANDS, **kwargs):
        self._excluded_scenes = tuple(excluded_scenes)
        self._num_bands = num_bands
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # `dataset_info_from_configs` would look for README/TAGS files next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="ARAD-1K RGB / 31-band hyperspectral pairs (MST++ layout).",
            features=tfds.features.FeaturesDict(
                {
                    "stem": tfds.features.Text(),
                    "rgb": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "hsi": tfds.features.Tensor(
                        shape=(None, None, self._num_bands),
                        dtype=np.float32,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                }
            ),
            supervised_keys=("rgb", "hsi"),
        )

    def _split_generators(self, dl_manager):
        root = arad.check_layout(dl_manager.manual_dir)
        return {
            split: self._generate_examples(
                arad.list_scenes(root, split, excluded_scenes=self._excluded_scenes)
            )
            for split in SPLITS
        }

    def _generate_examples(self, scene_files):
        # Check every file (and its size against the RGB) before writing anything.
        arad.FileScenes(scene_files, num_bands=self._num_bands)
        for scene in scene_files:
            rgb = hsi_io.read_image(scene.rgb_path, eight_bit=True)
            hsi = cubes.read_cube(scene.cube_path, rgb_hw=rgb.shape[:2], num_bands=self._num_bands)
            yield scene.stem, {"stem": scene.stem, "rgb": rgb, "hsi": hsi}


def _version_dir(tfds_dir: pathlib.Path) -> pathlib.Path | None:
    """The newest prepared `arad1k/<version>` folder under `tfds_dir`, if any."""
    prepared = sorted(
        (p.parent for p in (tfds_dir / NAME).glob("*/dataset_info.json")),
        key=lambda p: tfds.core.Version(p.name),
    )
    return prepared[-1] if prepared else None


def prepare(
    data_dir: str | pathlib.Path,
    tfds_dir: str | pathlib.Path | None = None,
    *,
    excluded_scenes=("ARAD_1K_0314",),
    num_bands: int = hsi_io.NUM_BANDS,
) -> pathlib.Path:
    """Builds `arad1k` from the layout at `data_dir` into `tfds_dir` (default <data_dir>/tfds).

    Does nothing when it is already prepared. Returns `tfds_dir`.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    tfds_dir = pathlib.Path(tfds_dir).expanduser() if tfds_dir else data_dir / "tfds"
    if _version_dir(tfds_dir) is None:
        arad.check_layout(data_dir)
        logging.info("tfds: preparing %s from %s into %s", NAME, data_dir, tfds_dir)
        builder = Arad1k(
            data_dir=str(tfds_dir), excluded_scenes=excluded_scenes, num_bands=num_bands
        )
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(data_dir)),
        )
    return tfds_dir


class TfdsScenes:
    """Random-access scenes of one split of a prepared `arad1k` (same interface as
    `arad.FileScenes`: stems, sizes, load, open).

    Scenes are sorted by stem, like the split lists. Construction reads every record once to
    learn stems and sizes.
    """

    def __init__(
        self,
        tfds_dir: str | pathlib.Path,
        split: str,
        *,
        excluded_scenes=(),
        num_bands: int = hsi_io.NUM_BANDS,
        limits: cubes.CubeLimits | None = None,
    ):
        self.limits = limits
        tfds_dir = pathlib.Path(tfds_dir)
        version_dir = _version_dir(tfds_dir)
        if version_dir is None:
            raise FileNotFoundError(
                f"{tfds_dir}: no prepared '{NAME}' dataset; run "
                f"cswin_jax.data.tfds_arad1k.prepare(<MST++ layout dir>, '{tfds_dir}') or set "
                "data.source='arad'"
            )
        builder = tfds.builder_from_directory(str(version_dir))
        if split not in builder.info.splits:
            raise ValueError(
                f"{version_dir}: no split {split!r}; found {sorted(builder.info.splits)}"
            )
        self.source = builder.as_data_source(split=split)
        excluded = set(excluded_scenes)
        self.indices, self.stems, self.sizes = [], [], []
        for i in range(len(self.source)):
            record = self.source[i]
            stem = record["stem"]
            stem = stem.decode() if isinstance(stem, bytes) else str(stem)
            if stem in excluded:
                continue
            if record["hsi"].shape[-1] != num_bands:
                raise ValueError(
                    f"{version_dir}: scene {stem} has {record['hsi'].shape[-1]} bands, "
                    f"expected {num_bands}; re-prepare the dataset"
                )
            self.indices.append(i)
            self.stems.append(stem)
            self.sizes.append(tuple(record["rgb"].shape[:2]))
        # TFDS shuffles records on write; sort by stem so scene order (and hence patch indices)
        # matches the file reader's sorted split lists.
        order = sorted(range(len(self.stems)), key=self.stems.__getitem__)
        self.indices = [self.indices[i] for i in order]
        self.stems = [self.stems[i] for i in order]
        self.sizes = [self.sizes[i] for i in order]
        if not self.indices:
            raise ValueError(f"{version_dir}: split {split!r} is empty after data.excluded_scenes")
        self.has_cubes = True

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(rgb [H, W, 3] float32 in [0, 1], hsi [H, W, bands] float32)."""
        record = self.source[self.indices[index]]
        hsi = np.asarray(record["hsi"], dtype=np.float32)
        cubes.check_cube(hsi, f"{NAME}:{self.stems[index]}", self.limits)
        return hsi_io.normalize_rgb(record["rgb"]), hsi

    def open(self, index: int) -> arad.OpenScene:
        """A decoded record for the lazy cache (array_record reads whole records)."""
        rgb, hsi = self.load(index)

        def read_window(row, col, height, width):
            return hsi[row : row + height, col : col + width]

        return arad.OpenScene(rgb=rgb, read_hsi_window=read_window)
