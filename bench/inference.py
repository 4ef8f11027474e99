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

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cswin_jax
from configs.base import get_config  # noqa: E402
from cswin_jax import inference  # noqa: E402
from cswin_jax.models.generator import build_generator  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="482x512", help="HxW of the frame")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="tiles per model call")
    parser.add_argument("--ensemble", action="store_true", help="8-way self-ensemble")
    parser.add_argument("--modes", default="whole,tiled", help="comma-separated subset")
    parser.add_argument(
        "--dtype", default="float32", choices=inference.COMPUTE_DTYPES, help="compute dtype"
    )
    args = parser.parse_args()

    model_cfg = get_config().model  # default width (base_channels 64)
    model = build_generator(model_cfg, dtype=jnp.dtype(args.dtype))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), jnp.float32),
        abstract["params"],
    )
    apply_fn = inference.make_generator_apply(model, params)
    height, width = (int(v) for v in args.size.lower().split("x"))
    rgb = rng.uniform(size=(height, width, 3)).astype(np.float32)
    n_tiles = len(inference.tile_positions(height, width, args.tile, args.overlap))
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f} M params, "
        f"frame {height}x{width}, ensemble={args.ensemble}, compute {args.dtype}"
    )
    runs = {
        "whole": lambda: inference.predict_whole(apply_fn, rgb, ensemble=args.ensemble),
        "tiled": lambda: inference.predict_tiled(
            apply_fn,
            rgb,
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch,
            ensemble=args.ensemble,
        ),
    }
    for mode in args.modes.split(","):
        first, median = _time(runs[mode], args.repeats)
        detail = (
            f" ({n_tiles} tiles of {args.tile}, overlap {args.overlap}, batch {args.batch})"
            if mode == "tiled"
            else ""
        )
        print(
            f"{mode}{detail}: first call (compile + run) {first:.1f} s, "
            f"then {median:.2f} s per frame (median of {args.repeats})",
            flush=True,
        )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    main()
