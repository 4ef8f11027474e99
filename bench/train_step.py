"""Prints the training step's speed: ms/step and patches/s for the default model.

  python bench/train_step.py [--config=configs/gan.py] [--batch_sizes=2,20] [--steps=3]
      [--r1_step=true] [--config.model.remat=block --config.loss.r1_chunks=4]

One step = one generator update + one discriminator update (Sinkhorn; lazy R1 on every
`loss.r1_interval`-th discriminator step), gradient accumulation 1, 128x128 patches. Per batch
size the loop's two programs (with and without R1) are compiled ahead of time (reported apart),
then, after one untimed run, `--steps` steps without R1 are timed (median), then the step
with R1 (the faster of two runs; skipped with `--r1_step=false`). The line gives both,
and the mean over one R1 interval ((r1 + (interval - 1) * plain) / interval), which is what a
long run pays per step. Runs on whatever JAX finds (GPU when present). On a 24 GiB CPU host
batch 20 needs `--config.model.remat=block --config.loss.r1_chunks=4` (15.7 GiB of XLA
temporaries; the recipe's defaults need 76 GB there, see bench/memory.py).
"""

import functools
import resource
import statistics
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

import cswin_jax
from cswin_jax import cli, programs, schedule, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gan.py", "recipe", lock_config=False)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["2", "20"], "batch sizes to time")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps without R1 per batch size")
_R1_STEP = flags.DEFINE_bool("r1_step", True, "time one step with the R1 penalty first")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS count of this process (Linux), so that the peak while
    stepping can be told apart from the compiler's; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset_gib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _peak_device_memory() -> str:
    """The device allocator's peak so far (GPU), or 'n/a' where the backend keeps no stats."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


def _timed(step, state, batch):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return state, metrics, time.perf_counter() - t0


def _stepping(was_reset: bool) -> str:
    peak = _peak_rss_since_reset_gib() if was_reset else None
    return "n/a" if peak is None else f"{peak:.1f} GiB"


def main(argv):
    del argv
    print(f"devices: {jax.devices()}", flush=True)
    for batch_size in map(int, _BATCH_SIZES.value):
        config = _CONFIG.value
        config.batch_size = batch_size
        config.gradient_accumulation_steps = 1
        setup = train.make_setup(config)
        state = programs.initialise_once(setup, None, jax.random.key(0))  # as the loop does
        interval = max(1, int(config.loss.r1_interval))
        uses_r1 = _R1_STEP.value and bool(config.loss.use_r1) and bool(config.train_discriminator)
        p = config.data.patch_size
        rng = np.random.default_rng(0)
        batch = jax.device_put(
            {
                "rgb": rng.uniform(0, 1, (1, batch_size, p, p, 3)).astype(np.float32),
                "hsi": rng.uniform(0, 1, (1, batch_size, p, p, 31)).astype(np.float32),
            }
        )
        # The loop's programs: one per step kind (with and without R1), compiled one by one
        # here so that each reports its own compile time and XLA temporaries.
        kinds = [schedule.PLAIN_STEP] + ([schedule.StepKind(True, True)] if uses_r1 else [])
        if not config.train_discriminator:
            kinds = [schedule.StepKind(False, False)]
        steps = {}
        for kind in kinds:
            t0 = time.perf_counter()
            steps[kind] = (
                jax.jit(functools.partial(train.train_step, setup, kind=kind), donate_argnums=(0,))
                .lower(state, batch)
                .compile()
            )
            compile_s = time.perf_counter() - t0
            cswin_jax.release_freed_memory()  # as `programs.compile_all` does after each
            memory = steps[kind].memory_analysis()
            temp = f"{memory.temp_size_in_bytes / 2**30:.2f} GiB" if memory is not None else "n/a"
            name = "with R1" if kind.r1 else "without R1"
            print(
                f"batch {batch_size:3d}: step {name} compiled in {compile_s:.1f} s, "
                f"XLA temporaries {temp}",
                flush=True,
            )
        compile_rss = _peak_rss_gib()
        cswin_jax.release_freed_memory()  # as the training loop does before its first step
        stepping_rss = _reset_peak_rss()
        # One untimed run first: a program's first executions pay one-time costs (measured at
        # default width: 73.5 s, 38.6 s, then 30.4 s).
        state, m, _ = _timed(steps[kinds[0]], state, batch)
        times = []
        for _ in range(_STEPS.value):
            state, m, seconds = _timed(steps[kinds[0]], state, batch)
            times.append(seconds)
            print(f"batch {batch_size:3d}: step without R1 {1e3 * seconds:.1f} ms", flush=True)
        r1_s = None
        if uses_r1:
            state, m, r1_s = _timed(steps[kinds[1]], state, batch)
            state, m, r1_s2 = _timed(steps[kinds[1]], state, batch)
            r1_s = min(r1_s, r1_s2)  # the first run of a program pays one-time costs
            print(f"batch {batch_size:3d}: step with R1 {1e3 * r1_s:.1f} ms", flush=True)
        ms = 1e3 * statistics.median(times)
        mean_ms = ms
        line = (
            f"batch {batch_size:3d} patch {p}: {ms:9.1f} ms/step without R1, "
            f"{batch_size / (ms / 1e3):8.2f} patches/s"
        )
        if r1_s is not None:
            mean_ms = (1e3 * r1_s + (interval - 1) * ms) / interval
            line += (
                f"; with R1 {1e3 * r1_s:.1f} ms; mean over the R1 interval of {interval}: "
                f"{mean_ms:.1f} ms/step, {batch_size / (mean_ms / 1e3):.2f} patches/s"
            )
        print(
            f"{line} (mixed_precision={config.mixed_precision}, remat={config.model.remat}, "
            f"r1_chunks={config.loss.get('r1_chunks', 1)}, peak RSS so far "
            f"{_peak_rss_gib():.1f} GiB (after compiling {compile_rss:.1f} GiB; while "
            f"stepping {_stepping(stepping_rss)}), peak device memory so far "
            f"{_peak_device_memory()}, "
            f"{1e3 / mean_ms:.2f} steps/s, gen_loss={float(m['gen_loss']):.4f})",
            flush=True,
        )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main)
