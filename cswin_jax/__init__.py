"""cswin-jax: JAX/Flax CSWIN v2 for RGB-to-hyperspectral reconstruction."""

__version__ = "0.1.0"
