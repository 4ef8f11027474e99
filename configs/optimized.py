"""Memory-optimised generator-only recipe (the original's "memory-optimised MST++" intent).

No discriminator: Charbonnier reconstruction (optionally + MRAE via --config.loss.lambda_mrae),
Adam b=(0.9, 0.999) at 4e-4, cosine over 300k steps to 1e-6 without warmup, whole-block remat.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config(arg)
    config.recipe = "optimized"
    base.generator_only(config)
    config.gradient_accumulation_steps = 1
    config.model.remat = "block"
    config.optim.generator_lr = 4e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.warmup_steps = 0
    config.optim.total_steps = 300_000
    return config
