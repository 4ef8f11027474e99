"""Where a Sinkhorn-GAN training step spends its time: each part jitted and timed on its own.

  python bench/step_parts.py [--config=configs/gan.py] [--batch 2] [--repeats 3]
      [--parts g_fwd,g_fwd_bwd,...] [--config.mixed_precision=False ...]

Parts (one micro-batch of `--batch` patches of `data.patch_size`, the recipe's dtype):

  g_fwd        generator forward, train mode
  g_fwd_bwd    generator forward + backward of the Charbonnier loss (parameter gradients)
  d_fwd        discriminator forward on (rgb, hsi), train mode (one power iteration)
  d_fwd_bwd    discriminator forward + backward of the summed logits (parameter gradients)
  sinkhorn     the discriminator's Sinkhorn loss on two logit maps, value and both gradients
  r1           the R1 penalty's parameter gradient (double backward through D), alone
  r1_cond      the same as r1 inside a `lax.cond` with a true predicate (why the trainer compiles
               one program per step kind instead of branching inside one)
  gen_step     `train.generator_step` (G, D(real), D(fake) for G, Adam, EMA)
  disc_step    `train.discriminator_step` without R1 (D(real), D(fake), Sinkhorn, Adam)
  disc_step_r1 the same with R1
  train_step   `train.train_step` without R1, and `train_step_r1` with it

Prints per part: compile seconds, the median run time over `--repeats` runs after one warm-up,
and XLA's temporary memory for it. The parts overlap (a step contains its parts), so they do
not add up to the step; they show which part grows with what.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import cswin_jax
from cswin_jax import cli, losses, programs, schedule, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gan.py", "recipe", lock_config=False)
_BATCH = flags.DEFINE_integer("batch", 2, "patches per micro-batch")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per part (after one warm-up run)")
PARTS = (
    "g_fwd",
    "g_fwd_bwd",
    "d_fwd",
    "d_fwd_bwd",
    "sinkhorn",
    "r1",
    "r1_cond",
    "gen_step",
    "disc_step",
    "disc_step_r1",
    "train_step",
    "train_step_r1",
)
_PARTS = flags.DEFINE_list("parts", list(PARTS), "parts to time")


def _time_part(name, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    temp = f"{memory.temp_size_in_bytes / 2**30:6.2f} GiB" if memory is not None else "   n/a"
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    print(
        f"{name:14s} {1e3 * statistics.median(times):10.1f} ms   compile {compile_s:6.1f} s   "
        f"XLA temp {temp}",
        flush=True,
    )


def main(argv):
    del argv
    config = _CONFIG.value
    config.batch_size = _BATCH.value
    config.gradient_accumulation_steps = 1
    unknown = set(_PARTS.value) - set(PARTS)
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    setup = train.make_setup(config)
    state = programs.initialise_once(setup, None, jax.random.key(0))
    plain, with_r1 = schedule.PLAIN_STEP, schedule.StepKind(True, True)
    d_step = functools.partial(train.discriminator_step, setup)
    b, p = _BATCH.value, config.data.patch_size
    rng = np.random.default_rng(0)
    rgb = jnp.asarray(rng.uniform(0, 1, (b, p, p, 3)), jnp.float32)
    hsi = jnp.asarray(rng.uniform(0, 1, (b, p, p, 31)), jnp.float32)
    batch = {"rgb": rgb[None], "hsi": hsi[None]}
    gen = setup.gen
    gp, dp, sn = state.gen_params, state.disc_params, state.disc_spectral_norm
    print(
        f"devices {jax.devices()}; batch {b}, patch {p}, mixed_precision={config.mixed_precision}, "
        f"model.remat={config.model.remat}",
        flush=True,
    )

    def g_forward(params):
        return gen.apply({"params": params}, rgb, train=True, step=state.gen_updates)

    def g_loss(params):
        return losses.charbonnier(g_forward(params).astype(jnp.float32), hsi)

    def d_logits(params, sn_state, h, for_r1=False):
        return train._disc_train(setup, params, sn_state, rgb, h, for_r1=for_r1)

    def d_sum(params):
        logits, _ = d_logits(params, sn, hsi)
        return jnp.sum(logits.astype(jnp.float32))

    def r1_grad(params):
        def penalty(q):
            return losses.r1_penalty(
                lambda h: d_logits(q, sn, h, for_r1=True), hsi, config.loss.r1_gamma
            )[0]

        return jax.grad(penalty)(params)

    def r1_cond_grad(params, pred):
        return jax.lax.cond(pred, r1_grad, lambda q: jax.tree.map(jnp.zeros_like, q), params)

    logits = jnp.asarray(rng.normal(size=(b, p // 4, p // 4, 1)), jnp.float32)

    def sinkhorn(real, fake):
        return jax.value_and_grad(
            lambda r, f: losses.discriminator_sinkhorn_loss(r, f, config.sinkhorn), argnums=(0, 1)
        )(real, fake)

    fake = train.FakeBatch(hsi[::-1], sn)
    parts = {
        "g_fwd": (g_forward, gp),
        "g_fwd_bwd": (jax.value_and_grad(g_loss), gp),
        "d_fwd": (lambda q: d_logits(q, sn, hsi), dp),
        "d_fwd_bwd": (jax.value_and_grad(d_sum), dp),
        "sinkhorn": (sinkhorn, logits, logits[::-1] * 0.5),
        "r1": (r1_grad, dp),
        "r1_cond": (r1_cond_grad, dp, jnp.bool_(True)),
        "gen_step": (functools.partial(train.generator_step, setup), state, batch),
        "disc_step": (functools.partial(d_step, kind=plain), state, batch, fake),
        "disc_step_r1": (functools.partial(d_step, kind=with_r1), state, batch, fake),
        "train_step": (functools.partial(train.train_step, setup, kind=plain), state, batch),
        "train_step_r1": (
            functools.partial(train.train_step, setup, kind=with_r1),
            state,
            batch,
        ),
    }
    for name in _PARTS.value:
        fn, *args = parts[name]
        _time_part(name, fn, *args)


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main)
