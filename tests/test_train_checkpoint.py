"""Tests for cswin_jax/train_checkpoint.py: a run's state saved and resumed, damaged and
half-written steps, full disks, states written by older versions."""

import contextlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cswin_jax import checkpoint as ckpt_lib
from cswin_jax import cli, train
from cswin_jax.train_checkpoint import (
    ADDED_STATE_FIELDS,
    RENAMED_STATE_FIELDS,
    TrainCheckpointer,
)


def _state(value):
    return {
        "gen_params": {"w": jnp.full((3,), value, jnp.float32)},
        "ema_params": {"w": jnp.full((3,), value / 2, jnp.float32)},
        "step": jnp.asarray(int(value), jnp.int32),
    }


def test_training_state_resume_and_damaged_step_fallback(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, keep=3)
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


def test_a_damaged_config_makes_the_whole_step_fall_back(tmp_path, caplog):
    """Config and state come from the same newest readable step: a damaged config item in
    step 3 makes the resume use step 2 (warning names step 3); step 3 is moved aside, not
    deleted, and the resumed run can save step 3 again."""
    ckpt = TrainCheckpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)), {"model": {"width": step}}, force=True)
    ckpt.wait()
    files = [p for p in (tmp_path / "train" / "3" / "config").rglob("*") if p.is_file()]
    assert files
    for path in files:
        path.write_text("{not json")
    assert ckpt.restore_config() == {"model": {"width": 2}}
    with caplog.at_level("WARNING"):
        state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 2 and float(state["gen_params"]["w"][0]) == 2.0
    assert any("checkpoint step 3" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "damaged" / "3" / "config").is_dir()
    assert ckpt.latest_step() == 2
    ckpt.save(3, _state(3.5), {"model": {"width": 3}}, force=True)
    ckpt.wait()
    assert ckpt.restore_config() == {"model": {"width": 3}}
    ckpt.close()


def test_half_written_step_is_ignored(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1.0), {}, force=True)
    ckpt.wait()
    ckpt.close()
    # What an interrupted asynchronous save leaves behind.
    (tmp_path / "train" / "2.orbax-checkpoint-tmp").mkdir()
    ckpt = TrainCheckpointer(tmp_path, keep=3)
    assert ckpt.latest_step() == 1
    state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 1
    ckpt.close()


_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "...": Failed to '
    "write 470220 bytes to file 4: No space left on device [os_error_code='28']"
)  # what tensorstore raised for a full tmpfs (orbax 0.12, measured)


def _big_state(value):
    state = _state(value)
    rng = np.random.default_rng(0)  # random bits: the checkpoint's compression cannot shrink it
    state["gen_params"]["w"] = rng.random(100_000).astype(np.float32) + value
    return state


def test_disk_full_on_save_is_one_line_and_keeps_earlier_steps(tmp_path, monkeypatch):
    ckpt = TrainCheckpointer(tmp_path, keep=3)

    def full(*args, **kwargs):
        raise ValueError(_TENSORSTORE_ENOSPC)

    def fail():
        monkeypatch.setattr(ckpt._train, "save", full)
        ckpt.save(2, _big_state(2.0), {"model": {}}, force=True)

    # Step 1 is the small state; the abstract state of restore must match it.
    ckpt.save(1, _state(1.0), {"model": {}}, force=True)
    ckpt.wait()
    with pytest.raises(cli.UserError, match=r"No space left on device; a checkpoint needs about"):
        fail()
    monkeypatch.undo()
    state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 1
    ckpt.close()


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """The same on a 300 KB tmpfs (needs mount permission; skipped where there is none): the
    asynchronous writer's error surfaces at wait() as the one-line UserError."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        # Mounting needs root (CAP_SYS_ADMIN); the injected ENOSPC test above covers the same
        # error path without it.
        reason = " ".join(done.stderr.decode(errors="replace").split()) or "no permission"
        pytest.skip(
            f"mounting a 300 KB tmpfs for a real full disk needs root and failed ({reason}); "
            "test_disk_full_on_save_is_one_line_and_keeps_earlier_steps covers the same error "
            "path with an injected ENOSPC"
        )
    try:
        ckpt = TrainCheckpointer(mount / "ckpt", keep=3)
        ckpt.save(1, _state(1.0), {"model": {}}, force=True)
        ckpt.wait()
        with pytest.raises(cli.UserError, match=r"No space left on device.*step 1 is intact"):
            ckpt.save(2, _big_state(2.0), {"model": {}}, force=True)
            ckpt.wait()
        state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
        assert step == 1
        with contextlib.suppress(cli.UserError):
            ckpt.close()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_state_saved_under_the_old_counter_names_resumes(tmp_path):
    """A training state written when its counters were `step` / `disc_step` and before it had
    `lr_scale` / `rollbacks` restores into today's TrainState (`gen_updates` /
    `disc_updates`; the added fields at their defaults), every other field as saved."""
    zero = np.zeros((), np.int32)
    current = train.TrainState(
        gen_updates=zero,
        disc_updates=zero,
        gen_params={"w": np.arange(3, dtype=np.float32)},
        ema_params={"w": np.ones(3, np.float32)},
        opt_state_g={"mu": np.full(3, 0.5, np.float32)},
        disc_params=None,
        disc_spectral_norm=None,
        opt_state_d=None,
        rng=np.arange(2, dtype=np.uint32),
        nonfinite_streak=zero,
        nonfinite_peak=np.int32(2),
        nonfinite_total=np.int32(4),
        lr_scale=np.float32(0.25),
        rollbacks=np.int32(2),
    )
    fields = {name: getattr(current, name) for name in current.__dataclass_fields__}
    legacy = {
        {new: old for old, new in RENAMED_STATE_FIELDS.items()}.get(k, k): v
        for k, v in fields.items()
    }
    legacy["step"], legacy["disc_step"] = np.int32(7), np.int32(3)
    for name in ADDED_STATE_FIELDS:
        del legacy[name]
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    ckpt.save(5, legacy, {"model": {}}, force=True)
    ckpt.wait()
    state, step = ckpt.restore(jax.eval_shape(lambda: current))
    assert step == 5 and isinstance(state, train.TrainState)
    assert int(state.gen_updates) == 7 and int(state.disc_updates) == 3
    np.testing.assert_array_equal(state.opt_state_g["mu"], current.opt_state_g["mu"])
    assert int(state.nonfinite_total) == 4 and state.disc_params is None
    assert float(state.lr_scale) == 1.0 and int(state.rollbacks) == 0
    # Written again, it is in today's names and restores as it is.
    ckpt.save(6, state, {"model": {}}, force=True)
    ckpt.wait()
    again, step = ckpt.restore(jax.eval_shape(lambda: current))
    assert step == 6 and int(again.gen_updates) == 7
    ckpt.close()
