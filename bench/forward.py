"""Generator forward time on CPU/GPU at the default width (jit, after warm-up, median).

Run directly (not through pytest, whose XLA flags slow the compiled code down):

  python bench/forward.py [--sizes 128x128,482x512] [--repeats 3] [--dtype float32]
      [--config configs/base.py[:arg]]

Prints one line per size: compile time, then the median / min forward time of `--repeats`
runs on one image (batch 1), each timed to `block_until_ready`.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import cswin_jax
from cswin_jax.models.generator import build_generator


def load_config(spec: str):
    """`configs/quickstart.py:generator` -> configs.quickstart.get_config('generator')."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(arg or None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x128,482x512", help="comma-separated HxW list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention-mode", default="v2", choices=["v2", "cswin"])
    parser.add_argument("--config", default="configs/base.py", help="recipe[:arg] (its model)")
    args = parser.parse_args()

    model_cfg = load_config(args.config).model
    model_cfg.attention_mode = args.attention_mode
    model = build_generator(model_cfg, dtype=jnp.dtype(args.dtype))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    print(
        f"device: {jax.devices()[0].device_kind}  backend: {jax.default_backend()}  "
        f"dtype: {args.dtype}  attention_mode: {args.attention_mode}"
    )
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.lower().split("x"))
        rgb = jnp.asarray(np.random.default_rng(0).uniform(size=(1, height, width, 3)), jnp.float32)
        start = time.perf_counter()
        compiled = forward.lower(params, rgb).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, rgb))  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, rgb))
            times.append(time.perf_counter() - start)
        print(
            f"{height}x{width}: compile {compile_s:.1f} s, forward median "
            f"{statistics.median(times):.3f} s, min {min(times):.3f} s over {args.repeats} runs"
        )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    main()
