"""Seconds per frame of whole-frame and tiled inference at the default generator width.

Run directly (not through pytest, whose XLA flags slow the compiled code down):

  python bench/inference.py [--size 482x512] [--repeats 2] [--tile 128] [--overlap 16]
                            [--batch 4] [--ensemble] [--dtype bfloat16]

Prints, for whole-frame (`inference.predict_whole`) and tiled (`inference.predict_tiled`)
inference: the first call (compile + run) and the median of `--repeats` further calls, each
including the host-side tiling / blending and the transfer of the [H, W, 31] result.
Weights are random (timing does not depend on their values), so no checkpoint is needed.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cswin_jax
from configs.base import get_config  # noqa: E402
from cswin_jax import cli, inference  # noqa: E402
from cswin_jax.models.generator import build_generator  # noqa: E402

_SIZE = flags.DEFINE_string("size", "482x512", "HxW of the frame")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per mode (after the first call)")
_TILE = flags.DEFINE_integer("tile", 128, "tile side in pixels (tiled mode)")
_OVERLAP = flags.DEFINE_integer("overlap", 16, "overlap of neighbouring tiles in pixels")
_BATCH = flags.DEFINE_integer("batch", 4, "tiles per model call")
_ENSEMBLE = flags.DEFINE_bool("ensemble", False, "8-way self-ensemble")
_MODES = flags.DEFINE_string("modes", "whole,tiled", "comma-separated subset of whole,tiled")
_DTYPE = flags.DEFINE_enum("dtype", "float32", inference.COMPUTE_DTYPES, "compute dtype")


def _time(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) if times else float("nan")


def main(argv) -> None:
    del argv
    model_cfg = get_config().model  # default width (base_channels 64)
    model = build_generator(model_cfg, dtype=jnp.dtype(_DTYPE.value))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), jnp.float32),
        abstract["params"],
    )
    apply_fn = inference.make_generator_apply(model, params)
    height, width = (int(v) for v in _SIZE.value.lower().split("x"))
    rgb = rng.uniform(size=(height, width, 3)).astype(np.float32)
    n_tiles = len(inference.tile_positions(height, width, _TILE.value, _OVERLAP.value))
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f} M params, "
        f"frame {height}x{width}, ensemble={_ENSEMBLE.value}, compute {_DTYPE.value}"
    )
    runs = {
        "whole": lambda: inference.predict_whole(apply_fn, rgb, ensemble=_ENSEMBLE.value),
        "tiled": lambda: inference.predict_tiled(
            apply_fn,
            rgb,
            tile=_TILE.value,
            overlap=_OVERLAP.value,
            batch_size=_BATCH.value,
            ensemble=_ENSEMBLE.value,
        ),
    }
    for mode in _MODES.value.split(","):
        first, median = _time(runs[mode], _REPEATS.value)
        detail = (
            f" ({n_tiles} tiles of {_TILE.value}, overlap {_OVERLAP.value}, batch {_BATCH.value})"
            if mode == "tiled"
            else ""
        )
        print(
            f"{mode}{detail}: first call (compile + run) {first:.1f} s, "
            f"then {median:.2f} s per frame (median of {_REPEATS.value})",
            flush=True,
        )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main)
