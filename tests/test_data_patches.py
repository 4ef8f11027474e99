"""Patch grid, augmentation and memory modes (`cswin_jax/data/patches.py`).

Scenes are small synthetic 40x48 sets with patch 16, stride 8 (4 x 5 = 20 positions each).
"""

import gc
import pathlib
import pickle

import numpy as np
import pytest

from configs import base
from cswin_jax import config_checks, cubes
from cswin_jax.data import arad, patches, synthetic

P, S = 16, 8


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(root, num_train=3, num_valid=1, height=40, width=48, seed=3)
    return arad.FileScenes(arad.list_scenes(root, "train"))


def _data_config(**data):
    """configs/base.py's `config.data` with `data` set in it."""
    config = base.get_config().data
    config.update(data)
    return config


def _all_draws(grid):
    """Every patch index with each of the 16 augmentations."""
    index = np.arange(len(grid))
    flags = np.array([(k, v, h) for k in range(4) for v in range(2) for h in range(2)])
    return np.concatenate(
        [np.column_stack([index, np.broadcast_to(f, (len(index), 3))]) for f in flags]
    )


def test_mst_geometry_482x512_gives_2205_positions():
    grid = patches.PatchGrid([(482, 512)], patch_size=128, stride=8)
    assert (grid.rows[0], grid.cols[0], len(grid)) == (45, 49, 2205)
    scene, top, left = grid.locate([0, 48, 49, 2204])
    assert scene.tolist() == [0, 0, 0, 0]
    assert top.tolist() == [0, 0, 8, 352] and left.tolist() == [0, 384, 0, 384]


def test_grid_from_each_image_size():
    grid = patches.PatchGrid([(482, 512), (512, 482), (128, 128)], patch_size=128, stride=8)
    assert len(grid) == 2205 + 49 * 45 + 1
    scene, top, left = grid.locate([2204, 2205, 2205 + 45, len(grid) - 1])
    assert scene.tolist() == [0, 1, 1, 2]
    assert top.tolist() == [352, 0, 8, 0] and left.tolist() == [384, 0, 0, 0]
    with pytest.raises(IndexError):
        grid.locate([len(grid)])


def test_patch_larger_than_image():
    with pytest.raises(ValueError, match=r"SCENE_7: image is 100x200 but data.patch_size is 128"):
        patches.PatchGrid([(482, 512), (100, 200)], 128, 8, stems=["SCENE_1", "SCENE_7"])


def test_augment_matches_mst_definition():
    patch = np.arange(2 * 2 * 1).reshape(2, 2, 1)  # [[0, 1], [2, 3]]
    assert patches.augment(patch, 0, 0, 0)[..., 0].tolist() == [[0, 1], [2, 3]]
    assert patches.augment(patch, 1, 0, 0)[..., 0].tolist() == [[1, 3], [0, 2]]  # np.rot90
    assert patches.augment(patch, 0, 1, 0)[..., 0].tolist() == [[2, 3], [0, 1]]  # flip H
    assert patches.augment(patch, 0, 0, 1)[..., 0].tolist() == [[1, 0], [3, 2]]  # flip W
    # rot first, then vflip, then hflip.
    assert patches.augment(patch, 1, 1, 1)[..., 0].tolist() == [[2, 0], [3, 1]]


def test_rgb_and_hsi_get_identical_augmentation(scenes):
    grid = patches.PatchGrid(scenes.sizes, P, S)
    store = patches.make_store(scenes, "standard")
    draws = _all_draws(grid)
    batch = patches.gather_patches(store, grid, draws, 31)
    assert batch["rgb"].shape == (len(draws), P, P, 3) and batch["rgb"].dtype == np.float32
    assert batch["hsi"].shape == (len(draws), P, P, 31) and batch["hsi"].dtype == np.float32
    # Undo each augmentation: both must land on the same un-augmented crop of the same scene.
    for i in range(0, len(draws), 7):
        index, k, v, h = draws[i]
        scene, top, left = (int(a[0]) for a in grid.locate([index]))
        rgb_scene, hsi_scene = scenes.load(scene)
        for out, full in ((batch["rgb"][i], rgb_scene), (batch["hsi"][i], hsi_scene)):
            undone = out[:, ::-1] if h else out
            undone = undone[::-1] if v else undone
            undone = np.rot90(undone, -k, axes=(0, 1))
            np.testing.assert_array_equal(undone, full[top : top + P, left : left + P])


def test_same_samples_in_all_memory_modes(scenes):
    grid = patches.PatchGrid(scenes.sizes, P, S)
    draws = _all_draws(grid)[::5]
    out = {
        mode: patches.gather_patches(patches.make_store(scenes, mode, 2), grid, draws, 31)
        for mode in config_checks.MEMORY_MODES
    }
    for key in ("rgb", "hsi"):
        np.testing.assert_array_equal(out["lazy"][key], out["standard"][key])
        # float16 keeps 11 significant bits: relative rounding <= 2**-11 (4.9e-4).
        np.testing.assert_allclose(out["float16"][key], out["standard"][key], rtol=2**-11, atol=0)
        assert not np.array_equal(out["float16"]["hsi"], out["standard"]["hsi"])


def test_float16_mode_stores_half_precision(scenes):
    store = patches.make_store(scenes, "float16")
    assert all(a.dtype == np.float16 for a in store.hsi + store.rgb)


def test_lazy_cache_is_bounded_and_dropped_when_pickled(scenes):
    grid = patches.PatchGrid(scenes.sizes, P, S)
    store = patches.make_store(scenes, "lazy", 2)
    for scene_first_patch in grid.offsets[:-1]:
        patches.gather_patches(store, grid, [[scene_first_patch, 0, 0, 0]], 31)
    assert list(store._cache) == [1, 2]  # least recently used scene 0 evicted
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone._cache) == 0 and clone.cache_size == 2


def test_lazy_window_with_nan_fails_naming_scene(tmp_path):
    cube = np.full((20, 20, 31), 0.5, np.float32)
    cube[15, 15, 3] = np.nan
    (tmp_path / "a.mat").parent.mkdir(exist_ok=True)
    cubes.write_mat73(tmp_path / "ARAD_1K_0005.mat", cube)
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ARAD_1K_0005.png")
    files = [
        arad.SceneFiles(
            "ARAD_1K_0005", tmp_path / "ARAD_1K_0005.png", tmp_path / "ARAD_1K_0005.mat"
        )
    ]
    source = arad.FileScenes(files)
    grid = patches.PatchGrid(source.sizes, 8, 4)
    store = patches.make_store(source, "lazy", 1)
    patches.gather_patches(store, grid, [[0, 0, 0, 0]], 31)  # clean window reads fine
    with pytest.raises(ValueError, match=r"ARAD_1K_0005 \(lazy window at 12,12\).*NaN/Inf"):
        patches.gather_patches(store, grid, [[len(grid) - 1, 0, 0, 0]], 31)
    with pytest.raises(ValueError, match=r"ARAD_1K_0005\.mat: cube holds 1 NaN/Inf"):
        patches.make_store(source, "standard")


def test_choice_keys_ignore_case():
    config_checks.check_data(_data_config(memory_mode="Lazy", source=" Synthetic"))
    assert config_checks.choice(" Lazy ") == "lazy"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"memory_mode": "mmap"}, r"unknown data\.memory_mode 'mmap'.*standard"),
        ({"lazy_cache_size": 0}, r"data\.lazy_cache_size must be a positive integer, got 0"),
        ({"source": "hf"}, r"unknown data\.source 'hf': use one of \('arad', 'synthetic'"),
        ({"patch_size": 0}, r"data\.patch_size \(0\) and data\.stride \(8\) must be positive"),
        ({"stride": -1}, r"data\.stride \(-1\) must be positive"),
    ],
)
def test_bad_data_config_names_the_key_and_the_fix(data, message):
    """`config_checks.check_data` owns the rules of config.data (the pipeline calls it)."""
    with pytest.raises(ValueError, match=message):
        config_checks.check_data(_data_config(**data))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spectrum_item_copy_equals_elementwise_augmentation(dtype):
    scene = np.random.default_rng(0).standard_normal((20, 24, 31)).astype(dtype)
    patch = scene[4:12, 8:16]  # a strided window, as the stores hand out
    for k in range(4):
        for v in range(2):
            for h in range(2):
                out = np.empty((8, 8, 31), dtype)
                patches.copy_augmented(out, patch, k, v, h)
                np.testing.assert_array_equal(out, patches.augment(patch, k, v, h))


def test_resident_store_shared_once_through_a_file_when_pickled(scenes):
    store = patches.make_store(scenes, "float16")
    before = [a.copy() for a in store.hsi + store.rgb]
    clone = pickle.loads(pickle.dumps(store))  # what a grain worker receives
    path = pathlib.Path(store.shared_path)
    assert path.is_file() and clone.shared_path == store.shared_path
    assert len(pickle.dumps(store)) < 10_000  # the pixels are not in the pickle
    for a, b, c in zip(before, store.hsi + store.rgb, clone.hsi + clone.rgb, strict=True):
        assert a.dtype == b.dtype == c.dtype == np.float16
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    del store, clone, b, c
    gc.collect()
    assert not path.exists()  # removed with the owning store


def test_batch_buffers_reused_only_when_released():
    pool = patches.BatchBuffers(capacity=2)
    first = pool.get((2, 4, 4, 3), np.float32)
    first_id = id(first)
    view = first[1]
    assert pool.get((2, 4, 4, 3), np.float32) is not first  # held by `first` and `view`
    del first
    assert id(pool.get((2, 4, 4, 3), np.float32)) != first_id  # the view still holds it
    del view
    gc.collect()
    again = pool.get((2, 4, 4, 3), np.float32)
    assert id(again) == first_id  # released: the same memory comes back
    assert pool.get((2, 4, 4, 3), np.float64).dtype == np.float64  # keyed on dtype too
    # Over capacity: a one-off array, never handed out twice while held.
    held = [pool.get((3,), np.float32) for _ in range(4)]
    assert len({id(a) for a in held}) == 4
    assert pickle.loads(pickle.dumps(pool))._pool == {}  # a worker's copy starts empty


def test_gather_into_reused_buffers_equals_fresh(scenes):
    grid = patches.PatchGrid(scenes.sizes, P, S)
    store = patches.make_store(scenes, "standard")
    pool = patches.BatchBuffers()
    draws = _all_draws(grid)[:40]
    kept = patches.gather_patches(store, grid, draws[:20], 31, buffers=pool)
    kept_hsi = kept["hsi"].copy()
    for start in (20, 0, 20):  # later batches must not overwrite the one still held
        batch = patches.gather_patches(store, grid, draws[start : start + 20], 31, buffers=pool)
        fresh = patches.gather_patches(store, grid, draws[start : start + 20], 31)
        for key in ("rgb", "hsi"):
            np.testing.assert_array_equal(batch[key], fresh[key])
        assert batch["hsi"] is not kept["hsi"]
        del batch
    np.testing.assert_array_equal(kept["hsi"], kept_hsi)
