"""Base configuration: every key of the original CSWIN v2 trainer, original defaults.

All recipes (`gan.py`, `optimized.py`, `quickstart.py`) derive from this file.

Mapping from the original flat keys (config.yaml / code defaults) to this tree:

  original key                      here
  --------------------------------  -----------------------------------------
  seed                              seed
  dataset_source                    data.source  ('arad' | 'synthetic' | 'tfds')
  data_dir / log_dir / checkpoint_dir  data.data_dir / log_dir / checkpoint_dir
  batch_size                        batch_size
  patch_size, stride                data.patch_size, data.stride
  num_workers, memory_mode          data.num_workers, data.memory_mode
  (head) lazy_cache_size            data.lazy_cache_size
  (head) excluded_scene_stems       data.excluded_scenes
  epochs, iterations_per_epoch      epochs, iterations_per_epoch
  gradient_accumulation_steps       gradient_accumulation_steps
  n_critic, mixed_precision         n_critic, mixed_precision
  warmup_steps                      optim.warmup_steps
  generator_lr, discriminator_lr    optim.generator_lr, optim.discriminator_lr
  sinkhorn_epsilon / _iters / _max_points / _loss_clip
                                    sinkhorn.epsilon / iters / max_points / loss_clip
  use_r1_regularization, r1_gamma   loss.use_r1, loss.r1_gamma
  lambda_rec / _perceptual / _adversarial / _sam
                                    loss.lambda_rec / lambda_perceptual /
                                    lambda_adversarial / lambda_sam
  use_adaptive_weights, loss_warmup_iterations, max_loss_value
                                    loss.use_adaptive_weights, loss.warmup_iterations,
                                    loss.max_loss_value
  checkpoint_keep                   checkpoint_keep
  in_channels, out_channels, base_channels, split_sizes, norm_groups, num_heads,
  output_activation, activation_delay_iters, generator_clamp_range, clamp_after_iters
                                    model.<same name> (generator_clamp_range ->
                                    model.clamp_range)
  discriminator_base_dim / _num_heads / _num_blocks / _mlp_ratio / _dropout
                                    discriminator.base_dim / num_heads / num_blocks /
                                    mlp_ratio / dropout

No counterpart here (setting one is refused as an unknown key):
  val_batch_size         validation predicts one full frame per call, or the tiles of
                         eval.tile_batch_size (eval.tiled)
  sinkhorn_kernel_clamp  OTT's log-domain Sinkhorn solver has no kernel to clamp
  sinkhorn_force_fp32    the losses always run in float32, whatever mixed_precision says
A checkpoint whose saved config still holds them (data.val_batch_size, sinkhorn.kernel_clamp,
sinkhorn.force_fp32) restores as before: nothing compares those sections, and `complete`
drops them.

Not in the original: model.arch picks the generator ('cswin', the original's, or
'mst_plus_plus', MST++ with its keys in model.mst_plus_plus; see configs/mst_plus_plus.py).

This file holds the only defaults: the code reads every key without a fallback, and a config
saved by an older version (a checkpoint's) is completed with `complete(saved)`, which fills the
keys added since from here.

Paths default from the environment: HSI_DATA_DIR (./data/ARAD_1K), HSI_LOG_DIR
(./artifacts/logs), HSI_CKPT_DIR (./artifacts/checkpoints); the compilation cache from
JAX_COMPILATION_CACHE_DIR (~/.cache/cswin_jax/xla).
"""

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

# The keys most runs set, with one line each: `python -m cswin_jax.main --help` lists them.
MOST_USED_KEYS = (
    ("data.source", "'arad' (MST++ folder layout), 'synthetic' (generated, no download), 'tfds'"),
    ("data.data_dir", "dataset root (Train_RGB/, Train_Spec/, split_txt/ for 'arad')"),
    ("batch_size", "patches per micro-batch, split over all devices"),
    ("data.patch_size", "side of the square training patches"),
    ("epochs", "run length in epochs of iterations_per_epoch steps"),
    ("iterations_per_epoch", "steps between validations on the full frames"),
    ("optim.generator_lr", "peak generator learning rate (warm-up, then cosine decay)"),
    ("mixed_precision", "bfloat16 compute with float32 weights (False on CPU)"),
    ("model.base_channels", "generator width (its heads and splits: model.num_heads, ...)"),
    ("init_from", "start from these weights (a converted or finished checkpoint folder)"),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.recipe = "base"
    c.seed = 42

    # --- run length and batching (counted in generator optimizer steps) -------
    c.batch_size = 20
    c.epochs = 300
    c.iterations_per_epoch = 1000  # validation cadence, in training steps
    c.gradient_accumulation_steps = 2  # micro-batches per optimizer step
    c.n_critic = 1  # discriminator update every n_critic generator updates
    c.mixed_precision = True  # bfloat16 compute, float32 params/optimizer/losses
    c.max_consecutive_nonfinite = 10
    # Divergence guard (off by default): when a validation MRAE is not finite or above
    # mrae_factor x the best so far, the run goes back to the full training state saved with
    # the best model and multiplies both learning rates by lr_factor, at most max_rollbacks
    # times (then it warns and trains on). On, the best model is saved with that state.
    c.divergence_guard = ml_collections.ConfigDict()
    c.divergence_guard.enabled = False
    c.divergence_guard.mrae_factor = 1.5
    c.divergence_guard.lr_factor = 0.5
    c.divergence_guard.max_rollbacks = 3
    c.ema_decay = 0.999
    c.train_discriminator = True  # False: generator-only recipe (configs/optimized.py)

    # --- paths, logging, checkpoints --------------------------------------------
    c.log_dir = os.environ.get("HSI_LOG_DIR", "./artifacts/logs")
    c.checkpoint_dir = os.environ.get("HSI_CKPT_DIR", "./artifacts/checkpoints")
    # Persistent XLA compilation cache: a restarted or resumed run loads its compiled step
    # instead of recompiling (minutes on CPU). "" disables it.
    c.compilation_cache_dir = os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.join("~", ".cache", "cswin_jax", "xla")
    )
    c.checkpoint_every = 5000
    c.checkpoint_keep = 5
    c.log_every = 20
    c.init_from = ""  # weights-only initialisation (e.g. a converted PyTorch checkpoint)
    c.use_wandb = False
    c.wandb_project = "cswin-jax"

    # --- data -------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "arad"  # 'arad' (MST++ layout) | 'synthetic' | 'tfds'
    c.data.data_dir = os.environ.get("HSI_DATA_DIR", "./data/ARAD_1K")
    c.data.tfds_data_dir = ""  # where `arad1k` was prepared; '' = <data_dir>/tfds
    c.data.excluded_scenes = ["ARAD_1K_0314"]
    c.data.patch_size = 128
    c.data.stride = 8
    c.data.memory_mode = "standard"  # 'standard' | 'float16' | 'lazy'
    c.data.lazy_cache_size = 3
    c.data.num_workers = 2  # grain worker processes (0 = in-process)
    c.data.prefetch_buffer_size = 2
    c.data.max_valid_scenes = 0  # 0 = every validation scene
    # Cubes are rejected at load (file and counts named) when a value is below
    # -negative_tolerance (a sign error on export), above max_value (unscaled counts), NaN/Inf,
    # or when a whole cube is zero.
    c.data.negative_tolerance = 0.01
    c.data.max_value = 10.0
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_train = 8
    c.data.synthetic.num_valid = 2
    c.data.synthetic.height = 482
    c.data.synthetic.width = 512
    c.data.synthetic.seed = 0

    # --- generator --------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # 'cswin' (the CSWIN v2 generator, keys below) | 'mst_plus_plus' (MST++, generator-only:
    # its own keys in model.mst_plus_plus; recipe configs/mst_plus_plus.py)
    c.model.arch = "cswin"
    c.model.in_channels = 3
    c.model.out_channels = 31
    c.model.base_channels = 64
    c.model.split_sizes = (7, 7, 7)
    c.model.norm_groups = 8
    c.model.num_heads = 4
    # Dual-attention blocks in each of the five stages: 2 in the original (fixed there);
    # fewer gives a lighter model (the tests use 1: half the program to compile).
    c.model.blocks_per_stage = 2
    c.model.output_activation = "none"  # none | sigmoid | tanh | delayed_sigmoid
    c.model.activation_delay_iters = 20000
    c.model.clamp_range = 10.0  # original: generator_clamp_range
    c.model.clamp_after_iters = 0
    c.model.attention_mode = "v2"  # 'v2' (original row/column) | 'cswin' (paper stripes)
    c.model.remat = "none"  # none | attention | block
    # MST++ (model.arch='mst_plus_plus'); the official MST_Plus_Plus() defaults.
    c.model.mst_plus_plus = ml_collections.ConfigDict()
    c.model.mst_plus_plus.n_feat = 31  # SST width (must equal out_channels)
    c.model.mst_plus_plus.stage = 3  # cascaded SSTs
    c.model.mst_plus_plus.sst_stage = 2  # U-net levels of each SST
    c.model.mst_plus_plus.num_blocks = (1, 1, 1)  # blocks per encoder level, then bottleneck

    # --- discriminator ----------------------------------------------------------
    c.discriminator = ml_collections.ConfigDict()
    c.discriminator.base_dim = 64
    c.discriminator.num_heads = 8
    c.discriminator.num_blocks = (2, 2, 2)
    c.discriminator.mlp_ratio = 2.0
    c.discriminator.dropout = 0.0
    c.discriminator.remat = False  # recompute whole discriminator blocks in the backward pass

    # --- optimisation -----------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.generator_lr = 2e-4
    c.optim.discriminator_lr = 5e-5
    c.optim.b1 = 0.5
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 2000
    c.optim.end_lr = 1e-6
    c.optim.grad_clip_norm = 1.0  # 0 = no clipping
    c.optim.total_steps = 0  # 0 = epochs * iterations_per_epoch

    # --- losses -----------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.lambda_rec = 1.0
    c.loss.lambda_perceptual = 0.0
    c.loss.lambda_adversarial = 0.1
    c.loss.lambda_sam = 0.05
    c.loss.lambda_mrae = 0.0
    c.loss.use_adaptive_weights = True
    c.loss.warmup_iterations = 5000  # original: loss_warmup_iterations
    c.loss.adaptive_ramp_iterations = 50000
    c.loss.max_loss_value = 100.0
    c.loss.use_r1 = True  # original: use_r1_regularization
    c.loss.r1_gamma = 10.0
    c.loss.r1_interval = 16  # lazy R1: every 16 discriminator steps, scaled by 16
    # R1's double backward over this many slices of the batch in turn (same value; less
    # memory, slower R1 steps). Must divide batch_size.
    c.loss.r1_chunks = 1

    c.sinkhorn = ml_collections.ConfigDict()
    c.sinkhorn.epsilon = 0.1
    c.sinkhorn.iters = 50
    c.sinkhorn.max_points = 1024
    c.sinkhorn.loss_clip = 5.0
    # Not in the original: the floor of the joint max-|value| rescale of the two clouds. The
    # original floored at 1e-6, which amplified gradients by 1/scale (about 100x at
    # initialisation, when the discriminator's logits are ~1e-2) and overflowed fp16; its later
    # fix floors at 1.0, so small logits are left as they are and only clouds wider than
    # [-1, 1] are shrunk into it.
    c.sinkhorn.rescale_floor = 1.0
    # Not in the original: the marginal-error threshold (L1) at which OTT's Sinkhorn stops. On
    # 1-D clouds in [-1, 1] with epsilon 0.1 it is reached in 10-30 iterations, inside the cap
    # of sinkhorn.iters. At OTT's default 1e-3 the implicit gradients of 1024-point clouds were
    # 1.8e-4 (relative to their max) off a float64 oracle; at 1e-5 they are within 6e-6 and
    # the values within 1e-6.
    c.sinkhorn.threshold = 1e-5

    # --- validation / evaluation -------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.clamp_predictions = False
    c.eval.tiled = False
    c.eval.tile_size = 128
    c.eval.tile_overlap = 16
    c.eval.tile_batch_size = 4
    # The per-pixel polynomial floor (cswin_jax/floor.py), fit on floor_pixels training
    # pixels drawn with floor_seed: logged as floor/order<k>/* scalars when a fresh run starts
    # (floor=False skips it) and printed by evaluate beside the model.
    c.eval.floor = True
    c.eval.floor_orders = (1, 2, 3)
    c.eval.floor_pixels = 32768
    c.eval.floor_seed = 0
    return c


def generator_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns `config` into a generator-only recipe: no discriminator, no adversarial, SAM or R1
    term, fixed loss weights (the reconstruction terms lambda_rec / lambda_mrae stay)."""
    config.train_discriminator = False
    config.loss.use_adaptive_weights = False
    config.loss.lambda_adversarial = 0.0
    config.loss.lambda_sam = 0.0
    config.loss.use_r1 = False
    return config


def complete(
    saved: Mapping[str, Any] | ml_collections.ConfigDict | None,
) -> ml_collections.ConfigDict:
    """A saved config (a checkpoint's dict, or a ConfigDict) over the defaults of `get_config()`.

    Keys the saved config lacks (it was written before they existed) get this file's defaults;
    keys this file no longer has (removed settings such as data.val_batch_size) are dropped;
    every other value is the saved one, and lists that JSON made of this file's tuples are
    tuples again. Call it once where a saved config is loaded: the code that reads the result
    has no fallbacks. A default that changes must keep the behaviour older configs had.
    """
    if isinstance(saved, ml_collections.ConfigDict):
        saved = saved.to_dict()
    return ml_collections.ConfigDict(_overlay(get_config().to_dict(), saved or {}))


def _overlay(defaults: dict, saved: Mapping[str, Any]) -> dict:
    merged = {}
    for key, default in defaults.items():
        if key not in saved:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(saved[key], Mapping):
            merged[key] = _overlay(default, saved[key])
        elif isinstance(default, tuple) and isinstance(saved[key], list):
            merged[key] = tuple(saved[key])
        else:
            merged[key] = saved[key]
    return merged
