"""Tests for cswin_jax/schedule.py: step kinds and learning-rate schedules."""

import numpy as np

from cswin_jax import schedule
from tests.train_setup import tiny_config


def test_step_kind_schedule():
    """The discriminator updates on every n_critic-th loop step, R1 on every
    r1_interval-th of those updates; the loop compiles one program per kind it meets."""
    config = tiny_config()
    config.loss.r1_interval = 4
    steps = range(17)
    kinds = [schedule.step_kind(config, s) for s in steps]
    assert all(k.discriminator for k in kinds)
    assert [s for s, k in zip(steps, kinds, strict=True) if k.r1] == [0, 4, 8, 12, 16]
    assert schedule.step_kinds(config, 0, 100) == [(True, False), (True, True)]
    assert schedule.step_kinds(config, 0, 1) == [(True, True)]
    assert schedule.step_kinds(config, 5, 7) == [(True, False)]
    config.n_critic = 2
    kinds = [schedule.step_kind(config, s) for s in steps]
    assert [s for s, k in zip(steps, kinds, strict=True) if k.discriminator] == list(steps[::2])
    assert [s for s, k in zip(steps, kinds, strict=True) if k.r1] == [0, 8, 16]
    assert schedule.step_kinds(config, 0, 100) == [(False, False), (True, False), (True, True)]
    config.loss.use_r1 = False
    assert schedule.step_kinds(config, 0, 100) == [(False, False), (True, False)]
    config.train_discriminator = False
    assert schedule.step_kinds(config, 0, 100) == [(False, False)]


def test_lr_schedule_warmup_and_floor():
    sched = schedule.lr_schedule(2e-4, warmup=2000, horizon=10_000, end_lr=1e-6)
    # float32 schedule arithmetic: rtol 1e-5.
    np.testing.assert_allclose(sched(0), 2e-4 * 2 / 2001, rtol=1e-5)
    np.testing.assert_allclose(sched(2000), 2e-4, rtol=1e-5)
    np.testing.assert_allclose(sched(10_000), 1e-6, rtol=1e-4)
    np.testing.assert_allclose(sched(50_000), 1e-6, rtol=1e-4)  # horizon clipped
