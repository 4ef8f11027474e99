"""Data-parallel sharding: one mesh axis 'data' over every device of every process.

Parameters and optimizer state are replicated; batches are split along their leading axis.
Each process feeds its own slice of the global batch (`create_train_iterator` yields
batch_size // process_count examples) and `host_batch_to_global` assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices, all processes).

    Built with `Mesh` (Auto axis type), not `jax.make_mesh`, whose Explicit axes would need
    `jax.set_mesh` around every step.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def host_batch_to_global(batch, mesh: Mesh):
    """Places each process's host batch onto the mesh as one global array per leaf.

    batch: pytree of numpy arrays [b, ...], b = global batch // process_count, different on
    every process. Returns a pytree of jax.Arrays [b * process_count, ...] sharded along the
    leading axis. The local batch must divide evenly over this process's devices.
    """
    sharding = data_sharding(mesh)
    local_devices = len(mesh.local_devices)

    def place(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % local_devices:
            raise ValueError(
                f"host batch leaf of shape {leaf.shape} cannot be split over {local_devices} "
                "local devices; make batch_size // process_count a multiple of "
                "jax.local_device_count()"
            )
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree.map(place, batch)


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
    """Blocks until every process reaches the barrier `name` (a no-op for one process).

    A barrier of the `jax.distributed` coordination service, not an XLA collective: used
    after compiling a step and before running it, because XLA CPU's gloo collectives wait
    only 30 s for a late peer, and hosts compile at different speeds. `name` must not be
    reused within a run.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def process_zero_first(name: str, fn):
    """Runs `fn()` on process 0, then (after a barrier `name`) on every other process.

    For idempotent preparation of shared files (data generation, moving checkpoints): where
    the processes share process 0's filesystem, `fn` finds the work done; elsewhere each does
    its own. Returns this process's `fn()` result; with one process, just `fn()`.
    """
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    wait_for_all_processes(name)
    return result if jax.process_index() == 0 else fn()
