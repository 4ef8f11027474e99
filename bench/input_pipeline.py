"""Prints the training input pipeline's speed, patches/s for each memory mode.

  python bench/input_pipeline.py [--data_dir=/tmp/cswin_bench_data] [--scenes=4]
      [--modes=standard,float16,lazy] [--batches=60] [--num_workers=0] [--batch_size=20]

Runs `create_train_iterator` exactly as training does (grain, shuffle over (scene, position),
rot/flip augmentation, per-host batches of 20 patches of 128x128, float32) on a synthetic set
of 482x512 scenes (generated into --data_dir once). The first batches (thread start-up, first
touches of the scenes, lazy cache fills) are excluded: `--warmup` batches are drawn first.

Columns: patches/s (wall clock), ms/batch (wall), and CPU us/patch (process CPU time over
all reader threads / workers' parent, per patch): on a machine shared with other jobs the
wall figure understates what idle cores give; `2 / CPU s per patch` is the rate two idle
cores would sustain if the copies scale across them (numpy releases the GIL for them).
"""

import os
import pathlib
import time

from absl import flags

from configs import base
from cswin_jax import cli
from cswin_jax.data import pipeline, synthetic

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/cswin_bench_data", "synthetic set (cached)")
_SCENES = flags.DEFINE_integer("scenes", 4, "482x512 training scenes")
_MODES = flags.DEFINE_list("modes", ["standard", "float16", "lazy"], "memory modes to time")
_BATCHES = flags.DEFINE_integer("batches", 60, "timed batches per mode")
_WARMUP = flags.DEFINE_integer("warmup", 5, "untimed batches per mode")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes (0: threads)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 20, "patches per batch")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "data.prefetch_buffer_size (= reader threads)")


def main(argv):
    del argv
    root = pathlib.Path(_DATA_DIR.value)
    settings = dict(num_train=_SCENES.value, num_valid=1, height=482, width=512, seed=0)
    if not synthetic.is_complete(root, **settings):
        start = time.perf_counter()
        synthetic.write_dataset(root, **settings)
        per_scene = (time.perf_counter() - start) / (_SCENES.value + 1)
        print(f"generated {_SCENES.value + 1} synthetic 482x512 scenes: {per_scene:.2f} s each")
    print(
        f"cpus: {os.cpu_count()}  scenes: {_SCENES.value} x 482x512  batch: {_BATCH_SIZE.value}"
        f" x 128x128  workers: {_NUM_WORKERS.value}  prefetch/threads: {_PREFETCH.value}"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'memory_mode':<12} {'patches/s':>10} {'ms/batch':>9} {'CPU us/patch':>13}")
    for mode in _MODES.value:
        config = base.get_config()
        config.batch_size = _BATCH_SIZE.value
        config.data.memory_mode = mode
        config.data.num_workers = _NUM_WORKERS.value
        config.data.prefetch_buffer_size = _PREFETCH.value
        iterator = pipeline.create_train_iterator(config, root, process_index=0, process_count=1)
        for _ in range(_WARMUP.value):
            next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(_BATCHES.value):
            next(iterator)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if hasattr(iterator, "close"):
            iterator.close()
        count = _BATCHES.value * _BATCH_SIZE.value
        print(
            f"{mode:<12} {count / elapsed:>10.0f} {1000 * elapsed / _BATCHES.value:>9.1f} "
            f"{1e6 * cpu / count:>13.0f}"
        )


if __name__ == "__main__":
    cli.run(main)
