"""The grain input pipeline: training patches, validation frames, data-root resolution.

Training (`create_train_iterator`), a grain `MapDataset` chain:

    range(num_patches)                     patch index over (scene, position)
    .shuffle(seed)                         uniform, a new permutation every epoch
    .random_map(draw augmentation)         rot90 k, vflip, hflip from an RNG keyed on
                                           (seed, element index): deterministic
    [process_index : even_len : process_count]
                                           disjoint, equal-length host shards
    .repeat(None).batch(b, drop_remainder)
    .map(gather patches)                   one vectorised copy per patch into the batch
    .to_iter_dataset(threads) [.mp_prefetch(workers)]

so batch k is a pure function of (seed, k, process_index, process_count): the iterator state
(`get_state` / `set_state`, or `grain.checkpoint.CheckpointSave/Restore` in an Orbax
checkpoint) is just the next batch number, and a resumed run sees exactly the batches an
uninterrupted run would, whatever `data.num_workers` is.

Each host gets b = config.batch_size // process_count patches per batch; the trainer stacks
`gradient_accumulation_steps` of them per optimizer step.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from typing import NamedTuple

import grain
import jax
import numpy as np
from absl import logging

from cswin_jax import config_checks, cubes, sharding
from cswin_jax.data import arad, patches, synthetic

SYNTHETIC_FOLDER = "synthetic_data"
_DATA_BARRIERS = itertools.count()


class Scene(NamedTuple):
    """A full validation / test frame: rgb [H, W, 3] float32 in [0, 1], hsi [H, W, 31] or None."""

    stem: str
    rgb: np.ndarray
    hsi: np.ndarray | None


def _source(config) -> str:
    """`config.data.source`, the whole `config.data` checked first (`config_checks.check_data`:
    every entry point of the pipeline passes here or through `train_dataset`)."""
    config_checks.check_data(config.data)
    return config_checks.choice(config.data.source)


def resolve_data_root(config, workdir: str | pathlib.Path) -> pathlib.Path:
    """Where the data of `config.data.source` lives, preparing it when needed.

    synthetic: `<workdir>/synthetic_data`, generated once (data.synthetic.*) when absent.
    arad:      `data.data_dir`, checked for the MST++ layout.
    tfds:      the prepared `arad1k` TFDS folder (`data.tfds_data_dir`, default
               `<data.data_dir>/tfds`), prepared from `data.data_dir` when absent.
    """
    source = _source(config)
    return sharding.process_zero_first(
        f"cswin_jax_data_root_{next(_DATA_BARRIERS)}",
        lambda: _prepare_data_root(config, workdir, source),
    )


def _prepare_data_root(config, workdir, source: str) -> pathlib.Path:
    if source == "synthetic":
        root = pathlib.Path(workdir) / SYNTHETIC_FOLDER
        settings = dict(
            num_train=config.data.synthetic.num_train,
            num_valid=config.data.synthetic.num_valid,
            height=config.data.synthetic.height,
            width=config.data.synthetic.width,
            seed=config.data.synthetic.seed,
        )
        if not synthetic.is_complete(root, **settings):
            logging.info(
                "data.source='synthetic': generating %d train + %d valid scenes of %dx%d into "
                "%s (once; later runs reuse them)",
                settings["num_train"],
                settings["num_valid"],
                settings["height"],
                settings["width"],
                root,
            )
            synthetic.write_dataset(root, **settings)
        return root
    if source == "tfds":
        from cswin_jax.data import tfds_arad1k  # noqa: PLC0415  (tensorflow_datasets import)

        return tfds_arad1k.prepare(
            config.data.data_dir,
            config.data.tfds_data_dir or None,
            excluded_scenes=config.data.excluded_scenes,
        )
    return arad.check_layout(config.data.data_dir)


def open_scenes(config, data_root, split: str, *, require_cubes: bool = True):
    """Random-access scenes of `split` for `config.data.source` (files or TFDS records)."""
    source = _source(config)
    num_bands = config.model.out_channels
    limits = cubes.CubeLimits.from_config(config)
    if source == "tfds":
        from cswin_jax.data import tfds_arad1k  # noqa: PLC0415

        return tfds_arad1k.TfdsScenes(
            data_root,
            split,
            excluded_scenes=config.data.excluded_scenes,
            num_bands=num_bands,
            limits=limits,
        )
    files = arad.list_scenes(
        data_root,
        split,
        excluded_scenes=config.data.excluded_scenes,
        require_cubes=require_cubes,
    )
    return arad.FileScenes(files, num_bands=num_bands, limits=limits)


def load_split(config, data_root, split: str = "valid") -> list[Scene]:
    """Full frames of `split` (MST++ validation: whole 482x512 images, no augmentation).

    Honours `data.max_valid_scenes` (0 = all). hsi is None for scenes without ground truth.
    """
    scenes = open_scenes(config, data_root, split, require_cubes=split != "test")
    count = len(scenes)
    if split == "valid" and config.data.max_valid_scenes > 0:
        count = min(count, config.data.max_valid_scenes)
    loaded = []
    for i in range(count):
        rgb, hsi = scenes.load(i)
        loaded.append(Scene(scenes.stems[i], rgb, hsi))
    return loaded


class DrawAugmentation(grain.transforms.RandomMap):
    """patch index -> int64 [4] (patch index, rot90 k in 0..3, vflip, hflip)."""

    def random_map(self, element, rng: np.random.Generator):
        flags = rng.integers(0, (4, 2, 2))
        return np.array([element, flags[0], flags[1], flags[2]], dtype=np.int64)


class GatherPatches(grain.transforms.Map):
    """[b, 4] draws -> {'rgb': [b, P, P, 3] float32, 'hsi': [b, P, P, C] float32}."""

    def __init__(self, store, grid: patches.PatchGrid, num_bands: int):
        self.store, self.grid, self.num_bands = store, grid, num_bands
        self.buffers = patches.BatchBuffers()

    def map(self, element):
        return patches.gather_patches(
            self.store, self.grid, element, self.num_bands, buffers=self.buffers
        )


def per_host_batch_size(config, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {process_count} processes; "
            "set batch_size to a multiple of jax.process_count()"
        )
    return config.batch_size // process_count


def augmentation_draws(
    num_patches: int, seed: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """One epoch of this host's draws: int64 [4] (patch index, rot_k, vflip, hflip).

    Indices past the end continue into later epochs (a fresh permutation and fresh draws
    each), which is what `.repeat(None)` reads.
    """
    even = num_patches - num_patches % process_count
    dataset = grain.MapDataset.range(num_patches).shuffle(seed=seed)
    # Augmentation draws are keyed on the global (pre-shard) index: the same patch of the same
    # epoch gets the same augmentation whatever the number of hosts.
    dataset = dataset.random_map(DrawAugmentation(), seed=seed + 1)
    # Equal-length strided shards, so every host's epoch boundary falls at the same batch.
    return dataset[process_index:even:process_count]


def train_dataset(
    config,
    data_root,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    scenes=None,
) -> grain.MapDataset:
    """The random-access dataset of per-host training batches (see module docstring).

    `scenes` (optional) reuses an already opened scene source.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    batch = per_host_batch_size(config, process_count)
    config_checks.check_data(config.data)
    memory_mode = config_checks.choice(config.data.memory_mode)
    if scenes is None:
        scenes = open_scenes(config, data_root, "train")
    grid = patches.PatchGrid(
        scenes.sizes, config.data.patch_size, config.data.stride, stems=scenes.stems
    )
    store = patches.make_store(scenes, memory_mode, config.data.lazy_cache_size)
    num_patches = len(grid)
    even = num_patches - num_patches % process_count
    if even // process_count < batch:
        raise ValueError(
            f"{len(scenes)} training scenes give {num_patches} patches, fewer than one batch of "
            f"{batch} per process; add scenes or lower batch_size / data.patch_size"
        )
    logging.info(
        "data: %d train scenes, %d patches (%s mode), host %d/%d takes %d per batch",
        len(scenes),
        num_patches,
        memory_mode,
        process_index,
        process_count,
        batch,
    )
    dataset = augmentation_draws(num_patches, config.seed, process_index, process_count)
    dataset = dataset.repeat(None).batch(batch, drop_remainder=True)
    return dataset.map(GatherPatches(store, grid, config.model.out_channels))


def create_train_iterator(
    config,
    data_root,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    scenes=None,
):
    """Endless iterator of per-host training batches.

    Yields {'rgb': [b, P, P, 3] float32, 'hsi': [b, P, P, 31] float32}, b = batch_size //
    process_count. Supports `get_state()` / `set_state()` and grain.checkpoint.CheckpointSave.
    With data.num_workers > 0, batches are made in worker processes (call `close()` when
    done); the batch sequence does not depend on the worker count. `scenes` (optional)
    reuses an already opened training split.
    """
    dataset = train_dataset(
        config,
        data_root,
        process_index=process_index,
        process_count=process_count,
        scenes=scenes,
    )
    buffer = max(1, config.data.prefetch_buffer_size)
    threads = max(1, min(os.cpu_count() or 1, buffer))
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    )
    if config.data.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.data.num_workers, per_worker_buffer_size=buffer
            )
        )
    return iter(iter_dataset)
