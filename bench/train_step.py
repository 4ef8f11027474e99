"""Prints the training step's speed: ms/step and patches/s for the default model.

  python bench/train_step.py [--config=configs/gan.py] [--batch_sizes=2,20] [--steps=3]

One step = one generator update + one discriminator update (Sinkhorn, R1 on its first step),
gradient accumulation 1, 128x128 patches, compiled once per batch size; the first call
(compile) is reported separately and excluded from the timing. Runs on whatever JAX finds
(GPU when present).
"""

import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cswin_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gan.py", "recipe", lock_config=False)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["2", "20"], "batch sizes to time")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per batch size")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv):
    del argv
    print(f"devices: {jax.devices()}")
    for batch_size in map(int, _BATCH_SIZES.value):
        config = _CONFIG.value
        config.batch_size = batch_size
        config.gradient_accumulation_steps = 1
        trainer = train.Trainer(config)
        state = jax.jit(trainer.init_state)(jax.random.key(0))
        p = config.data.patch_size
        rng = np.random.default_rng(0)
        batch = {
            "rgb": rng.uniform(0, 1, (1, batch_size, p, p, 3)).astype(np.float32),
            "hsi": rng.uniform(0, 1, (1, batch_size, p, p, 31)).astype(np.float32),
        }
        batch = jax.device_put(batch)
        step = jax.jit(trainer.train_step, donate_argnums=(0,))
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(_STEPS.value):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        print(
            f"batch {batch_size:3d} patch {p}: {ms:9.1f} ms/step, "
            f"{batch_size / (ms / 1e3):8.2f} patches/s (first call incl. compile "
            f"{compile_s:.1f} s; "
            f"mixed_precision={config.mixed_precision}, remat={config.model.remat}, "
            f"peak RSS so far {_peak_rss_gib():.1f} GiB, "
            f"gen_loss={float(m['gen_loss']):.4f})",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
