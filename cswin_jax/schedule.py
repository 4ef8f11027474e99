"""The run's schedule: which kind of step runs at each loop step, the run's length, and the
learning-rate schedules and optimizers of both networks.

The loop counts its steps (batches consumed; they number the checkpoints), the training
state counts the updates applied (`TrainState.gen_updates`, lower after a skipped non-finite
step); the step kinds follow the loop's count, the learning rates the updates'.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
import optax


class StepKind(NamedTuple):
    """What one training step runs besides the generator update (a static program choice)."""

    discriminator: bool  # updates the discriminator
    r1: bool  # adds the lazy R1 penalty to that update


PLAIN_STEP = StepKind(True, False)  # a discriminator update without R1: most steps of a GAN run


def step_kind(config: ml_collections.ConfigDict, step: int) -> StepKind:
    """The kind of loop step `step` (0-based: the batches consumed before it).

    The discriminator updates on every `n_critic`-th loop step (0, n, 2n, ...); R1 joins on
    every `loss.r1_interval`-th of those updates, counted from the first. Both count loop
    steps, which the host knows and a checkpoint records, so the schedule needs no device
    value and resumes exactly; a step whose update was skipped as non-finite keeps its place
    in it.
    """
    if not config.train_discriminator:
        return StepKind(False, False)
    n_critic = max(1, int(config.n_critic))
    if step % n_critic:
        return StepKind(False, False)
    interval = max(1, int(config.loss.r1_interval))
    return StepKind(True, bool(config.loss.use_r1) and (step // n_critic) % interval == 0)


def step_kinds(config: ml_collections.ConfigDict, start: int, stop: int) -> list[StepKind]:
    """The distinct kinds of loop steps `start`..`stop - 1` (one schedule period at most)."""
    period = max(1, int(config.n_critic)) * max(1, int(config.loss.r1_interval))
    kinds = {step_kind(config, s) for s in range(start, min(stop, start + period))}
    return sorted(kinds)


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Training length in generator optimizer steps."""
    if config.optim.total_steps:
        return int(config.optim.total_steps)
    return int(config.epochs * config.iterations_per_epoch)


def lr_schedule(peak_lr: float, warmup: int, horizon: int, end_lr: float) -> optax.Schedule:
    """Linear warmup then cosine to the absolute floor `end_lr`, in optimizer steps.

    The warmup starts at 2/(warmup+1) of the peak, the original's first-step factor.
    """
    horizon = max(horizon, warmup + 1)
    if warmup <= 0:
        return optax.cosine_decay_schedule(peak_lr, horizon, alpha=end_lr / peak_lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr * 2.0 / (warmup + 1),
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=horizon,
        end_value=end_lr,
    )


def make_optimizer(lr: float, config: ml_collections.ConfigDict, horizon: int):
    schedule = lr_schedule(lr, config.optim.warmup_steps, horizon, config.optim.end_lr)
    clip_norm = config.optim.grad_clip_norm
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adam(schedule, b1=config.optim.b1, b2=config.optim.b2, eps=1e-8),
    )
    return tx, schedule
