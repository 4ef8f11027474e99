"""The training programs of one config on one mesh: the initialiser and one jitted train step
per step kind, compiled ahead of time with their shardings and kept for reuse in the process
(`compiled_programs`)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cswin_jax
from cswin_jax import cli, sharding, train
from cswin_jax.schedule import StepKind, step_kinds, total_steps
from cswin_jax.train import TrainState


def _state_shardings(state_shape: TrainState, mesh) -> TrainState:
    repl = sharding.replicated(mesh)
    return jax.tree.map(lambda _: repl, state_shape)


def _batch_sharding(mesh):
    # [A, B, P, P, C]: the batch axis B is split over the devices.
    return NamedSharding(mesh, P(None, "data"))


class Programs(NamedTuple):
    """The setup and the jitted programs of one config on one mesh (`compiled_programs`)."""

    setup: train.Setup
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves with their shardings
    state_sharding: TrainState
    batch_sharding: NamedSharding
    init_fn: Callable  # rng key -> TrainState (`initialise_once`: compiled per call, then freed)
    # Per `StepKind` the run has: (state, batch) -> (state, metrics), state donated.
    step_fns: Mapping[StepKind, jax.stages.Compiled]
    # ({'params': generator params}, rgb [B, H, W, 3]) -> hsi: the float32 eval-mode
    # generator, as `inference.ModelApply` takes it (its jitted runners are kept per function).
    predict_fn: Callable


_PROGRAMS: dict[tuple, Programs] = {}


# Config entries the compiled programs do not depend on (the host loop, the writers and the
# data readers use them; `test_host_only_keys_do_not_reach_the_trainer` checks the trainer
# never reads them). Changing them reuses the kept programs.
HOST_ONLY_KEYS = (
    "recipe",
    "max_consecutive_nonfinite",
    "divergence_guard",
    "log_dir",
    "checkpoint_dir",
    "compilation_cache_dir",
    "checkpoint_every",
    "checkpoint_keep",
    "log_every",
    "init_from",
    "use_wandb",
    "wandb_project",
    "eval",
)
PROGRAM_DATA_KEYS = ("patch_size",)  # of config.data, the only one that shapes the programs


def _programs_key(config: ml_collections.ConfigDict, mesh) -> tuple:
    programs_config = {k: v for k, v in config.to_dict().items() if k not in HOST_ONLY_KEYS}
    programs_config["data"] = {k: config.data[k] for k in PROGRAM_DATA_KEYS}
    return (
        json.dumps(programs_config, sort_keys=True, default=repr),
        tuple(int(d.id) for d in mesh.devices.flat),
        jax.process_count(),
    )


def clear_compiled_programs() -> None:
    """Drops the programs `compiled_programs` keeps (frees their executables)."""
    _PROGRAMS.clear()


def compiled_programs(config: ml_collections.ConfigDict, mesh) -> Programs:
    """The setup for `config` and its programs on `mesh`: one train step per `StepKind` the
    run has (`schedule.step_kinds`: with and without R1 for the GAN recipes), compiled ahead
    of time (`jit(...).lower(...).compile()`) for the loop's batch shape and shardings, and
    the initialiser, which `initialise_once` compiles when it is called and frees after.

    Kept for the newest (config, devices) pair of this process, so another
    `train_and_evaluate` call with the same config (a resume in the same process, a notebook
    re-run) reuses the compiled step. A compiled CPU step is expensive to get even from the
    persistent compilation cache: loading one rebuilds XLA's thunk dependency graph, which
    takes about as long as compiling it.
    """
    key = _programs_key(config, mesh)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    _PROGRAMS.clear()  # one entry: free the previous config's executables first
    setup = train.make_setup(config)
    state_shape = jax.eval_shape(functools.partial(train.init_state, setup), jax.random.key(0))
    state_sharding = _state_shardings(state_shape, mesh)
    batch_sharding = _batch_sharding(mesh)
    p = config.data.patch_size
    batch_shape = (config.gradient_accumulation_steps, config.batch_size, p, p)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((*batch_shape, c), jnp.float32, sharding=batch_sharding)
        for k, c in (("rgb", config.model.in_channels), ("hsi", config.model.out_channels))
    }
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shape,
        state_sharding,
    )
    lowered = {
        kind: train.make_train_step(
            setup, state_sharding, batch_sharding, sharding.replicated(mesh), donate=True, kind=kind
        ).lower(abstract_state, abstract_batch)
        for kind in step_kinds(config, 0, total_steps(config))
    }
    cache = jax.config.jax_compilation_cache_dir
    logging.info(
        "compiling the training step (%s): on CPU the first time takes minutes; %s",
        ", ".join(_step_name(kind) for kind in lowered),
        f"later runs load it from the cache in {cache}" if cache else "no compilation cache set",
    )
    started = time.perf_counter()
    with cli.without_compile_alarm():  # the line above says it instead of XLA's banner
        step_fns = compile_all(lowered)
    logging.info("compiled in %.0f s", time.perf_counter() - started)
    programs = Programs(
        setup=setup,
        abstract_state=abstract_state,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        init_fn=functools.partial(initialise_once, setup, state_sharding),
        step_fns=step_fns,
        predict_fn=lambda variables, rgb: train.predict(setup, variables["params"], rgb),
    )
    _PROGRAMS[key] = programs
    return programs


def initialise_once(
    setup: train.Setup, state_sharding: TrainState | None, key: jax.Array
) -> TrainState:
    """`train.init_state(setup, key)`, compiled for this call and freed after it.

    The initialiser runs once per run (never on a resume), but its executable is large: one
    random draw per parameter leaf, and at default width it holds 0.7 GiB of host memory for as
    long as it lives, which a kept executable would add to every training step's peak. So it
    is compiled here (from the persistent cache when one is set), run to completion, and
    dropped. Dropping it before its run completes left the memory held after the loop's
    `release_freed_memory` (measured: 1.36 against 0.69 GiB resident), hence the wait.
    """
    shardings = {} if state_sharding is None else {"out_shardings": state_sharding}
    init = jax.jit(functools.partial(train.init_state, setup), **shardings)
    compiled = init.lower(key).compile()
    state = jax.block_until_ready(compiled(key))
    del compiled, init
    return state


def _step_name(kind) -> str:
    if not kind.discriminator:
        return "generator update"
    return "generator + discriminator update" + (" with R1" if kind.r1 else "")


def compile_all(lowered: Mapping) -> dict:
    """`{key: lowered.compile()}`, one after the other: compiling two GAN-step programs side
    by side doubles the compiler's peak memory (enough to kill a two-process run on a small
    host) for little less wall time. The memory each compile frees goes back to the kernel
    before the next one starts, so the next does not stack on it."""
    compiled = {}
    for key, program in lowered.items():
        compiled[key] = program.compile()
        cswin_jax.release_freed_memory()
    return compiled
