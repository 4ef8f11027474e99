"""Sinkhorn-GAN recipe: the original CSWIN v2 trainer's defaults, with its defects fixed.

CSWin generator against the spectral-norm discriminator, Sinkhorn-divergence adversarial term
(OTT-JAX), lazy R1, gradient accumulation 2, Adam b=(0.5, 0.999), lr_g 2e-4 / lr_d 5e-5 with
2000 warmup steps then cosine to 1e-6 over epochs * iterations_per_epoch optimizer steps, EMA
0.999, bfloat16 compute. Data: ARAD-1K in the MST++ layout at HSI_DATA_DIR.

  python -m cswin_jax.main --config=configs/gan.py --workdir=DIR [--config.batch_size=8 ...]
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config(arg)
    config.recipe = "gan"
    return config
