"""Tests for the generator-only recipe (configs/optimized.py) and gradient accumulation.

Slow (whole training steps compiled); runs beside test_train.py on the second xdist worker.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cswin_jax import train
from tests import train_setup
from tests.train_setup import make_batch, tiny_config


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    train_setup.release_compiled_programs()


@pytest.mark.slow
def test_generator_only_recipe_step():
    """configs/optimized.py: no discriminator, Charbonnier only."""
    from configs import optimized

    config = optimized.get_config()
    tiny = tiny_config()
    config.model = tiny.model
    config.data.patch_size = 16
    config.batch_size = 2
    config.model.remat = "block"
    config.gradient_accumulation_steps = 2
    setup = train.make_setup(config)
    state = jax.jit(functools.partial(train.init_state, setup))(jax.random.key(0))
    assert state.disc_params is None
    batch = make_batch(config)
    batch["rgb"][1], batch["hsi"][1] = batch["rgb"][0], batch["hsi"][0]
    step = jax.jit(functools.partial(train.train_step, setup))
    new_state, m = step(state, batch)
    assert np.isfinite(m["gen_loss"]) and "disc_loss" not in m
    assert int(new_state.gen_updates) == 1
    assert jnp.abs(m["gen_loss"] - m["reconstruction"]) < 1e-6
    # Two identical micro-batches: the accumulated mean equals one micro-batch's loss.
    single = {k: v[:1] for k, v in batch.items()}
    _, m1 = step(state, single)
    np.testing.assert_allclose(float(m["gen_loss"]), float(m1["gen_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["gen_grad_norm"]), float(m1["gen_grad_norm"]), rtol=1e-4)
