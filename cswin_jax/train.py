"""Training: the Sinkhorn-GAN step and the generator-only step (the loop is in `loop.py`,
the schedule of step kinds and learning rates in `schedule.py`).

The generator is the one `config.model.arch` names (`cswin_jax.models.build_generator`: the
CSWin U-Net or MST++, which is trained generator-only). `make_setup(config)` builds the
networks and optimizers once; the step functions take it first.

`train_step(setup, state, batch, kind) -> (state, metrics)` is pure and jitted
(`make_train_step`: `functools.partial` binds `setup` and `kind`) with explicit shardings
over a `('data',)` mesh: parameters and optimizer states replicated, batches split along the
batch axis. `kind` (static, `schedule.step_kind(config, loop_step)`) says whether the step
updates the discriminator and whether it adds R1; the loop compiles one program per kind it
needs (two for the default recipe) and calls the right one. A data-dependent `lax.cond`
inside one program would be simpler, but XLA CPU runs the convolutions of a conditional's
branch an order of magnitude slower than the same convolutions at the top level of a
program (`bench/step_parts.py`: r1 vs r1_cond). One call is one generator update:

1. Generator: `gradient_accumulation_steps` micro-batches (`batch['rgb']` is
   `[A, B, P, P, 3]`) are accumulated (a scan on accelerators, unrolled on CPU); each runs G,
   D(real) and D(fake) (D frozen), the combined loss of `losses.generator_loss` and its
   gradient; the mean gradient is clipped to global norm `optim.grad_clip_norm` (0: not
   clipped) and applied with Adam. The EMA of the generator weights follows. Without the
   discriminator (`train_discriminator=False`) the loss is `reconstruction_loss`.
2. Discriminator (on every `n_critic`-th loop step): on the last micro-batch, with the fake
   from step 1 detached, loss `-mean S(real, fake)` plus lazy R1 (on every
   `loss.r1_interval`-th discriminator update, scaled by the interval), clipped and applied
   with its own Adam.

Spectral-norm state advances on every training-mode discriminator call, as in the original.
A step whose loss or gradients are not finite changes nothing (parameters, optimizer states,
EMA) and is counted. `TrainState.lr_scale` multiplies both networks' updates (the divergence
guard lowers it).

Deliberate fixes of the original CSWIN v2 PyTorch trainer: learning-rate horizons count
optimizer steps; eta_min is absolute; R1 fires (½γ, lazy); n_critic means "one D step every
n_critic G steps"; losses run in float32 under bfloat16 compute; the EMA weights are validated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cswin_jax import losses, models
from cswin_jax.config_checks import check_training
from cswin_jax.models import discriminator as disc_lib
from cswin_jax.schedule import PLAIN_STEP, StepKind, make_optimizer, total_steps

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    gen_updates: jax.Array  # generator updates applied (a skipped non-finite step adds none)
    disc_updates: jax.Array  # discriminator updates applied
    gen_params: PyTree
    ema_params: PyTree
    opt_state_g: PyTree
    disc_params: PyTree | None
    disc_spectral_norm: PyTree | None
    opt_state_d: PyTree | None
    rng: jax.Array  # raw uint32 key data (portable through Orbax)
    nonfinite_streak: jax.Array  # consecutive steps with a skipped (G or D) update right now
    nonfinite_peak: jax.Array  # longest streak seen (checked by the host loop)
    nonfinite_total: jax.Array  # steps with a skipped update so far
    lr_scale: jax.Array  # float32 factor on both learning rates (lowered by the divergence guard)
    rollbacks: jax.Array  # times the divergence guard rolled the run back


class FakeBatch(NamedTuple):
    """What the discriminator update takes from the generator step (last micro-batch)."""

    hsi: jax.Array  # [B, P, P, 31] float32 generated HSI, detached
    sn_real: PyTree  # the spectral-norm state the generator step's D(real) call read


def _models(config: ml_collections.ConfigDict):
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    gen = models.build_generator(config.model, dtype=dtype)
    disc = disc_lib.build_discriminator(config.discriminator, dtype=dtype)
    return gen, disc


def _init_key(key: jax.Array) -> jax.Array:
    """A key for parameter initialisation: an RBG key seeded from the run's threefry `key`.

    Flax derives one key per parameter by `fold_in`, and XLA inlines each threefry `fold_in`
    or draw as a few hundred integer ops (the generator's init compiled slowly on CPU); XLA's
    RngBitGenerator does each in one op. Same distributions, still a pure function of
    `config.seed`; the run's own stream (`TrainState.rng`) stays threefry.
    """
    seed = jax.random.bits(key, (4,), jnp.uint32)
    return jax.random.wrap_key_data(seed, impl="unsafe_rbg")


def _tree_select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _finite_update(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """Whether an update is finite: the loss and the global gradient norm both are.

    Any NaN/Inf gradient entry makes the norm non-finite (so does a norm above ~1.8e19, which
    clipping could not rescue either). Not `all(isfinite(leaf) ...)`: XLA CPU's compile time
    grows quadratically with the leaves for such a scalar feeding a select on every leaf; one
    computed through a square root compiles in linear time.
    """
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def _unrolled_scan(fn, carry, xs, length: int):
    """`jax.lax.scan(fn, carry, xs)` as straight-line code (no XLA loop)."""
    outputs = []
    for i in range(length):
        carry, out = fn(carry, jax.tree.map(lambda x, i=i: x[i], xs))
        outputs.append(out)
    return carry, jax.tree.map(lambda *o: jnp.stack(o), *outputs)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


class Setup(NamedTuple):
    """What the step functions need besides the state and the batch, built once per config by
    `make_setup`; the functions take it first, and the jitted step binds it with
    `functools.partial` (`make_train_step`)."""

    config: ml_collections.ConfigDict
    gen: Any  # the generator in the compute dtype (bfloat16 under mixed precision)
    disc: Any  # the discriminator in the compute dtype
    eval_gen: Any  # the generator in float32, for validation and inference
    tx_g: optax.GradientTransformation
    sched_g: optax.Schedule  # of generator updates
    tx_d: optax.GradientTransformation
    sched_d: optax.Schedule  # of discriminator updates

    @property
    def use_disc(self) -> bool:
        return bool(self.config.train_discriminator)


def make_setup(config: ml_collections.ConfigDict) -> Setup:
    """Checks the training keys of `config` and builds the models, optimizers and schedules."""
    check_training(config)
    gen, disc = _models(config)
    horizon = total_steps(config)
    tx_g, sched_g = make_optimizer(config.optim.generator_lr, config, horizon)
    d_horizon = max(1, horizon // config.n_critic)
    tx_d, sched_d = make_optimizer(config.optim.discriminator_lr, config, d_horizon)
    eval_gen = models.build_generator(config.model, dtype=jnp.float32)
    return Setup(config, gen, disc, eval_gen, tx_g, sched_g, tx_d, sched_d)


def init_state(setup: Setup, rng: jax.Array) -> TrainState:
    """Fresh parameters (PyTorch-default initialisation) and optimizer states."""
    config = setup.config
    p = config.data.patch_size
    rgb = jnp.zeros((1, p, p, config.model.in_channels), jnp.float32)
    hsi = jnp.zeros((1, p, p, config.model.out_channels), jnp.float32)
    key_g, key_d, key_run = jax.random.split(rng, 3)
    key_g, key_d = _init_key(key_g), _init_key(key_d)
    gen_params = setup.gen.init(key_g, rgb, train=False)["params"]
    disc_params = disc_sn = opt_d = None
    if setup.use_disc:
        disc_vars = setup.disc.init(key_d, rgb, hsi, train=False)
        disc_params = disc_vars["params"]
        disc_sn = disc_vars["spectral_norm"]
        opt_d = setup.tx_d.init(disc_params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        gen_updates=zero,
        disc_updates=zero,
        gen_params=gen_params,
        ema_params=jax.tree.map(jnp.copy, gen_params),
        opt_state_g=setup.tx_g.init(gen_params),
        disc_params=disc_params,
        disc_spectral_norm=disc_sn,
        opt_state_d=opt_d,
        rng=jax.random.key_data(key_run),
        nonfinite_streak=zero,
        nonfinite_peak=zero,
        nonfinite_total=zero,
        lr_scale=jnp.ones((), jnp.float32),
        rollbacks=zero,
    )


# -- generator --------------------------------------------------------------------------------


def _disc_train(setup: Setup, params, sn_state, rgb, hsi, for_r1: bool = False):
    """Train-mode discriminator call -> (logits, updated spectral-norm state).

    `for_r1`: the R1 penalty's call, whose double backward runs faster with the downsampling
    convolutions computed as stride-1 ones subsampled (same numbers; the plain calls' forward
    and backward are faster strided, `bench/step_parts.py --parts d_fwd,d_fwd_bwd,r1`).
    """
    disc = setup.disc.clone(strided_via_subsample=True) if for_r1 else setup.disc
    logits, updates = disc.apply(
        {"params": params, "spectral_norm": sn_state},
        rgb,
        hsi,
        train=True,
        mutable=["spectral_norm"],
    )
    return logits, updates["spectral_norm"]


def _generator_micro_step(setup: Setup, state: TrainState, sn_state, rgb, hsi):
    """Loss and gradient of the generator on one micro-batch; also the spectral-norm state its
    D(real) call read (the discriminator update repeats that exact call)."""
    config = setup.config
    real_logits = None
    sn_real = sn_state
    if setup.use_disc:
        real_logits, sn_state = _disc_train(setup, state.disc_params, sn_state, rgb, hsi)
        real_logits = jax.lax.stop_gradient(real_logits)

    def loss_fn(gen_params):
        hsi_pred = setup.gen.apply({"params": gen_params}, rgb, train=True, step=state.gen_updates)
        hsi_pred = hsi_pred.astype(jnp.float32)
        new_sn = sn_state
        if setup.use_disc:
            fake_logits, new_sn = _disc_train(setup, state.disc_params, sn_state, rgb, hsi_pred)
            total, terms = losses.generator_loss(
                hsi_pred, hsi, fake_logits, real_logits, state.gen_updates, config
            )
        else:
            total, terms = reconstruction_loss(config.loss, hsi_pred, hsi)
        return total, (terms, hsi_pred, new_sn)

    (loss, (terms, hsi_pred, sn_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.gen_params
    )
    return loss, terms, grads, jax.lax.stop_gradient(hsi_pred), sn_state, sn_real


def reconstruction_loss(loss_cfg: ml_collections.ConfigDict, hsi_pred, hsi):
    """Generator-only objective: lambda_rec * Charbonnier + lambda_mrae * MRAE. A term whose
    weight is 0 is neither computed nor logged (`validate_config`: not both)."""
    total = jnp.zeros((), jnp.float32)
    terms = {}
    if loss_cfg.lambda_rec:
        rec = losses.charbonnier(hsi_pred, hsi)
        total = total + loss_cfg.lambda_rec * rec
        terms["reconstruction"] = rec
    if loss_cfg.lambda_mrae:
        mrae = losses.mrae_loss(hsi_pred, hsi)
        total = total + loss_cfg.lambda_mrae * mrae
        terms["mrae"] = mrae
    return total, terms


def generator_step(setup: Setup, state: TrainState, batch: Mapping[str, jax.Array]):
    """The generator update of `train_step`; also returns the last micro-batch's fake.

    Returns:
      (new_state, metrics, `FakeBatch` of the last micro-batch).
    """
    n_micro = batch["rgb"].shape[0]

    def micro_step(carry, micro_batch):
        grad_sum, loss_sum, sn, _, _ = carry
        loss, terms, grads, hsi_pred, sn, sn_real = _generator_micro_step(
            setup, state, sn, micro_batch["rgb"], micro_batch["hsi"]
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss, sn, hsi_pred, sn_real), terms

    carry = (
        jax.tree.map(jnp.zeros_like, state.gen_params),
        jnp.zeros((), jnp.float32),
        state.disc_spectral_norm,
        jnp.zeros(batch["hsi"].shape[1:], jnp.float32),  # the last micro-batch's fake
        state.disc_spectral_norm,  # the state its D(real) call read
    )
    micro_batches = {"rgb": batch["rgb"], "hsi": batch["hsi"]}
    if n_micro == 1 or jax.default_backend() == "cpu":
        # Unrolled. XLA CPU runs a convolution inside a loop body far slower than the same
        # convolution outside one, and the generator's convolutions (mostly 3x3 kernel
        # gradients) dominate the step: in a scan they made it several times slower. Costs
        # compile time (one copy of the micro-step per micro-batch), not run time.
        (grad_sum, loss_sum, sn, hsi_pred, sn_real), terms = _unrolled_scan(
            micro_step, carry, micro_batches, n_micro
        )
    else:
        # One copy of the micro-step in the program, whatever A.
        (grad_sum, loss_sum, sn, hsi_pred, sn_real), terms = jax.lax.scan(
            micro_step, carry, micro_batches
        )
    terms = jax.tree.map(jnp.mean, terms)
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    gen_loss = loss_sum / n_micro
    grad_norm = optax.tree.norm(grads)
    finite = _finite_update(gen_loss, grad_norm)

    updates, new_opt = setup.tx_g.update(grads, state.opt_state_g, state.gen_params)
    updates = jax.tree.map(lambda u: state.lr_scale * u, updates)
    new_params = optax.apply_updates(state.gen_params, updates)
    decay = setup.config.ema_decay
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_params)
    new_state = state.replace(
        gen_updates=state.gen_updates + finite.astype(jnp.int32),
        gen_params=_tree_select(finite, new_params, state.gen_params),
        opt_state_g=_tree_select(finite, new_opt, state.opt_state_g),
        ema_params=_tree_select(finite, new_ema, state.ema_params),
        disc_spectral_norm=sn if setup.use_disc else None,
    )
    out = {
        "gen_loss": gen_loss,
        "gen_grad_norm": grad_norm,
        "lr_g": state.lr_scale * setup.sched_g(state.gen_updates),
        "gen_skipped": (~finite).astype(jnp.int32),
    }
    out.update(terms)
    return new_state, out, FakeBatch(hsi_pred, sn_real)


# -- discriminator ----------------------------------------------------------------------------


def _discriminator_update(setup: Setup, state: TrainState, fake: FakeBatch, rgb, hsi, r1: bool):
    """One discriminator update on (rgb, hsi) and the detached fake.

    D(real) repeats the generator step's call on the same batch with the same parameters and
    spectral-norm state, so, as in the original, the discriminator loss sees the real logits
    the generator saw (three power iterations per step, four with R1); D(fake) continues from
    the state after the generator's D(fake) call.
    """
    config = setup.config
    interval = max(1, int(config.loss.r1_interval))

    def loss_fn(disc_params):
        real_logits, _ = _disc_train(setup, disc_params, fake.sn_real, rgb, hsi)
        fake_logits, sn = _disc_train(setup, disc_params, state.disc_spectral_norm, rgb, fake.hsi)
        adv = losses.discriminator_sinkhorn_loss(real_logits, fake_logits, config.sinkhorn)
        penalty = jnp.zeros((), jnp.float32)
        if r1:

            def logits_fn(rgb_in, h):
                return _disc_train(setup, disc_params, sn, rgb_in, h, for_r1=True)

            penalty, sn = losses.chunked_r1_penalty(
                logits_fn, rgb, hsi, config.loss.r1_gamma, chunks=config.loss.r1_chunks
            )
            penalty = penalty.astype(jnp.float32)
        # Lazy regularisation: applied every `interval` updates, scaled by the interval.
        total = adv + interval * penalty
        return total, ({"disc_sinkhorn": adv, "r1": penalty}, sn)

    (loss, (terms, new_sn)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.disc_params)
    grad_norm = optax.tree.norm(grads)
    finite = _finite_update(loss, grad_norm)
    updates, new_opt = setup.tx_d.update(grads, state.opt_state_d, state.disc_params)
    updates = jax.tree.map(lambda u: state.lr_scale * u, updates)
    new_params = optax.apply_updates(state.disc_params, updates)
    state = state.replace(
        disc_params=_tree_select(finite, new_params, state.disc_params),
        opt_state_d=_tree_select(finite, new_opt, state.opt_state_d),
        disc_spectral_norm=_tree_select(finite, new_sn, state.disc_spectral_norm),
        disc_updates=state.disc_updates + finite.astype(jnp.int32),
    )
    out = {
        "disc_loss": loss,
        "disc_grad_norm": grad_norm,
        "disc_skipped": (~finite).astype(jnp.int32),
        **terms,
    }
    return state, out


def discriminator_step(
    setup: Setup,
    state: TrainState,
    batch: Mapping[str, jax.Array],
    fake: FakeBatch,
    kind: StepKind = PLAIN_STEP,
):
    """The discriminator update of `train_step` on the last micro-batch: zeros for its metrics
    when `kind.discriminator` is off (the same metric keys in every program)."""
    if not setup.use_disc:
        return state, {}
    if kind.discriminator:
        rgb, hsi = batch["rgb"][-1], batch["hsi"][-1]
        new_state, d_out = _discriminator_update(setup, state, fake, rgb, hsi, kind.r1)
    else:
        keys = ("disc_loss", "disc_grad_norm", "disc_skipped", "disc_sinkhorn", "r1")
        new_state, d_out = state, {k: jnp.zeros((), jnp.float32) for k in keys}
    d_out["lr_d"] = state.lr_scale * setup.sched_d(state.disc_updates)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), d_out)


# -- one training step ------------------------------------------------------------------------


def train_step(
    setup: Setup,
    state: TrainState,
    batch: Mapping[str, jax.Array],
    kind: StepKind = PLAIN_STEP,
):
    """One generator update and, as `kind` says, a discriminator update with or without R1.
    Pure; `setup` and `kind` are static (`kind = step_kind(config, loop_step)`).

    Args:
      setup: `make_setup(config)`.
      state: the TrainState.
      batch: `rgb: [A, B, P, P, 3]`, `hsi: [A, B, P, P, 31]` float32, A micro-batches.
      kind: the step's `StepKind`.
    Returns:
      (new_state, metrics) with float32 scalar metrics.
    """
    state, out, fake = generator_step(setup, state, batch)
    state, d_out = discriminator_step(setup, state, batch, fake, kind)
    out = dict(out, **d_out)
    # A step counts as non-finite when either network's update was skipped.
    skipped = out["gen_skipped"] > 0
    if "disc_skipped" in out:
        skipped = skipped | (out["disc_skipped"] > 0)
    streak = jnp.where(skipped, state.nonfinite_streak + 1, 0)
    state = state.replace(
        nonfinite_streak=streak,
        nonfinite_peak=jnp.maximum(state.nonfinite_peak, streak),
        nonfinite_total=state.nonfinite_total + skipped.astype(jnp.int32),
    )
    out["nonfinite_total"] = state.nonfinite_total
    return state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)


def make_train_step(
    setup: Setup,
    state_sharding,
    batch_sharding,
    metric_sharding,
    donate=True,
    kind: StepKind = PLAIN_STEP,
):
    """`train_step(setup, ., ., kind)` jitted with explicit shardings (the state donated unless
    `donate=False`)."""
    return jax.jit(
        functools.partial(train_step, setup, kind=StepKind(*kind)),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metric_sharding),
        donate_argnums=(0,) if donate else (),
    )


def predict(setup: Setup, params, rgb: jax.Array) -> jax.Array:
    """`rgb: [B, H, W, 3]` -> `[B, H, W, 31]` with the float32 eval-mode generator."""
    return setup.eval_gen.apply({"params": params}, rgb, train=False)
