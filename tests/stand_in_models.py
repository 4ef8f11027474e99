"""Small models and checkpoints shared by the inference / predict / evaluate / viz tests."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

BANDS = 31


def pointwise_model(seed: int = 0):
    """Per-pixel affine RGB -> 31 bands with positive outputs (translation- and D4-equivariant)."""
    rng = np.random.default_rng(seed)
    matrix = jnp.asarray(rng.uniform(0.1, 1.0, (3, BANDS)).astype(np.float32))
    bias = jnp.asarray(rng.uniform(0.1, 0.5, (BANDS,)).astype(np.float32))

    def apply_fn(rgb):
        return rgb @ matrix + bias

    return apply_fn


def conv_model(seed: int = 1, symmetric: bool = False):
    """5x5 convolution with zero 'SAME' padding (translation-equivariant). symmetric=True
    averages the kernel over the 8 flips/rotations, which makes it D4-equivariant too."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(5, 5, 3, BANDS)).astype(np.float32) / 5.0
    if symmetric:
        views = [np.rot90(np.flip(kernel, 1) if f else kernel, k) for f in (0, 1) for k in range(4)]
        kernel = np.mean(views, axis=0).astype(np.float32)
    kernel = jnp.asarray(kernel)

    def apply_fn(rgb):
        return jax.lax.conv_general_dilated(
            rgb, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return apply_fn


def tiny_model_config(base_channels: int = 8):
    """configs/base.py with a tiny generator (CI-sized)."""
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from configs.base import get_config

    config = get_config()
    config.model.base_channels = base_channels
    config.model.split_sizes = [2, 2, 2]
    config.model.num_heads = 2
    config.model.norm_groups = 4
    # Small tiles keep the one compiled tile batch cheap; 97x131 still needs 6 tiles.
    config.eval.tile_size = 64
    config.eval.tile_batch_size = 2
    return config


def write_tiny_checkpoint(directory, base_channels: int = 8, params_channels: int | None = None):
    """Weights-only checkpoint of a randomly initialised tiny generator.

    params_channels: build the weights at another width than the config says (a checkpoint
    that does not fit its own architecture).
    """
    from cswin_jax import checkpoint
    from cswin_jax.models.generator import build_generator

    config = tiny_model_config(base_channels)
    weights_config = tiny_model_config(params_channels or base_channels)
    model = build_generator(weights_config.model)
    # Random weights of the right shapes: compiling `model.init` costs more than a minute on CI.
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: rng.normal(0.0, 0.1, leaf.shape).astype(np.float32), abstract["params"]
    )
    checkpoint.save_model_checkpoint(directory, generator_params=params, config=config.to_dict())
    return pathlib.Path(directory)
