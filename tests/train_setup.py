"""Shared set-up of the training-step tests: a tiny GAN config, batches, jitted steps.

Not a test module. `tests/test_train*.py` and the two-process script in `test_train.py` import it.
"""

import functools
import gc

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cswin_jax
from configs import quickstart
from cswin_jax import programs, schedule, train


def release_compiled_programs() -> None:
    """Frees compiled executables and returns the freed heap to the OS, so the next compile
    starts from a small process (the persistent cache reloads programs)."""
    jax.clear_caches()
    gc.collect()
    cswin_jax.release_freed_memory()


def tiny_config():
    """The quickstart recipe shrunk to test size (widths 16/32/64, 16x16 patches)."""
    c = quickstart.get_config()
    c.data.patch_size = 16
    c.data.stride = 8
    c.batch_size = 8
    # On CPU the micro-steps are unrolled, so A = 2 roughly doubles every step's compile time;
    # accumulation is exercised once, by the generator-only recipe test.
    c.gradient_accumulation_steps = 1
    # Not 8: EfficientSpectralAttention normalises q and k with GroupNorm(8), so 8 channels
    # give one channel per group, whose spatial mean is exactly 0; the attention then
    # normalises rounding noise, and 1- and 8-device runs differ by O(1) (the original's
    # arithmetic, ill-conditioned only at this toy width).
    c.model.base_channels = 16
    c.model.num_heads = 2
    c.model.split_sizes = (2, 2, 2)
    c.model.norm_groups = 4
    # One dual-attention block per stage instead of two: every stage, skip and resample is
    # still there, and the step's program (compile time on CPU) is about half as large.
    c.model.blocks_per_stage = 1
    c.discriminator.base_dim = 8
    c.discriminator.num_heads = 2
    c.discriminator.num_blocks = (1, 1, 1)
    c.sinkhorn.max_points = 16
    c.loss.warmup_iterations = 1  # adversarial and SAM weights active from step 1
    c.loss.use_r1 = True  # the quick start has none; the step tests exercise it
    c.loss.r1_interval = 2
    c.optim.warmup_steps = 2
    c.data.synthetic.num_train = 2
    c.data.synthetic.num_valid = 1
    c.data.synthetic.height = 40
    c.data.synthetic.width = 48
    c.epochs = 1
    c.iterations_per_epoch = 4
    c.checkpoint_every = 2
    c.log_every = 2
    return c


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    a, b, p = config.gradient_accumulation_steps, config.batch_size, config.data.patch_size
    rgb = rng.uniform(0, 1, (a, b, p, p, 3)).astype(np.float32)
    hsi = rng.uniform(0, 1, (a, b, p, p, 31)).astype(np.float32)
    return {"rgb": rgb, "hsi": hsi}


def jitted_step(setup, devices, donate=False, kind=schedule.PLAIN_STEP):
    """(init, step of `kind`, batch sharding) jitted as `loop.train_and_evaluate` jits them:
    over all devices with `donate=True`, the step is the loop's program."""
    mesh = Mesh(np.array(devices), ("data",))
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, "data"))
    init = functools.partial(train.init_state, setup)
    state_shape = jax.eval_shape(init, jax.random.key(0))
    state_sh = jax.tree.map(lambda _: repl, state_shape)
    step = train.make_train_step(setup, state_sh, data, repl, donate=donate, kind=kind)
    init = jax.jit(init, out_shardings=state_sh)
    return init, step, data


def compiled_steps(setup, devices, state, batch, donate=False):
    """`{kind: compiled step}` for every kind of step the setup's config runs, compiled
    as the loop compiles them."""
    config = setup.config
    lowered = {}
    for kind in schedule.step_kinds(config, 0, schedule.total_steps(config)):
        _, step, _ = jitted_step(setup, devices, donate=donate, kind=kind)
        lowered[kind] = step.lower(state, batch)
    return programs.compile_all(lowered)


def one_device_run(setup):
    """Two GAN steps on one device (loop steps 0 and 1: with R1, then without): (initial
    state, final state, metrics of each step, `{kind: compiled step}`, the batch sharding,
    the final state as device arrays). States are host copies except the last. The steps
    are compiled ahead of time: a `jax.stages.Compiled` outlives `jax.clear_caches()`, so
    later tests call them without reloading them from the persistent cache (on CPU, about
    as slow as compiling: measured 145 s vs ~150 s)."""
    init, _, data = jitted_step(setup, jax.devices()[:1])
    state0 = init(jax.random.key(0))
    batches = [jax.device_put(make_batch(setup.config, seed), data) for seed in (0, 1)]
    steps = compiled_steps(setup, jax.devices()[:1], state0, batches[0])
    state, history = state0, []
    for i, batch in enumerate(batches):
        state, m = steps[schedule.step_kind(setup.config, i)](state, batch)
        history.append(jax.device_get(m))
    return jax.device_get(state0), jax.device_get(state), history, steps, data, state


def tiny_setup():
    return train.make_setup(tiny_config())
