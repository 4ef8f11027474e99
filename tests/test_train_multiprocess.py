"""Two jax.distributed processes on localhost agree with the one-device GAN step.

Marked `slow` and `multiprocess`. The README's test command runs it on the second worker
after `test_train_recipes.py`, while the first still compiles `test_train.py`'s steps. The
two processes must reach each collective within XLA CPU's 30 s gloo window, however unevenly
the shared cores compile their programs: they meet at a coordination-service barrier after
compiling, before the first collective.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests import train_setup
from tests.train_setup import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    from tests.train_setup import tiny_config, make_batch
    from cswin_jax import sharding, train
    config = tiny_config()
    trainer = train.Trainer(config)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    shape = jax.eval_shape(trainer.init_state, jax.random.key(0))
    sh = jax.tree.map(lambda _: repl, shape)
    init = jax.jit(trainer.init_state, out_shardings=sh).lower(jax.random.key(0)).compile()
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
    step = trainer.make_train_step(sh, data, repl, donate=False)
    step = step.lower(shape, batches[0]).compile()
    sharding.wait_for_all_processes("two_process_test_compiled")
    state = init(jax.random.key(0))
    for batch in batches:
        state, m = step(state, batch)
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.gen_params)]
    print("RESULT " + json.dumps([float(np.sum(np.abs(x))) for x in leaves]), flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_agree(tmp_path):
    """Two jax.distributed processes on localhost (CPU collectives), one device each, train
    two steps on halves of the batch and end with the parameters of the one-device run."""
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
    # The reference only now, so that this process holds no compiled step while the two
    # compile theirs; with the persistent cache warm from test_train.py, it is a cache load.
    _, ref_state, _, _, _, _ = train_setup.one_device_run(train_setup.tiny_trainer())
    train_setup.release_compiled_programs()
    leaves = jax.tree.leaves(ref_state.gen_params)
    ref = [float(np.sum(np.abs(x))) for x in leaves]
    # Per element, the 8-device test's tolerance (1% of lr_g, for Adam's amplification of
    # gradient rounding), summed over each leaf.
    lr_g = tiny_config().optim.generator_lr
    atol = np.array([x.size for x in leaves]) * 0.01 * lr_g
    np.testing.assert_array_less(np.abs(np.array(results[0]) - ref), 1e-5 * np.abs(ref) + atol)
