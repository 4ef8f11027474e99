"""grain input pipeline (`cswin_jax/data/pipeline.py`): batches, shuffling, resume, host shards.

One synthetic 40x48 set (3 train + 2 valid scenes, patch 16, stride 8: 60 patches) is shared
by every test; batches are compared exactly (same data, same code path).
"""

import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from cswin_jax import cubes
from cswin_jax.data import patches, pipeline, synthetic


def _config(**data):
    config = base.get_config()
    config.seed = 7
    config.batch_size = 4
    config.data.source = "synthetic"
    config.data.patch_size = 16
    config.data.stride = 8
    config.data.num_workers = 0
    config.data.synthetic.update(num_train=3, num_valid=2, height=40, width=48, seed=5)
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return pipeline.resolve_data_root(_config(), tmp_path_factory.mktemp("workdir"))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["rgb"], y["rgb"])
        np.testing.assert_array_equal(x["hsi"], y["hsi"])


def test_synthetic_default_generated_once_with_log_line(tmp_path, caplog):
    config = _config()
    config.data.synthetic.update(num_train=1, num_valid=1, height=24, width=24)
    with caplog.at_level(logging.INFO):
        root = pipeline.resolve_data_root(config, tmp_path)
    assert root == tmp_path / "synthetic_data"
    assert any("generating 1 train + 1 valid scenes" in r.getMessage() for r in caplog.records)
    marker_time = (root / synthetic.COMPLETE_MARKER).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert pipeline.resolve_data_root(config, tmp_path) == root
    assert not any("generating" in r.getMessage() for r in caplog.records)
    assert (root / synthetic.COMPLETE_MARKER).stat().st_mtime_ns == marker_time


def test_train_batches_shapes_and_per_host_size(data_root):
    iterator = pipeline.create_train_iterator(
        _config(), data_root, process_index=0, process_count=1
    )
    batch = next(iterator)
    assert batch["rgb"].shape == (4, 16, 16, 3) and batch["rgb"].dtype == np.float32
    assert batch["hsi"].shape == (4, 16, 16, 31) and batch["hsi"].dtype == np.float32
    assert 0.0 <= batch["rgb"].min() and batch["rgb"].max() <= 1.0
    # Two processes: each host yields batch_size // process_count.
    half = pipeline.create_train_iterator(_config(), data_root, process_index=1, process_count=2)
    assert next(half)["hsi"].shape == (2, 16, 16, 31)


def test_same_seed_same_batches_other_seed_differs(data_root):
    first = _take(pipeline.create_train_iterator(_config(), data_root, process_count=1), 3)
    again = _take(pipeline.create_train_iterator(_config(), data_root, process_count=1), 3)
    _assert_same_batches(first, again)
    other = _config()
    other.seed = 8
    different = next(pipeline.create_train_iterator(other, data_root, process_count=1))
    assert not np.array_equal(different["hsi"], first[0]["hsi"])


def test_shuffle_covers_every_patch_once_per_epoch():
    draws = pipeline.augmentation_draws(60, seed=3, process_index=0, process_count=1)
    epoch1 = np.stack([draws[i] for i in range(60)])
    epoch2 = np.stack([draws[i] for i in range(60, 120)])
    assert sorted(epoch1[:, 0]) == list(range(60)) == sorted(epoch2[:, 0])
    assert not np.array_equal(epoch1[:, 0], epoch2[:, 0])  # a fresh permutation each epoch
    assert not np.array_equal(epoch1[:, 0], np.arange(60))  # shuffled at all
    # All 16 augmentations occur, with flags in range.
    assert set(map(tuple, epoch1[:, 1:].tolist())) <= {
        (k, v, h) for k in range(4) for v in range(2) for h in range(2)
    }
    assert len({tuple(r) for r in np.concatenate([epoch1, epoch2])[:, 1:].tolist()}) >= 12


def test_host_shards_are_disjoint_and_cover_the_epoch():
    num_patches, hosts = 61, 3
    shards = [
        [int(pipeline.augmentation_draws(num_patches, 3, p, hosts)[i][0]) for i in range(20)]
        for p in range(hosts)
    ]
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == 60  # disjoint; 61 % 3 = 1 patch left out
    # Augmentation draws do not depend on the host count: same patch, same draw.
    single = pipeline.augmentation_draws(num_patches, 3, 0, 1)
    by_index = {int(single[i][0]): tuple(single[i]) for i in range(num_patches)}
    for p in range(hosts):
        shard = pipeline.augmentation_draws(num_patches, 3, p, hosts)
        for i in range(5):
            assert tuple(shard[i]) == by_index[int(shard[i][0])]


def test_host_batches_differ_and_match_their_draws(data_root):
    config = _config()
    scenes = pipeline.open_scenes(config, data_root, "train")
    grid = patches.PatchGrid(scenes.sizes, 16, 8)
    store = patches.make_store(scenes, "standard")
    for host in range(2):
        iterator = pipeline.create_train_iterator(
            config, data_root, process_index=host, process_count=2
        )
        batch = next(iterator)
        draws = pipeline.augmentation_draws(len(grid), config.seed, host, 2)
        expected = patches.gather_patches(store, grid, np.stack([draws[0], draws[1]]), 31)
        np.testing.assert_array_equal(batch["hsi"], expected["hsi"])
        np.testing.assert_array_equal(batch["rgb"], expected["rgb"])


def test_resume_from_iterator_state_gives_identical_batches(data_root):
    config = _config()
    uninterrupted = _take(pipeline.create_train_iterator(config, data_root, process_count=1), 20)
    first = pipeline.create_train_iterator(config, data_root, process_count=1)
    _take(first, 17)  # crosses the 60-patch epoch boundary (15 batches of 4)
    state = first.get_state()
    resumed = pipeline.create_train_iterator(config, data_root, process_count=1)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), uninterrupted[17:])


def test_resume_through_orbax_grain_checkpoint(data_root, tmp_path):
    config = _config()
    uninterrupted = _take(pipeline.create_train_iterator(config, data_root, process_count=1), 6)
    iterator = pipeline.create_train_iterator(config, data_root, process_count=1)
    _take(iterator, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    restored = pipeline.create_train_iterator(config, data_root, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(
            4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    _assert_same_batches(_take(restored, 2), uninterrupted[4:])


def test_memory_modes_give_same_batches(data_root, monkeypatch):
    standard = _take(pipeline.create_train_iterator(_config(), data_root, process_count=1), 2)
    lazy = _take(
        pipeline.create_train_iterator(_config(memory_mode="lazy"), data_root, process_count=1),
        2,
    )
    _assert_same_batches(lazy, standard)
    # The mode is config.data.memory_mode alone (this variable once overrode it).
    monkeypatch.setenv("MST_MEMORY_MODE", "float16")
    again = _take(pipeline.create_train_iterator(_config(), data_root, process_count=1), 2)
    _assert_same_batches(again, standard)
    half = _take(
        pipeline.create_train_iterator(_config(memory_mode="float16"), data_root, process_count=1),
        2,
    )
    for h, s in zip(half, standard, strict=True):
        # float16 storage: relative rounding <= 2**-11.
        np.testing.assert_allclose(h["hsi"], s["hsi"], rtol=2**-11, atol=0)


def test_load_split_full_frames(data_root):
    scenes = pipeline.load_split(_config(), data_root, "valid")
    assert [s.stem for s in scenes] == ["SYNTH_0004", "SYNTH_0005"]
    assert scenes[0].rgb.shape == (40, 48, 3) and scenes[0].hsi.shape == (40, 48, 31)
    assert scenes[0].hsi.dtype == np.float32
    assert len(pipeline.load_split(_config(max_valid_scenes=1), data_root, "valid")) == 1


def test_worker_processes_give_the_same_batches(data_root):
    # One small multi-process run: spawn workers must reproduce the in-process batches.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    in_process = _take(pipeline.create_train_iterator(_config(), data_root, process_count=1), 3)
    iterator = pipeline.create_train_iterator(_config(num_workers=1), data_root, process_count=1)
    try:
        _assert_same_batches(_take(iterator, 3), in_process)
    finally:
        iterator.close()


def test_bad_pipeline_input(data_root, tmp_path):
    config = _config()
    config.batch_size = 5
    with pytest.raises(ValueError, match=r"batch_size 5 is not divisible by the 2 processes"):
        pipeline.create_train_iterator(config, data_root, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"unknown data\.source 'hf'"):
        pipeline.resolve_data_root(_config(source="hf"), tmp_path)
    with pytest.raises(ValueError, match=r"SYNTH_0001: image is 40x48 but data.patch_size is 64"):
        pipeline.create_train_iterator(_config(patch_size=64), data_root, process_count=1)
    with pytest.raises(ValueError, match=r"unknown data\.memory_mode 'ssd'"):
        pipeline.create_train_iterator(_config(memory_mode="ssd"), data_root, process_count=1)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data\.data_dir"):
        pipeline.resolve_data_root(_config(source="arad", data_dir=str(tmp_path / "x")), tmp_path)


def test_a_negated_cube_is_rejected_at_load_naming_the_scene(data_root, tmp_path):
    """A sign error on export (every value negative) stops the run before training, with the
    file and the count; the tolerance is `data.negative_tolerance`."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    cube_path = next(iter(sorted((root / "Train_Spec").glob("SYNTH_0001.*"))))
    cube = cubes.read_cube(cube_path)
    cubes.write_mat73(cube_path.with_suffix(".mat"), -cube)
    with pytest.raises(ValueError, match=r"SYNTH_0001\.mat: \d+ of \d+ values are below -0\.01"):
        pipeline.create_train_iterator(_config(), root, process_count=1)
    with pytest.raises(ValueError, match=r"SYNTH_0001\.mat: \d+ of \d+ values are below -0\.01"):
        pipeline.load_split(_config(), root, "train")
