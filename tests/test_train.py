"""Tests for cswin_jax/train.py and loop.py that run training steps, in three sections: the GAN
step on 1 and 8 devices; several processes; the loop (resume, signals, non-finite steps, the
divergence guard). What the loop is given (weights, configs) is in test_loop_inputs.py, the
config value checks in test_configs.py. The three sections stay in one file because they share
compiled programs (below), which a split across pytest-xdist workers would compile twice.

The slow tests here compile whole GAN steps (minutes each on 2 CPU cores, almost all XLA
compile time). The README's test command (`--dist loadfile`, `tests/conftest.py` ordering)
runs this file on one pytest-xdist worker and `test_train_recipes.py` on the other. Programs
compiled here are reused, not reloaded (on CPU a persistent-cache load costs about as much as
a compile): the one-device step of the `one_device_run` fixture serves the non-finite and
two-process tests, and the training-loop tests reuse the 8-device test's step, which comes
from `programs.compiled_programs` (it keeps the newest config's programs for the process).
`-m 'not slow'` skips them all.
"""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cswin_jax import checkpoint as ckpt_lib
from cswin_jax import loop, programs, schedule, sharding
from cswin_jax.train_checkpoint import TrainCheckpointer
from tests import train_setup
from tests.train_setup import make_batch, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    train_setup.release_compiled_programs()


@pytest.fixture(scope="module", autouse=True)
def _drop_loop_programs():
    yield
    programs.clear_compiled_programs()


@pytest.fixture(scope="module")
def tiny_setup():
    return train_setup.tiny_setup()


@pytest.fixture(scope="module")
def one_device_run(tiny_setup):
    return train_setup.one_device_run(tiny_setup)


# --- the train step: one and eight devices, skipped steps, schedules --------------------------


@SLOW
def test_gan_step_updates_both_networks(one_device_run):
    state0, state, history, _, _, _ = one_device_run
    assert int(state.gen_updates) == 2
    assert int(state.disc_updates) == 2  # n_critic = 1: one D step per G step
    for m in history:
        for key in ("gen_loss", "disc_loss", "gen_grad_norm", "disc_grad_norm", "lr_g", "lr_d"):
            assert np.isfinite(m[key]), key
        assert m["gen_skipped"] == 0 and m["disc_skipped"] == 0
    # R1 fires on discriminator steps 0, 2, ... (r1_interval = 2).
    assert history[0]["r1"] > 0 and history[1]["r1"] == 0
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), state0.gen_params, state.gen_params
    )
    assert all(jax.tree.leaves(changed))
    assert not np.array_equal(
        jax.tree.leaves(state0.disc_params)[0], jax.tree.leaves(state.disc_params)[0]
    )
    # EMA moved by (1 - decay) of the way, not all the way.
    leaf0, leaf, ema = (
        jax.tree.leaves(t)[0] for t in (state0.gen_params, state.gen_params, state.ema_params)
    )
    assert np.abs(ema - leaf0).max() < np.abs(leaf - leaf0).max()
    # Spectral-norm state advanced.
    assert not np.array_equal(
        jax.tree.leaves(state0.disc_spectral_norm)[0], jax.tree.leaves(state.disc_spectral_norm)[0]
    )


@SLOW
def test_eight_devices_match_one_device(tiny_setup, one_device_run):
    """Data parallel over 8 virtual CPU devices equals the single-device step (fp32 tolerance:
    only the order of the cross-device gradient sums differs)."""
    _, ref_state, ref_history, _, _, _ = one_device_run
    assert len(jax.devices()) == 8
    # The training loop's own programs (compiled ahead of time, state donated): the loop
    # tests below find them in `programs.compiled_programs` and compile nothing.
    compiled = programs.compiled_programs(tiny_config(), sharding.make_mesh())
    state = compiled.init_fn(jax.random.key(0))
    for seed in (0, 1):
        batch = jax.device_put(make_batch(tiny_setup.config, seed), compiled.batch_sharding)
        state, m = compiled.step_fns[schedule.step_kind(compiled.setup.config, seed)](state, batch)
    state = jax.device_get(state)
    np.testing.assert_allclose(m["gen_loss"], ref_history[1]["gen_loss"], rtol=1e-4)
    # Parameters after two Adam steps: Adam divides each gradient by its own running RMS, so
    # for an element whose gradient is near zero the rounding of the cross-device sum moves
    # the step by a visible fraction of the learning rate (measured: 2.3e-6 = 0.23% of lr_g on
    # one element of a 16-element leaf, batch 8, A = 1). Hence an absolute tolerance of 1% of
    # lr_g; the loss and gradient norms are compared at 1e-4 relative below.
    lr_g = tiny_setup.config.optim.generator_lr
    for a, b in zip(
        jax.tree.leaves(state.gen_params), jax.tree.leaves(ref_state.gen_params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.01 * lr_g)
    # The discriminator's output bias is the exception. The Sinkhorn divergence with the
    # squared-Euclidean cost does not change when real and fake move together, so its
    # gradient is zero up to rounding (only the joint rescale and the clamp break the
    # symmetry). Adam divides that rounding noise by its own root-mean-square, turning it into
    # a step of up to lr_d. That leaf is therefore compared to within two such steps.
    lr_d = tiny_setup.config.optim.discriminator_lr
    disc = jax.tree_util.tree_flatten_with_path(state.disc_params)[0]
    for (path, a), b in zip(disc, jax.tree.leaves(ref_state.disc_params), strict=True):
        name = jax.tree_util.keystr(path)
        atol = 2 * lr_d if name == "['output_proj_2']['bias']" else 2e-6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=name)
    # Quantities before Adam's normalisation agree to float32 rounding.
    # (disc_loss is a difference of Sinkhorn terms of nearly equal clouds, -3.6e-5 here: its
    # rounding is absolute, at the terms' scale, hence the atol.)
    for key in ("gen_loss", "disc_loss", "gen_grad_norm", "disc_grad_norm", "r1"):
        np.testing.assert_allclose(m[key], ref_history[1][key], rtol=1e-4, atol=1e-6, err_msg=key)


@SLOW
def test_non_finite_batch_is_skipped(tiny_setup, one_device_run):
    _, state, _, steps, data, live_state = one_device_run
    batch = make_batch(tiny_setup.config, 5)
    batch["rgb"][0, 0, 0, 0, 0] = np.nan
    # The live device state: the compiled step takes arrays with its own shardings. Loop
    # step 2 is an R1 step (r1_interval = 2).
    step = steps[schedule.step_kind(tiny_setup.config, 2)]
    assert schedule.step_kind(tiny_setup.config, 2).r1
    new_state, m = step(live_state, jax.device_put(batch, data))
    new_state = jax.device_get(new_state)
    assert m["gen_skipped"] == 1
    assert int(new_state.gen_updates) == int(state.gen_updates)
    assert int(new_state.nonfinite_streak) == 1 and int(new_state.nonfinite_total) == 1
    for a, b in zip(
        jax.tree.leaves(new_state.gen_params), jax.tree.leaves(state.gen_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(new_state.ema_params), jax.tree.leaves(state.ema_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@SLOW
def test_lr_scale_scales_both_updates(tiny_setup, one_device_run):
    """`TrainState.lr_scale` (what the divergence guard lowers) multiplies both networks'
    updates: at 0 neither network moves, and the logged learning rates are 0."""
    _, _, _, steps, data, live_state = one_device_run
    batch = jax.device_put(make_batch(tiny_setup.config, 6), data)
    frozen = live_state.replace(lr_scale=jax.numpy.zeros_like(live_state.lr_scale))
    new_state, m = steps[schedule.PLAIN_STEP](frozen, batch)
    assert float(m["lr_g"]) == 0.0 and float(m["lr_d"]) == 0.0
    assert int(new_state.gen_updates) == int(live_state.gen_updates) + 1
    for name in ("gen_params", "disc_params"):
        for a, b in zip(
            jax.tree.leaves(getattr(new_state, name)),
            jax.tree.leaves(getattr(live_state, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)


# --- several processes: agreement, preemption, clean exits ------------------------------------


_TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax
    # Generous start-up and shutdown barriers: on a slow 2-core CPU the two processes
    # compile the step side by side and can reach shutdown minutes apart (300 s default).
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]), initialization_timeout=1800,
                               shutdown_timeout_seconds=1800)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[3])
    from tests import train_setup
    from tests.train_setup import tiny_config, make_batch
    import functools
    from cswin_jax import schedule, sharding, train
    config = tiny_config()
    setup = train.make_setup(config)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    init = functools.partial(train.init_state, setup)
    shape = jax.eval_shape(init, jax.random.key(0))
    sh = jax.tree.map(lambda _: repl, shape)
    init = jax.jit(init, out_shardings=sh).lower(jax.random.key(0)).compile()
    half = config.batch_size // 2
    pid = jax.process_index()
    batches = []
    for seed in (0, 1):
        full = make_batch(config, seed)
        local = {k: v[:, pid * half:(pid + 1) * half] for k, v in full.items()}
        batches.append(
            {k: jax.make_array_from_process_local_data(data, v) for k, v in local.items()})
    # Compile, then meet at a coordination-service barrier before the first collective, as
    # the training loop does (gloo gives a late peer 30 s; one process may compile slower).
    steps = train_setup.compiled_steps(setup, jax.devices(), shape, batches[0])
    sharding.wait_for_all_processes("two_process_test_compiled")
    state = init(jax.random.key(0))
    for i, batch in enumerate(batches):
        state, m = steps[schedule.step_kind(config, i)](state, batch)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.gen_params)]
    print("RESULT " + json.dumps([float(np.sum(np.abs(x))) for x in leaves]), flush=True)
    """
)


@SLOW
@pytest.mark.multiprocess
def test_two_processes_agree(tmp_path, one_device_run):
    """Two jax.distributed processes on localhost (CPU collectives), one device each, train
    two steps on halves of the batch and end with the parameters of the one-device run.

    The processes meet at a coordination-service barrier after compiling and before their
    first collective: XLA CPU's gloo collectives give a late peer 30 s, and the other test
    worker competes for the same cores while they compile."""
    script = tmp_path / "two_proc.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    # A guard against hangs: each process compiles the step (minutes on a slow 2-core CPU).
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    results = []
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    np.testing.assert_array_equal(results[0], results[1])
    _, ref_state, _, _, _, _ = one_device_run
    leaves = jax.tree.leaves(ref_state.gen_params)
    ref = [float(np.sum(np.abs(x))) for x in leaves]
    # Per element, the 8-device test's tolerance (1% of lr_g, for Adam's amplification of
    # gradient rounding), summed over each leaf.
    lr_g = tiny_config().optim.generator_lr
    atol = np.array([x.size for x in leaves]) * 0.01 * lr_g
    np.testing.assert_array_less(np.abs(np.array(results[0]) - ref), 1e-5 * np.abs(ref) + atol)


_STOP_AGREEMENT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]), initialization_timeout=600)
    sys.path.insert(0, sys.argv[3])
    from cswin_jax import loop
    with loop._StopRequested() as stop:
        for step in range(1, 50):
            if jax.process_index() == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice reaches one process
            if loop.stop_agreed(stop.signum is not None):
                print(f"STOPPED {step}", flush=True)
                break
        else:
            print("RAN TO THE END", flush=True)
    """
)


@SLOW
@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """SIGTERM reaches process 1 only, at step 3: both processes leave at step 3 (the loop
    saves there, once), instead of process 0 training on into a collective that never
    completes."""
    script = tmp_path / "stop.py"
    script.write_text(_STOP_AGREEMENT_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "STOPPED 3" in out.splitlines(), out[-3000:]


def _child_processes() -> set[int]:
    """Live child processes of this one (the multiprocessing resource tracker excepted)."""
    children = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            int(fields[1]) == os.getpid()
            and fields[0] != "Z"
            and b"resource_tracker" not in cmdline
        ):
            children.add(int(stat.parent.name))
    return children


@SLOW
def test_a_run_that_raises_leaves_no_child_process(tmp_path, monkeypatch):
    """An error at the second batch with grain worker processes (data.num_workers=1): the
    loop's clean-up stops the workers and closes the checkpointer and writers on the way out.
    `num_workers` is host-only, so the compiled step of the other loop tests is reused."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    config = tiny_config()
    config.data.num_workers = 1
    calls = {"n": 0}
    original = loop._stack_micro_batches

    def stack_then_fail(iterator, n):
        calls["n"] += 1
        if calls["n"] == 2:
            assert _child_processes() - before, "the test needs live worker processes"
            raise RuntimeError("injected failure")
        return original(iterator, n)

    monkeypatch.setattr(loop, "_stack_micro_batches", stack_then_fail)
    before = _child_processes()
    with pytest.raises(RuntimeError, match="injected failure"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert _child_processes() - before == set()


# --- the loop: resume, signals, non-finite steps ------------------------------------------------


def _params_of(workdir):
    gen, _, _ = ckpt_lib.restore_model_variables(
        pathlib.Path(workdir) / "checkpoints" / "train", use_ema=False
    )
    return gen


@SLOW
def test_resume_is_bit_identical(tmp_path, caplog):
    """A run interrupted at step 2 and resumed ends at step 4 with the same bits as an
    uninterrupted run (same batches, same RNG, same optimizer state)."""
    config = tiny_config()
    with caplog.at_level(logging.INFO, logger="absl"):
        full = loop.train_and_evaluate(config, str(tmp_path / "full"))
    # The console says what was written.
    ckpt = tmp_path / "full" / "checkpoints"
    assert f"checkpoint of step 4 written to {ckpt / 'train' / '4'}" in caplog.text
    assert f"written to {ckpt / 'best'}" in caplog.text
    assert int(full.gen_updates) == 4
    part = loop.train_and_evaluate(config, str(tmp_path / "part"), stop_after=2)
    assert int(part.gen_updates) == 2
    resumed = loop.train_and_evaluate(config, str(tmp_path / "part"))
    assert int(resumed.gen_updates) == 4
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # TensorBoard events and the best model were written.
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "full" / "checkpoints" / "best").is_dir()

    # A workdir holding another architecture is refused, naming the fix.
    other = tiny_config()
    other.model.base_channels = 32
    with pytest.raises(ValueError, match="init_from"):
        loop.train_and_evaluate(other, str(tmp_path / "full"))


@SLOW
def test_sigterm_saves_and_returns(tmp_path, monkeypatch):
    """SIGTERM during step 1 (checkpoint_every = 2): step 1 finishes, is saved, and the loop
    returns. Same config as the other loop tests, so it reuses their compiled step."""
    config = tiny_config()
    assert config.checkpoint_every > 1
    calls = {"n": 0}
    original = loop._stack_micro_batches

    def stack_and_signal(iterator, n):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(iterator, n)

    monkeypatch.setattr(loop, "_stack_micro_batches", stack_and_signal)
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.gen_updates) == 1
    assert _checkpoint_steps(tmp_path / "run") == [1]


@SLOW
def test_divergence_guard_rolls_back_to_the_best_state(tmp_path, monkeypatch, caplog):
    """With the guard on, a validation whose MRAE is not finite sends the run back to the state
    saved with the best model, with the learning rates halved; the final checkpoint holds it.
    The best model here is a state of another seed saved beforehand, so that the rollback is
    plain to see. Same programs as the other loop tests (the guard's keys are host-only)."""
    config = tiny_config()
    config.divergence_guard.enabled = True
    config.divergence_guard.max_rollbacks = 1
    compiled = programs.compiled_programs(config, sharding.make_mesh())
    best_state = jax.device_get(compiled.init_fn(jax.random.key(7)))
    ckpt = TrainCheckpointer(tmp_path / "run" / "checkpoints", keep=2)
    ckpt.save_best(1, loop._model_weights(best_state), config.to_dict(), 0.5, state=best_state)
    ckpt.close()
    summarize = loop.scoring.summarize

    def nan_mrae(rows):
        summary = summarize(rows)
        summary["mean"]["mrae"] = float("nan")
        return summary

    monkeypatch.setattr(loop.scoring, "summarize", nan_mrae)
    with caplog.at_level(logging.INFO, logger="absl"):
        state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "step 4: validation MRAE nan is not finite: rolled back to the state of step 1" in (
        caplog.text
    )
    assert float(state.lr_scale) == 0.5 and int(state.rollbacks) == 1
    state = jax.device_get(state)
    leaves = zip(
        jax.tree.leaves(state.gen_params), jax.tree.leaves(best_state.gen_params), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)
    resumed = TrainCheckpointer(tmp_path / "run" / "checkpoints", keep=2)
    saved, step = resumed.restore(compiled.abstract_state)
    resumed.close()
    assert step == 4 and float(saved.lr_scale) == 0.5 and int(saved.rollbacks) == 1


def _nan_batches(monkeypatch, which):
    """Makes loop batches number `which(call)` (1-based) non-finite."""
    calls = {"n": 0}
    original = loop._stack_micro_batches

    def stack(iterator, n):
        calls["n"] += 1
        batch = original(iterator, n)
        if which(calls["n"]):
            batch["hsi"][..., 0] = np.nan
        return batch

    monkeypatch.setattr(loop, "_stack_micro_batches", stack)


def _checkpoint_steps(workdir):
    folder = pathlib.Path(workdir) / "checkpoints" / "train"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@SLOW
def test_resume_after_a_skipped_step_continues_from_the_checkpoint(tmp_path, monkeypatch):
    """Batch 1 is non-finite (skipped: 1 generator update in 2 loop steps); the resumed run
    continues at loop step 2, not at the update count, and ends at step 4 with 3 updates.
    Same config as the other loop tests, so it reuses their compiled step."""
    config = tiny_config()
    _nan_batches(monkeypatch, lambda call: call == 1)
    part = loop.train_and_evaluate(config, str(tmp_path / "run"), stop_after=2)
    assert int(part.gen_updates) == 1 and int(part.nonfinite_total) == 1
    assert _checkpoint_steps(tmp_path / "run") == [2]
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(resumed.gen_updates) == 3 and int(resumed.nonfinite_total) == 1
    assert _checkpoint_steps(tmp_path / "run") == [2, 4]


@SLOW
def test_loop_stops_after_max_consecutive_nonfinite(tmp_path, monkeypatch):
    """Every batch non-finite: the loop raises at its next log point, naming the limit and
    where the last good state is. `max_consecutive_nonfinite` is host-only, so the compiled
    step of the other loop tests is reused."""
    config = tiny_config()
    config.max_consecutive_nonfinite = 2
    _nan_batches(monkeypatch, lambda call: True)
    with pytest.raises(FloatingPointError, match="max_consecutive_nonfinite=2"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
