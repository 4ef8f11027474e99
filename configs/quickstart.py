"""Quick start: a small Sinkhorn-GAN on the embedded synthetic data, about 13 min on 2 CPU cores.

Generates 32 training and 8 validation 482x512 synthetic scenes into the workdir on first use
(no download), trains a narrow generator (one dual-attention block per stage) against a narrow
discriminator for 800 steps on 32x32 patches and validates at steps 400 and 800 on the full
validation frames (centre-crop protocol).

  python -m cswin_jax.main --config=configs/quickstart.py --workdir=/tmp/cswin_quickstart

What the choices are for (the README's "Model quality" section has the measured ablation):
* MRAE beside Charbonnier in the generator loss: the benchmark scores relative error, which
  Charbonnier alone leaves to the bright bands (on the old 8 + 2 scenes, 300 steps: validation
  MRAE 0.615 with Charbonnier alone, 0.435 with MRAE).
* One block per stage (generator) and per discriminator stage: about half the step and
  compile time, so more steps fit in the same minutes, which a short run needs more than depth.
* 32 training scenes: light source, camera and exposure differ per scene, and each scene's
  cube is scaled by its own maximum; 8 scenes sample that too thinly to generalise from.
* 8 validation scenes: with 2, one scene's scale error decided the figure (0.38 to 0.43
  between checkpoints 250 steps apart).
* No R1 (lazy R1 is its own compiled step program: one more long compile here).
* `configs/quickstart.py:generator` is the same run without the discriminator.
"""

from configs import base

VARIANTS = ("gan", "generator")


def get_config(arg: str | None = None):
    """`arg`: 'gan' (default) or 'generator' (the same generator, data and schedule trained
    without the discriminator: `--config=configs/quickstart.py:generator`)."""
    variant = arg or "gan"
    if variant not in VARIANTS:
        raise ValueError(f"configs/quickstart.py:{arg}: unknown variant; use one of {VARIANTS}")
    config = base.get_config()
    config.recipe = "quickstart" if variant == "gan" else "quickstart:generator"
    quickstart_run(config)
    config.model.base_channels = 16
    config.model.num_heads = 2
    config.model.split_sizes = (4, 4, 4)
    config.model.norm_groups = 4
    config.model.blocks_per_stage = 1
    config.discriminator.base_dim = 16
    config.discriminator.num_heads = 2
    config.discriminator.num_blocks = (1, 1, 1)
    config.optim.generator_lr = 1e-3
    config.optim.discriminator_lr = 2e-4
    config.optim.warmup_steps = 20
    config.loss.lambda_mrae = 1.0
    config.loss.warmup_iterations = 100
    config.sinkhorn.max_points = 64
    # No R1: a step with R1 is its own compiled program (see cswin_jax/train.py), one more
    # long compile for a penalty that would fire 50 times in this 800-step run. The Sinkhorn
    # adversarial term, the discriminator and its spectral norm are all there; configs/gan.py
    # keeps lazy R1.
    config.loss.use_r1 = False
    if variant == "generator":
        base.generator_only(config)
        config.optim.b1 = 0.9
    return config


def quickstart_run(config):
    """The quick start's data, batch, length and cadence (shared with the MST++ quick recipe)."""
    config.data.source = "synthetic"
    config.data.synthetic.num_train = 32
    config.data.synthetic.num_valid = 8
    config.data.patch_size = 32
    config.data.num_workers = 0
    config.batch_size = 8
    config.gradient_accumulation_steps = 1
    config.mixed_precision = False  # bfloat16 brings no speed on CPU
    config.epochs = 2
    config.iterations_per_epoch = 400
    config.checkpoint_every = 200
    config.log_every = 50
    # Validation and the best model use the EMA weights. At the recipes' 0.999 they would still
    # be ~37 % the initial weights after 1000 steps; 0.99 averages over the last ~100 steps.
    config.ema_decay = 0.99
    return config
