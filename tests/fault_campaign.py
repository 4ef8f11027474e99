"""A fault campaign: a training run killed with SIGKILL at random moments and restarted on the
same workdir each time must end bit-identical to a run that was never interrupted.

Used by `tests/test_faults.py` (a few kills) and `bench/faults.py` (the long version).
The runs are `python -m cswin_jax.main` subprocesses on the tiny test recipe, with a
checkpoint at every step so that kills land before, during and after saves.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = """
import sys
sys.path.insert(0, {root!r})
from tests.train_setup import tiny_config


def get_config():
    config = tiny_config()
    config.checkpoint_every = 1  # a save at every step: kills land around saves too
    config.checkpoint_keep = 3
    config.eval.floor = False
    config.loss.use_r1 = False  # one training program to load per process, not two
    return config
"""


def write_config(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "fault_campaign_config.py"
    path.write_text(_CONFIG.format(root=str(ROOT)))
    return path


@dataclasses.dataclass
class Campaign:
    kills: list[str]  # what each kill interrupted
    lives: int  # processes started, the final one included


def _command(config_path: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "cswin_jax.main", f"--config={config_path}",
            f"--workdir={workdir}"]  # fmt: skip


def _env() -> dict[str, str]:
    """One CPU device (saves of a state replicated over 8 virtual devices are slow), fast
    compiles; the persistent compilation cache comes from the environment when set."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                "--xla_backend_optimization_level=0")  # fmt: skip


def _entries(workdir: pathlib.Path) -> list[str]:
    folder = workdir / "checkpoints" / "train"
    try:
        return sorted(p.name for p in folder.iterdir())
    except FileNotFoundError:
        return []


def run_to_end(config_path, workdir, log: pathlib.Path, timeout: float = 1800) -> None:
    """One uninterrupted process on `workdir` (a fresh run, or a resume)."""
    with open(log, "a") as out:
        done = subprocess.run(_command(config_path, workdir), stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env=_env(), timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(
            f"run on {workdir} failed ({done.returncode}): {log.read_text()[-3000:]}"
        )


def run_with_kills(config_path, workdir, log: pathlib.Path, kills: int, seed: int,
                   timeout: float = 1800) -> Campaign:  # fmt: skip
    """Starts the run, SIGKILLs it `kills` times at random moments, restarting it on the same
    workdir each time, then lets it finish. Each kill comes either a random 2-8 s after the
    start (start-up, compile-cache load, restore) or a random 0-0.4 s after a new entry
    appears in the checkpoint folder (mid-step or mid-save)."""
    rng = random.Random(seed)
    notes = []
    lives = 0
    with open(log, "a") as out:
        for k in range(kills):
            after_new_entry = rng.random() < 0.7
            delay = rng.uniform(0.0, 0.4) if after_new_entry else rng.uniform(2.0, 8.0)
            before = set(_entries(workdir))
            proc = subprocess.Popen(_command(config_path, workdir), stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT, env=_env())  # fmt: skip
            lives += 1
            deadline = time.monotonic() + timeout
            while after_new_entry and proc.poll() is None and time.monotonic() < deadline:
                if set(_entries(workdir)) - before:
                    break
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is not None:
                notes.append(f"kill {k + 1}: the run had already ended")
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            where = "after a new checkpoint entry" if after_new_entry else "after start"
            notes.append(f"kill {k + 1}: {delay:.2f} s {where}; folder then {_entries(workdir)}")
    run_to_end(config_path, workdir, log, timeout)
    return Campaign(kills=notes, lives=lives + 1)


def final_checkpoint(workdir: pathlib.Path) -> tuple[int, dict, dict[str, bytes]]:
    """(step, state leaves by path, data iterator files) of the newest training step."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    folder = workdir / "checkpoints" / "train"
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on another topology
    with ocp.StandardCheckpointer() as checkpointer:
        path = (folder / str(step) / "state").absolute()
        metadata = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device), metadata
        )
        restored = checkpointer.restore(path, target)
    leaves = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
    }
    data = {
        str(p.relative_to(folder / str(step) / "data")): p.read_bytes()
        for p in (folder / str(step) / "data").rglob("*")
        if p.is_file() and p.name != "commit_success.txt"  # that one names its own folder
    }
    return step, leaves, data


def differences(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """What differs between the final checkpoints of two workdirs (empty: bit-identical)."""
    step_a, leaves_a, data_a = final_checkpoint(a)
    step_b, leaves_b, data_b = final_checkpoint(b)
    found = []
    if step_a != step_b:
        found.append(f"final step {step_a} vs {step_b}")
    if leaves_a.keys() != leaves_b.keys():
        found.append(f"state trees differ: {sorted(leaves_a.keys() ^ leaves_b.keys())[:5]}")
    for key in sorted(leaves_a.keys() & leaves_b.keys()):
        x, y = leaves_a[key], leaves_b[key]
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            found.append(f"state{key}")
    if data_a != data_b:
        found.append("data iterator position")
    return found
