"""Tests for cswin_jax/checkpoint.py: weights-only files, training state, damaged steps."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cswin_jax import checkpoint as ckpt_lib


def _weights():
    gen = {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    disc = {
        "params": {"conv": {"kernel": np.ones((3, 2), np.float32)}},
        "spectral_norm": {"conv": {"u": np.full((2,), 0.5, np.float32)}},
    }
    return gen, disc


def test_weights_only_round_trip(tmp_path):
    gen, disc = _weights()
    ckpt_lib.save_model_checkpoint(
        tmp_path / "w",
        generator_params=gen,
        discriminator_variables=disc,
        config={"model": {"a": 1}},
    )
    gen2, disc2, config = ckpt_lib.restore_model_variables(tmp_path / "w")
    np.testing.assert_array_equal(gen2["conv"]["kernel"], gen["conv"]["kernel"])
    np.testing.assert_array_equal(disc2["spectral_norm"]["conv"]["u"], 0.5)
    assert config == {"model": {"a": 1}}


def test_missing_and_foreign_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_lib.restore_model_variables(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        ckpt_lib.restore_model_variables(tmp_path / "foreign")


def _state(value):
    return {
        "gen_params": {"w": jnp.full((3,), value, jnp.float32)},
        "ema_params": {"w": jnp.full((3,), value / 2, jnp.float32)},
        "step": jnp.asarray(int(value), jnp.int32),
    }


def test_training_state_resume_and_damaged_step_fallback(tmp_path):
    ckpt = ckpt_lib.TrainCheckpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)), {"model": {}}, force=True)
    ckpt.save_best(2, {"generator": {"params": {"w": np.zeros(3, np.float32)}}}, {}, mrae=0.25)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert ckpt.best_metric() == pytest.approx(0.25)
    abstract = jax.eval_shape(lambda: _state(0.0))
    state, step = ckpt.restore(abstract)
    assert step == 3 and float(state["gen_params"]["w"][0]) == 3.0

    # A finalized step that lost its array files: restore falls back to step 2.
    for path in (tmp_path / "train" / "3" / "state").rglob("*"):
        if path.is_dir() and path.name in ("d", "ocdbt.process_0"):
            shutil.rmtree(path)
    state, step = ckpt.restore(abstract)
    assert step == 2 and float(state["gen_params"]["w"][0]) == 2.0
    ckpt.close()

    # Reading a training root for evaluation prefers the best model's weights.
    gen, _, _ = ckpt_lib.restore_model_variables(tmp_path)
    np.testing.assert_array_equal(gen["w"], 0.0)
    gen, _, _ = ckpt_lib.restore_model_variables(tmp_path / "train", use_ema=True)
    assert float(gen["w"][0]) in (1.0, 1.5)  # newest readable EMA entry


def test_half_written_step_is_ignored(tmp_path):
    ckpt = ckpt_lib.TrainCheckpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1.0), {}, force=True)
    ckpt.wait()
    ckpt.close()
    # What an interrupted asynchronous save leaves behind.
    (tmp_path / "train" / "2.orbax-checkpoint-tmp").mkdir()
    ckpt = ckpt_lib.TrainCheckpointer(tmp_path, keep=3)
    assert ckpt.latest_step() == 1
    state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 1
    ckpt.close()
