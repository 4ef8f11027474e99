"""Tests for cswin_jax/divergence.py: when the guard rolls back, and what it rolls back to."""

import logging
import math
import re

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from cswin_jax import divergence, train
from cswin_jax.train_checkpoint import TrainCheckpointer


def _state(w: float, lr_scale: float = 1.0, rollbacks: int = 0) -> train.TrainState:
    zero = np.zeros((), np.int32)
    return train.TrainState(
        gen_updates=np.int32(w),
        disc_updates=zero,
        gen_params={"w": np.full(3, w, np.float32)},
        ema_params={"w": np.full(3, w, np.float32)},
        opt_state_g={"mu": np.full(3, w, np.float32)},
        disc_params=None,
        disc_spectral_norm=None,
        opt_state_d=None,
        rng=np.zeros(2, np.uint32),
        nonfinite_streak=zero,
        nonfinite_peak=zero,
        nonfinite_total=zero,
        lr_scale=np.float32(lr_scale),
        rollbacks=np.int32(rollbacks),
    )


def _guard(**kw):
    return ConfigDict(dict(enabled=True, mrae_factor=1.5, lr_factor=0.5, max_rollbacks=2, **kw))


def test_diverged():
    assert divergence.diverged(float("nan"), 0.3, 1.5)
    assert divergence.diverged(math.inf, math.inf, 1.5)  # even before any best
    assert divergence.diverged(0.46, 0.3, 1.5)
    assert not divergence.diverged(0.44, 0.3, 1.5)
    assert not divergence.diverged(5.0, math.inf, 1.5)  # no best yet: nothing to compare


def test_roll_back_to_the_best_state_then_no_more(tmp_path, caplog):
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    abstract = jax.eval_shape(lambda: _state(0.0))
    with caplog.at_level(logging.WARNING, logger="absl"):
        # No best model yet: nothing to roll back to, training goes on.
        now = _state(5.0)
        kept = divergence.roll_back(
            now, ckpt, abstract, _guard(), step=8, mrae=float("nan"), best_mrae=math.inf
        )
        assert kept is now and "no best model saved with its training state" in caplog.text
        ckpt.save_best(2, {"generator": {"params": {"w": np.ones(3)}}}, {}, 0.3, state=_state(1.0))
        back = divergence.roll_back(
            _state(5.0, 0.5, 1), ckpt, abstract, _guard(), step=8, mrae=0.9, best_mrae=0.3
        )
        assert (
            "step 8: validation MRAE 0.9 is above 1.5 x the best (0.3): rolled back to the "
            "state of step 2, learning rates x 0.25 (rollback 2 of 2)" in caplog.text
        )
        np.testing.assert_array_equal(back.gen_params["w"], np.ones(3))
        np.testing.assert_array_equal(back.opt_state_g["mu"], np.ones(3))
        assert int(back.gen_updates) == 1
        assert float(back.lr_scale) == 0.25 and int(back.rollbacks) == 2
        # The last rollback is spent: the state stays, with a warning.
        assert (
            divergence.roll_back(back, ckpt, abstract, _guard(), step=9, mrae=0.9, best_mrae=0.3)
            is back
        )
        assert "no rollback left (divergence_guard.max_rollbacks=2)" in caplog.text
    ckpt.close()


def test_best_model_saved_without_its_state_is_not_a_rollback_target(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    ckpt.save_best(2, {"generator": {"params": {"w": np.ones(3)}}}, {}, 0.3)
    assert ckpt.restore_best_state(jax.eval_shape(lambda: _state(0.0))) is None
    ckpt.close()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("mrae_factor", 0.9, "divergence_guard.mrae_factor: must be >= 1"),
        ("lr_factor", 0.0, "divergence_guard.lr_factor: must be in (0, 1], got 0.0"),
        ("max_rollbacks", -1, "divergence_guard.max_rollbacks: must be >= 0, got -1"),
    ],
)
def test_guard_settings_are_checked(key, value, message):
    from configs import base
    from cswin_jax import config_checks

    config = base.get_config()
    config.divergence_guard[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        config_checks.validate_config(config, num_devices=1)
