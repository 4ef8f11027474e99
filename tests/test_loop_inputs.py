"""Tests for what `cswin_jax.loop` is given before it trains: the config keys the compiled
programs ignore, a workdir holding another architecture, `init_from` weights, a mistyped key.

Nothing here compiles a training step (toy states and `jax.eval_shape`); the loop's own runs
are in test_train.py.
"""

import functools
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from cswin_jax import checkpoint as ckpt_lib
from cswin_jax import loop, programs, sharding, train
from cswin_jax.train_checkpoint import TrainCheckpointer
from tests.train_setup import make_batch, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_host_only_keys_do_not_reach_the_step():
    """The keys `programs.compiled_programs` leaves out of its memo key are never read by the
    step: with them deleted (and config.data cut to the keys that shape the programs) the
    setup still builds and traces its initialiser and train step."""
    config = tiny_config()
    for key in programs.HOST_ONLY_KEYS:
        del config[key]
    data = config.data
    for key in list(data.keys()):
        if key not in programs.PROGRAM_DATA_KEYS:
            del data[key]
    setup = train.make_setup(config)
    state = jax.eval_shape(functools.partial(train.init_state, setup), jax.random.key(0))
    batch = jax.eval_shape(lambda: jax.tree.map(jax.numpy.asarray, make_batch(config, 0)))
    new_state, _ = jax.eval_shape(functools.partial(train.train_step, setup), state, batch)
    assert int(new_state.gen_updates.size) == 1
    # And the memo key does ignore them.
    changed = tiny_config()
    changed.log_every, changed.max_consecutive_nonfinite = 1, 3
    changed.data.memory_mode = "lazy"
    mesh = sharding.make_mesh()
    assert programs._programs_key(changed, mesh) == programs._programs_key(tiny_config(), mesh)
    changed.ema_decay = 0.5
    assert programs._programs_key(changed, mesh) != programs._programs_key(tiny_config(), mesh)


def _toy_state():
    """A TrainState of toy trees: what the checkpoint helpers below need, nothing compiled."""
    zero = np.zeros((), np.int32)
    gen = {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    return train.TrainState(
        gen_updates=zero,
        disc_updates=zero,
        gen_params=gen,
        ema_params=gen,
        opt_state_g={},
        disc_params={"head": {"kernel": np.ones(4, np.float32)}},
        disc_spectral_norm={"head": {"u": np.ones(2, np.float32)}},
        opt_state_d={},
        rng=np.zeros(2, np.uint32),
        nonfinite_streak=zero,
        nonfinite_peak=zero,
        nonfinite_total=zero,
        lr_scale=np.float32(1.0),
        rollbacks=zero,
    )


def test_checkpoints_of_another_architecture_refused_or_moved_aside(tmp_path):
    root = tmp_path / "checkpoints"
    other = tiny_config()
    other.model.base_channels = 32
    saver = TrainCheckpointer(root, keep=2)
    saver.save(3, _toy_state(), other.to_dict())
    saver.wait()
    saver.close()

    config = tiny_config()
    with pytest.raises(ValueError, match="another architecture.*init_from=PATH"):
        loop._open_checkpointer(root, config, config.to_dict())
    assert (root / "train" / "3").is_dir()  # refused: nothing touched

    # Same architecture: resumed, init_from ignored.
    other.init_from = "/somewhere/converted"
    checkpointer, latest = loop._open_checkpointer(root, other, other.to_dict())
    checkpointer.close()
    assert latest == 3

    # Another architecture with init_from: moved aside (kept), a fresh run starts.
    config.init_from = "/somewhere/converted"
    checkpointer, latest = loop._open_checkpointer(root, config, config.to_dict())
    assert latest is None and checkpointer.latest_step() is None
    checkpointer.close()
    assert (tmp_path / "checkpoints.replaced-1" / "train" / "3").is_dir()


def test_init_from_loads_weights_and_checks_shapes(tmp_path):
    state = _toy_state()
    trained = jax.tree.map(lambda x: x + 1.5, state.gen_params)
    disc = {
        "params": jax.tree.map(lambda x: 2 * x, state.disc_params),
        "spectral_norm": jax.tree.map(lambda x: 3 * x, state.disc_spectral_norm),
    }
    path = ckpt_lib.save_model_checkpoint(
        tmp_path / "converted",
        generator_params=trained,
        discriminator_variables=disc,
        config=tiny_config().to_dict(),
    )
    repl = sharding.replicated(sharding.make_mesh())
    model_cfg = tiny_config().model
    loaded = loop._load_initial_weights(
        state, str(path), jax.tree.map(lambda _: repl, state), model_cfg
    )
    for got, want in (
        (loaded.gen_params, trained),
        (loaded.ema_params, trained),  # EMA starts at the loaded weights
        (loaded.disc_params, disc["params"]),
        (loaded.disc_spectral_norm, disc["spectral_norm"]),
    ):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    assert int(loaded.gen_updates) == 0  # weights only: optimizer, step and RNG stay fresh

    wrong = state.replace(gen_params={"conv": {"kernel": np.zeros((3, 2), np.float32)}})
    misfit = r"init_from=.*generator weights do not fit.*: conv/kernel \(2, 3\) vs \(3, 2\)$"
    with pytest.raises(ValueError, match=misfit):
        loop._load_initial_weights(wrong, str(path), jax.tree.map(lambda _: repl, state), model_cfg)


def test_unknown_config_key_fails_loudly(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cswin_jax.main",
            "--config=configs/quickstart.py",
            f"--workdir={tmp_path}",
            "--config.batch_sizee=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "batch_sizee" in out.stderr + out.stdout
