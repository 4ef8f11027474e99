"""Data-parallel sharding helpers (`cswin_jax/sharding.py`) on 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from cswin_jax import sharding


def test_mesh_over_all_devices_with_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 8
    small = sharding.make_mesh(jax.devices()[:2])
    assert small.size == 2
    assert sharding.replicated(mesh).spec == PartitionSpec()
    assert sharding.data_sharding(mesh).spec == PartitionSpec("data")


def test_host_batch_becomes_global_array_split_on_the_batch_axis():
    mesh = sharding.make_mesh()
    host = {
        "rgb": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
        "hsi": np.arange(16 * 2 * 2 * 31, dtype=np.float32).reshape(16, 2, 2, 31),
    }
    batch = sharding.host_batch_to_global(host, mesh)
    for key in host:
        # Single process: the global batch is the host batch; 2 examples per device.
        assert batch[key].shape == host[key].shape
        assert batch[key].sharding == sharding.data_sharding(mesh)
        for shard in batch[key].addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index])
    # A jitted data-parallel reduction over the sharded batch sees every example once
    # (float32 sum of 1,984 integers below 2,000: relative error well under 1e-6).
    total = jax.jit(lambda b: jnp.sum(b["hsi"]), out_shardings=sharding.replicated(mesh))(batch)
    np.testing.assert_allclose(float(total), host["hsi"].sum(dtype=np.float64), rtol=1e-6)


def test_batch_not_divisible_by_local_devices():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match=r"shape \(6, 3\) cannot be split over 8 local devices"):
        sharding.host_batch_to_global({"rgb": np.zeros((6, 3), np.float32)}, mesh)
