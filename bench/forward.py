"""Generator forward time on CPU/GPU at the default width (jit, after warm-up, median).

Run directly (not through pytest, whose XLA flags slow the compiled code down):

  python bench/forward.py [--sizes 128x128,482x512] [--repeats 3] [--dtype float32]
      [--config configs/base.py[:arg]]

Prints one line per size: compile time, then the median / min forward time of `--repeats`
runs on one image (batch 1), each timed to `block_until_ready`.
"""

from __future__ import annotations

import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import cswin_jax
from cswin_jax import cli
from cswin_jax.models.generator import build_generator

_SIZES = flags.DEFINE_string("sizes", "128x128,482x512", "comma-separated HxW list")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed forward runs per size (after a warm-up)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_ATTENTION_MODE = flags.DEFINE_enum(
    "attention_mode", "v2", ["v2", "cswin"], "model.attention_mode of the generator"
)
flags.DEFINE_alias("attention-mode", "attention_mode")  # the former argparse spelling
_CONFIG = flags.DEFINE_string("config", "configs/base.py", "recipe[:arg] (its model)")


def load_config(spec: str):
    """`configs/quickstart.py:generator` -> configs.quickstart.get_config('generator')."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(arg or None)


def main(argv) -> None:
    del argv
    model_cfg = load_config(_CONFIG.value).model
    model_cfg.attention_mode = _ATTENTION_MODE.value
    model = build_generator(model_cfg, dtype=jnp.dtype(_DTYPE.value))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    print(
        f"device: {jax.devices()[0].device_kind}  backend: {jax.default_backend()}  "
        f"dtype: {_DTYPE.value}  attention_mode: {_ATTENTION_MODE.value}"
    )
    for size in _SIZES.value.split(","):
        height, width = (int(v) for v in size.lower().split("x"))
        rgb = jnp.asarray(np.random.default_rng(0).uniform(size=(1, height, width, 3)), jnp.float32)
        start = time.perf_counter()
        compiled = forward.lower(params, rgb).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, rgb))  # warm-up
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, rgb))
            times.append(time.perf_counter() - start)
        print(
            f"{height}x{width}: compile {compile_s:.1f} s, forward median "
            f"{statistics.median(times):.3f} s, min {min(times):.3f} s over {_REPEATS.value} runs"
        )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main, config_flag=None)  # --config is a recipe path here
