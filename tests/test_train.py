"""Tests for cswin_jax/train.py: the sharded GAN step, skipping, resume, multi-process."""

import ctypes
import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import quickstart
from cswin_jax import checkpoint as ckpt_lib
from cswin_jax import loop, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Tests marked SLOW compile whole training steps: 1-4 minutes each on 2 CPU cores, mostly XLA
# compile time, and a few GB of memory each. The README's test command runs them after the
# rest, in one process (`pytest -m slow`), so that two such compiles never overlap; they
# share `one_device_run`. `-m 'not slow'` skips them for a quick check.
SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Frees compiled executables after each test and returns the freed heap to the OS, so
    the next compile starts from a small process (the persistent cache reloads programs)."""
    yield
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def tiny_config():
    """The quickstart recipe shrunk to test size (widths 16/32/64, 16x16 patches)."""
    c = quickstart.get_config()
    c.data.patch_size = 16
    c.data.stride = 8
    c.batch_size = 8
    # On CPU the micro-steps are unrolled, so A = 2 roughly doubles every step's compile time;
    # accumulation is exercised once, by the generator-only recipe test.
    c.gradient_accumulation_steps = 1
    # Not 8: EfficientSpectralAttention normalises q and k with GroupNorm(8), so 8 channels
    # give one channel per group, whose spatial mean is exactly 0; the attention then
    # normalises rounding noise, and 1- and 8-device runs differ by O(1) (the original's
    # arithmetic, ill-conditioned only at this toy width).
    c.model.base_channels = 16
    c.model.num_heads = 2
    c.model.split_sizes = (2, 2, 2)
    c.model.norm_groups = 4
    c.discriminator.base_dim = 8
    c.discriminator.num_heads = 2
    c.discriminator.num_blocks = (1, 1, 1)
    c.sinkhorn.max_points = 16
    c.loss.warmup_iterations = 1  # adversarial and SAM weights active from step 1
    c.loss.r1_interval = 2
    c.optim.warmup_steps = 2
    c.data.synthetic.num_train = 2
    c.data.synthetic.num_valid = 1
    c.data.synthetic.height = 40
    c.data.synthetic.width = 48
    c.epochs = 1
    c.iterations_per_epoch = 4
    c.checkpoint_every = 2
    c.log_every = 2
    return c


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    a, b, p = config.gradient_accumulation_steps, config.batch_size, config.data.patch_size
    rgb = rng.uniform(0, 1, (a, b, p, p, 3)).astype(np.float32)
    hsi = rng.uniform(0, 1, (a, b, p, p, 31)).astype(np.float32)
    return {"rgb": rgb, "hsi": hsi}


def jitted_step(trainer, devices):
    mesh = Mesh(np.array(devices), ("data",))
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, "data"))
    state_shape = jax.eval_shape(trainer.init_state, jax.random.key(0))
    state_sh = jax.tree.map(lambda _: repl, state_shape)
    step = trainer.make_train_step(state_sh, data, repl, donate=False)
    init = jax.jit(trainer.init_state, out_shardings=state_sh)
    return init, step, data


@pytest.fixture(scope="module")
def tiny_trainer():
    return train.Trainer(tiny_config())


@pytest.fixture(scope="module")
def one_device_run(tiny_trainer):
    """Two GAN steps on one device: (initial state, final state, metrics of each step)."""
    init, step, data = jitted_step(tiny_trainer, jax.devices()[:1])
    state0 = init(jax.random.key(0))
    state, history = state0, []
    for seed in (0, 1):
        batch = jax.device_put(make_batch(tiny_trainer.config, seed), data)
        state, m = step(state, batch)
        history.append(jax.device_get(m))
    return jax.device_get(state0), jax.device_get(state), history, step, data


@SLOW
def test_gan_step_updates_both_networks(one_device_run):
    state0, state, history, _, _ = one_device_run
    assert int(state.step) == 2
    assert int(state.disc_step) == 2  # n_critic = 1: one D step per G step
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
def test_eight_devices_match_one_device(tiny_trainer, one_device_run):
    """Data parallel over 8 virtual CPU devices equals the single-device step (fp32 tolerance:
    only the order of the cross-device gradient sums differs)."""
    _, ref_state, ref_history, _, _ = one_device_run
    assert len(jax.devices()) == 8
    init, step, data = jitted_step(tiny_trainer, jax.devices())
    state = init(jax.random.key(0))
    for seed in (0, 1):
        state, m = step(state, jax.device_put(make_batch(tiny_trainer.config, seed), data))
    state = jax.device_get(state)
    np.testing.assert_allclose(m["gen_loss"], ref_history[1]["gen_loss"], rtol=1e-4)
    # Parameters after two Adam steps: Adam divides each gradient by its own running RMS, so
    # for an element whose gradient is near zero the rounding of the cross-device sum moves
    # the step by a visible fraction of the learning rate (measured: 2.3e-6 = 0.23% of lr_g on
    # one element of a 16-element leaf, batch 8, A = 1). Hence an absolute tolerance of 1% of
    # lr_g; the loss and gradient norms are compared at 1e-4 relative below.
    lr_g = tiny_trainer.config.optim.generator_lr
    for a, b in zip(
        jax.tree.leaves(state.gen_params), jax.tree.leaves(ref_state.gen_params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.01 * lr_g)
    # The discriminator's output bias is the exception. The Sinkhorn divergence with the
    # squared-Euclidean cost does not change when real and fake move together, so its
    # gradient is zero up to rounding (only the joint rescale and the clamp break the
    # symmetry). Adam divides that rounding noise by its own root-mean-square, turning it into
    # a step of up to lr_d. That leaf is therefore compared to within two such steps.
    lr_d = tiny_trainer.config.optim.discriminator_lr
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
def test_non_finite_batch_is_skipped(tiny_trainer, one_device_run):
    _, state, _, step, data = one_device_run
    batch = make_batch(tiny_trainer.config, 5)
    batch["rgb"][0, 0, 0, 0, 0] = np.nan
    new_state, m = step(jax.device_put(state), jax.device_put(batch, data))
    new_state = jax.device_get(new_state)
    assert m["gen_skipped"] == 1
    assert int(new_state.step) == int(state.step)
    assert int(new_state.nonfinite_streak) == 1 and int(new_state.nonfinite_total) == 1
    for a, b in zip(
        jax.tree.leaves(new_state.gen_params), jax.tree.leaves(state.gen_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(new_state.ema_params), jax.tree.leaves(state.ema_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_lr_schedule_warmup_and_floor():
    sched = train.lr_schedule(2e-4, warmup=2000, horizon=10_000, end_lr=1e-6)
    # float32 schedule arithmetic: rtol 1e-5.
    np.testing.assert_allclose(sched(0), 2e-4 * 2 / 2001, rtol=1e-5)
    np.testing.assert_allclose(sched(2000), 2e-4, rtol=1e-5)
    np.testing.assert_allclose(sched(10_000), 1e-6, rtol=1e-4)
    np.testing.assert_allclose(sched(50_000), 1e-6, rtol=1e-4)  # horizon clipped


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("n_critic", 0, "n_critic"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
        ("batch_size", 6, "not divisible by the 8 devices"),
    ],
)
def test_invalid_config_is_rejected(key, value, match):
    config = tiny_config()
    config[key] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(config, num_devices=8)


def _params_of(workdir):
    gen, _, _ = ckpt_lib.restore_model_variables(
        pathlib.Path(workdir) / "checkpoints" / "train", use_ema=False
    )
    return gen


@SLOW
def test_resume_is_bit_identical(tmp_path):
    """A run interrupted at step 2 and resumed ends at step 4 with the same bits as an
    uninterrupted run (same batches, same RNG, same optimizer state)."""
    config = tiny_config()
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))
    assert int(full.step) == 4
    part = loop.train_and_evaluate(config, str(tmp_path / "part"), stop_after=2)
    assert int(part.step) == 2
    resumed = loop.train_and_evaluate(config, str(tmp_path / "part"))
    assert int(resumed.step) == 4
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
    config = tiny_config()
    config.checkpoint_every = 100
    calls = {"n": 0}
    original = loop._stack_micro_batches

    def stack_and_signal(iterator, n):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(iterator, n)

    monkeypatch.setattr(loop, "_stack_micro_batches", stack_and_signal)
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    steps = sorted(
        int(p.name)
        for p in (tmp_path / "run" / "checkpoints" / "train").iterdir()
        if p.name.isdigit()
    )
    assert steps == [2]


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
    from tests.test_train import tiny_config, make_batch
    from cswin_jax import train
    config = tiny_config()
    trainer = train.Trainer(config)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    shape = jax.eval_shape(trainer.init_state, jax.random.key(0))
    sh = jax.tree.map(lambda _: repl, shape)
    state = jax.jit(trainer.init_state, out_shardings=sh)(jax.random.key(0))
    step = trainer.make_train_step(sh, data, repl, donate=False)
    half = config.batch_size // 2
    pid = jax.process_index()
    for seed in (0, 1):
        full = make_batch(config, seed)
        local = {k: v[:, pid * half:(pid + 1) * half] for k, v in full.items()}
        batch = {k: jax.make_array_from_process_local_data(data, v) for k, v in local.items()}
        state, m = step(state, batch)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.gen_params)]
    print("RESULT " + json.dumps([float(np.sum(np.abs(x))) for x in leaves]), flush=True)
    """
)


@SLOW
def test_two_processes_agree(tmp_path, one_device_run):
    """Two jax.distributed processes on localhost (CPU collectives), one device each, train
    two steps on halves of the batch and end with the parameters of the one-device run."""
    _, ref_state, _, _, _ = one_device_run
    script = tmp_path / "two_proc.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    import socket

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
    leaves = jax.tree.leaves(ref_state.gen_params)
    ref = [float(np.sum(np.abs(x))) for x in leaves]
    # Per element, the 8-device test's tolerance (1% of lr_g, for Adam's amplification of
    # gradient rounding), summed over each leaf.
    lr_g = tiny_config().optim.generator_lr
    atol = np.array([x.size for x in leaves]) * 0.01 * lr_g
    np.testing.assert_array_less(np.abs(np.array(results[0]) - ref), 1e-5 * np.abs(ref) + atol)


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


@SLOW
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
    trainer = train.Trainer(config)
    state = jax.jit(trainer.init_state)(jax.random.key(0))
    assert state.disc_params is None
    batch = make_batch(config)
    batch["rgb"][1], batch["hsi"][1] = batch["rgb"][0], batch["hsi"][0]
    new_state, m = jax.jit(trainer.train_step)(state, batch)
    assert np.isfinite(m["gen_loss"]) and "disc_loss" not in m
    assert int(new_state.step) == 1
    assert jnp.abs(m["gen_loss"] - m["reconstruction"]) < 1e-6
    # Two identical micro-batches: the accumulated mean equals one micro-batch's loss.
    single = {k: v[:1] for k, v in batch.items()}
    _, m1 = jax.jit(trainer.train_step)(state, single)
    np.testing.assert_allclose(float(m["gen_loss"]), float(m1["gen_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["gen_grad_norm"]), float(m1["gen_grad_norm"]), rtol=1e-4)
