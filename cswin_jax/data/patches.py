"""Training patches: the stride grid, augmentation, and the three memory modes.

Geometry follows MST++ but is computed from each image's own size: a scene of H x W gives
((H - P) // S + 1) x ((W - P) // S + 1) patch positions (482 x 512, P 128, S 8 -> 45 x 49 =
2,205). Patch index i runs over (scene, position) in scene order, positions row-major.

Augmentation (MST++ `arg=True`), identical for RGB and HSI: rot90 by k in {0..3} over (H, W),
then flip H if vflip, then flip W if hflip.

Memory modes (`data.memory_mode`):
  standard  every scene resident as float32.
  float16   every scene resident as float16, each patch cast back to float32 (HSI rounding
            up to ~5e-4 relative).
  lazy      nothing resident: an LRU of `data.lazy_cache_size` open scenes per process; HSI
            patches read from disk by window.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence

import numpy as np
from absl import logging

from cswin_jax import cubes
from cswin_jax.config_checks import MEMORY_MODES


class PatchGrid:
    """Stride grid over scenes of different sizes.

    sizes: (H, W) per scene. Index i -> (scene, top, left) pixel offsets of the patch.
    patch_size and stride are positive (`config_checks.check_data`).
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        patch_size: int,
        stride: int,
        stems: Sequence[str] | None = None,
    ):
        self.patch_size, self.stride = patch_size, stride
        rows, cols = [], []
        for i, (height, width) in enumerate(sizes):
            if height < patch_size or width < patch_size:
                name = stems[i] if stems is not None else f"scene {i}"
                raise ValueError(
                    f"{name}: image is {height}x{width} but data.patch_size is {patch_size}; "
                    "lower data.patch_size or drop the scene"
                )
            rows.append((height - patch_size) // stride + 1)
            cols.append((width - patch_size) // stride + 1)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        counts = self.rows * self.cols
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised index -> (scene, top, left), each int64 with the shape of `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"patch index out of range [0, {len(self)})")
        scene = np.searchsorted(self.offsets, indices, side="right") - 1
        position = indices - self.offsets[scene]
        row, col = np.divmod(position, self.cols[scene])
        return scene, row * self.stride, col * self.stride


def augment(patch: np.ndarray, rot_k: int, vflip: bool, hflip: bool) -> np.ndarray:
    """MST++ augmentation of one [P, P, C] patch; returns a view (no copy)."""
    patch = np.rot90(patch, int(rot_k), axes=(0, 1))
    if vflip:
        patch = patch[::-1]
    if hflip:
        patch = patch[:, ::-1]
    return patch


def copy_augmented(out: np.ndarray, patch: np.ndarray, rot_k, vflip, hflip) -> None:
    """out[...] = augment(patch, ...) for [P, P, C] arrays of one dtype, in one copy.

    Each pixel's C values are contiguous in both arrays, so they are viewed as one opaque
    C * itemsize-byte item: numpy then moves whole spectra per step instead of running its
    inner loop over 31 (or 3) numbers, which halves the cost of the transposing copies of
    rot90 k = 1, 3 and of flips.
    """
    pixel = np.dtype((np.void, patch.dtype.itemsize * patch.shape[-1]))
    if patch.strides[-1] != patch.dtype.itemsize or out.dtype != patch.dtype:
        out[...] = augment(patch, rot_k, vflip, hflip)
        return
    out.view(pixel)[..., 0] = augment(patch.view(pixel)[..., 0], rot_k, vflip, hflip)


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ResidentStore:
    """Every scene in memory (`standard`: float32, `float16`: float16).

    Sharing with grain worker processes: the first time the store is pickled, its arrays move
    into one file on a RAM-backed tmpfs (/dev/shm; the temp dir when that is too small) and
    are memory-mapped from there, by this process and by every worker: the scenes are in RAM
    once, not once per worker. The file is removed when this store is garbage-collected or
    the process exits.
    """

    def __init__(self, scenes, dtype):
        self.dtype = np.dtype(dtype)
        self.rgb, self.hsi = [], []
        for i in range(len(scenes)):
            rgb, hsi = scenes.load(i)
            self.rgb.append(rgb.astype(self.dtype, copy=False))
            self.hsi.append(hsi.astype(self.dtype, copy=False))
        self.shared_path = None
        nbytes = sum(a.nbytes for a in self.rgb + self.hsi)
        logging.info(
            "data: %d scenes resident as %s (%.1f MB)", len(self.hsi), self.dtype, nbytes / 2**20
        )

    def scene_patches(self, scene: int, top: int, left: int, size: int):
        """Views (rgb [P, P, 3], hsi [P, P, C]) of one patch, in the resident dtype."""
        window = (slice(top, top + size), slice(left, left + size))
        return self.rgb[scene][window], self.hsi[scene][window]

    def __getstate__(self):
        if self.shared_path is None:
            self._move_to_shared_file()
        return {"dtype": self.dtype.str, "path": self.shared_path, "layout": self._layout}

    def __setstate__(self, state):
        self.dtype = np.dtype(state["dtype"])
        self.shared_path, self._layout = state["path"], state["layout"]
        self._map("r")

    def _map(self, mode: str) -> None:
        mapped = [
            np.memmap(self.shared_path, self.dtype, mode, offset=offset, shape=tuple(shape))
            for offset, shape in self._layout
        ]
        self.rgb, self.hsi = mapped[: len(mapped) // 2], mapped[len(mapped) // 2 :]

    def _move_to_shared_file(self) -> None:
        arrays = self.rgb + self.hsi
        layout, offset = [], 0
        for array in arrays:
            layout.append((offset, list(array.shape)))
            offset += -(-array.nbytes // 4096) * 4096  # page-aligned
        folders = [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
        for folder in folders:
            handle, path = tempfile.mkstemp(prefix="cswin_scenes_", suffix=".bin", dir=folder)
            try:
                with os.fdopen(handle, "wb") as f:
                    for (start, _), array in zip(layout, arrays, strict=True):
                        f.seek(start)
                        array.tofile(f)
                break
            except OSError as err:  # ENOSPC: a small /dev/shm (Docker's default is 64 MB)
                _remove_file(path)
                logging.warning("data: cannot share scenes through %s (%s)", folder, err)
        else:
            raise OSError(
                f"no room to share {offset / 2**30:.1f} GB of resident scenes with data workers "
                f"in {folders}; enlarge /dev/shm, set data.num_workers=0, or use "
                "data.memory_mode='lazy'"
            )
        weakref.finalize(self, _remove_file, path)  # also runs at interpreter exit
        self.shared_path, self._layout = path, layout
        self._map("r")
        logging.info("data: resident scenes shared with workers through %s", path)


class LazyStore:
    """Scenes opened on demand, an LRU of `cache_size` open scenes per process.

    The cache is dropped when pickled, so each grain worker keeps its own.
    """

    def __init__(self, scenes, cache_size: int):
        self.scenes, self.cache_size = scenes, cache_size
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"scenes": self.scenes, "cache_size": self.cache_size}

    def __setstate__(self, state):
        self.__init__(state["scenes"], state["cache_size"])

    def _open(self, scene: int):
        with self._lock:
            opened = self._cache.get(scene)
            if opened is not None:
                self._cache.move_to_end(scene)
                return opened
        opened = self.scenes.open(scene)
        with self._lock:
            self._cache[scene] = opened
            while len(self._cache) > self.cache_size:
                _, evicted = self._cache.popitem(last=False)
                if evicted.close is not None:
                    evicted.close()
        return opened

    def scene_patches(self, scene: int, top: int, left: int, size: int):
        """(rgb [P, P, 3] view, hsi [P, P, C] read from disk), float32."""
        opened = self._open(scene)
        hsi = opened.read_hsi_window(top, left, size, size)
        # Eager modes check whole cubes at load; here each window is checked as it is read.
        cubes.check_cube(
            hsi,
            f"{self.scenes.stems[scene]} (lazy window at {top},{left})",
            getattr(self.scenes, "limits", None),
            whole=False,
        )
        return opened.rgb[top : top + size, left : left + size], np.ascontiguousarray(hsi)


def make_store(scenes, memory_mode: str, lazy_cache_size: int | None = None):
    """The patch store for `memory_mode` ('standard' | 'float16' | 'lazy'); 'lazy' keeps
    `lazy_cache_size` scenes open (`data.lazy_cache_size`)."""
    if memory_mode == "standard":
        return ResidentStore(scenes, np.float32)
    if memory_mode == "float16":
        return ResidentStore(scenes, np.float16)
    if memory_mode == "lazy":
        return LazyStore(scenes, lazy_cache_size)
    raise ValueError(f"make_store: unknown memory_mode {memory_mode!r}; use one of {MEMORY_MODES}")


class BatchBuffers:
    """Output arrays for `gather_patches`, reused once nothing outside the pool holds them.

    A fresh batch array is new memory on every batch, and the first write to a new page costs
    far more than the copy itself: filling a fresh batch is several times slower than filling
    memory already touched, and slower still without transparent huge pages
    (bench/input_pipeline.py prints the CPU time per patch).

    A buffer is handed out again only when the pool holds the last reference to it
    (`sys.getrefcount`): while a consumer, a queue or any view (`batch[i]`, a zero-copy device
    array) still refers to it, it is left alone, so reuse can never overwrite a batch in use.
    When every pooled buffer of a shape is busy, a new one is made (pooled up to `capacity`
    per shape, then one-off). Thread-safe; a pickled copy (a grain worker) starts empty.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._pool: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of `shape`/`dtype` that nobody else references."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            buffers = self._pool.setdefault(key, [])
            for i in range(len(buffers)):
                # References: the pool's list slot and getrefcount's argument.
                if sys.getrefcount(buffers[i]) == 2:
                    return buffers[i]
            array = np.empty(shape, dtype)
            if len(buffers) < self.capacity:
                buffers.append(array)
            return array


def gather_patches(
    store, grid: PatchGrid, draws: np.ndarray, num_bands: int, buffers: BatchBuffers | None = None
):
    """Cuts, augments and stacks a batch of patches with one copy per patch.

    draws: [B, 4] int (patch index, rot_k, vflip, hflip). `buffers` (optional) supplies
    reusable output arrays (see `BatchBuffers`); without it they are allocated fresh.
    Returns {'rgb': [B, P, P, 3] float32, 'hsi': [B, P, P, num_bands] float32}.
    """
    draws = np.asarray(draws, dtype=np.int64).reshape(-1, 4)
    size = grid.patch_size
    scenes, tops, lefts = grid.locate(draws[:, 0])
    batch = len(draws)
    allocate = np.empty if buffers is None else buffers.get
    rgb_out = allocate((batch, size, size, 3), np.float32)
    hsi_out = allocate((batch, size, size, num_bands), np.float32)
    scratch = {}  # float16 mode: copy in the resident dtype, then cast contiguously
    for i in range(batch):
        rgb, hsi = store.scene_patches(int(scenes[i]), int(tops[i]), int(lefts[i]), size)
        rot_k, vflip, hflip = draws[i, 1], draws[i, 2], draws[i, 3]
        for out, patch in ((rgb_out[i], rgb), (hsi_out[i], hsi)):
            if patch.dtype == out.dtype:
                copy_augmented(out, patch, rot_k, vflip, hflip)
            else:
                staging = scratch.setdefault(patch.shape, np.empty(patch.shape, patch.dtype))
                copy_augmented(staging, patch, rot_k, vflip, hflip)
                out[...] = staging
    return {"rgb": rgb_out, "hsi": hsi_out}
