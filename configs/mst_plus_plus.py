"""MST++ (the NTIRE 2022 spectral-reconstruction winner) with its reference training recipe.

The official architecture (`cswin_jax/models/mst_plus_plus.py`, 1.62 M parameters), trained
generator-only as its reference code does: MRAE loss (`losses.mrae_loss`), Adam lr 4e-4
b=(0.9, 0.999), cosine annealing to 1e-6 over 300 x 1000 steps without warmup, batch 20 of
128x128 patches cut at stride 8 with random rot90/flip augmentation, no gradient clipping, no
accumulation, float32.
Data: ARAD-1K in the MST++ layout at HSI_DATA_DIR. Unlike the reference, validation and the
best model use the EMA weights (decay 0.999, as every recipe here).

  python -m cswin_jax.main --config=configs/mst_plus_plus.py --workdir=DIR

Official MST++ weights: `python -m cswin_jax.convert --torch mst_plus_plus.pth --out DIR`
(the architecture is recognised from the names), then predict/evaluate DIR or fine-tune with
--config.init_from=DIR.
"""

from configs import base, quickstart


def get_config(arg: str | None = None):
    """`arg` 'quickstart': MST++ at full size with this recipe's loss and optimizer, on the
    quick start's synthetic data, batch and schedule length (`bench/quality.py`)."""
    if arg not in (None, "", "quickstart"):
        raise ValueError(f"configs/mst_plus_plus.py:{arg}: unknown variant; use 'quickstart'")
    config = base.get_config()
    config.recipe = "mst_plus_plus"
    config.model.arch = "mst_plus_plus"
    base.generator_only(config)
    config.gradient_accumulation_steps = 1
    config.mixed_precision = False  # the reference trains in float32
    config.optim.generator_lr = 4e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.warmup_steps = 0
    config.optim.end_lr = 1e-6
    config.optim.grad_clip_norm = 0.0
    config.loss.lambda_rec = 0.0
    config.loss.lambda_mrae = 1.0
    if arg == "quickstart":
        config.recipe = "mst_plus_plus:quickstart"
        quickstart.quickstart_run(config)
    return config
