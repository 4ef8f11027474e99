"""Config validation: every rule about the values of a run's config, in one place.

`validate_config(config, num_devices)` checks a whole config (the training loop calls it with
the mesh size). The code that reads only part of a config checks that part:
`check_training` (all but `config.data`: `train.make_setup`), `check_model(config.model)` (the
generator builders) and `check_data(config.data)` (the data pipeline). Each rejection is one
`ValueError` that names the key and the fix.

The modules that use the values hold no checks of them, only guards of their own arguments at
trace time (an input's shape, channels that do not divide into groups, ...). Defaults live in
`configs/base.py` alone: every key is read directly, and a config saved before a key existed
is completed with `configs.base.complete` where it is loaded.

Light on purpose (no JAX at import): `cswin_jax.models` imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The values each choice key takes.
ARCHITECTURES = ("cswin", "mst_plus_plus")  # model.arch
OUTPUT_ACTIVATIONS = ("none", "sigmoid", "tanh", "delayed_sigmoid")  # model.output_activation
ATTENTION_MODES = ("v2", "cswin")  # model.attention_mode
REMAT_POLICIES = ("none", "attention", "block")  # model.remat
SOURCES = ("arad", "synthetic", "tfds")  # data.source
MEMORY_MODES = ("standard", "float16", "lazy")  # data.memory_mode


def choice(value: Any) -> str:
    """A choice key's value as it is compared (data.source and data.memory_mode ignore case
    and surrounding blanks)."""
    return str(value).strip().lower()


def _fail(key: str, message: str):
    raise ValueError(f"config.{key}: {message}")


def _one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(key, f"unknown value {value!r}; use one of {', '.join(allowed)}")


def validate_config(config: Any, num_devices: int | None = None) -> None:
    """Rejects settings a run cannot use, naming the key and the fix.

    `num_devices`: the devices of the mesh the batch is split over (None: not checked).
    """
    check_training(config, num_devices)
    check_data(config.data)
    _check_divergence_guard(config.divergence_guard)


def _check_divergence_guard(guard: Any) -> None:
    """`config.divergence_guard`, which only the host loop reads."""
    if guard.mrae_factor < 1.0:
        _fail(
            "divergence_guard.mrae_factor",
            f"must be >= 1 (a validation MRAE above this multiple of the best rolls the run "
            f"back), got {guard.mrae_factor}",
        )
    if not 0.0 < guard.lr_factor <= 1.0:
        _fail("divergence_guard.lr_factor", f"must be in (0, 1], got {guard.lr_factor}")
    if guard.max_rollbacks < 0:
        _fail("divergence_guard.max_rollbacks", f"must be >= 0, got {guard.max_rollbacks}")


def check_training(config: Any, num_devices: int | None = None) -> None:
    """All of `validate_config` but `config.data`: what `train.make_setup` reads."""
    import jax  # noqa: PLC0415  (keeps `import cswin_jax.models` free of JAX)

    if config.n_critic < 1:
        _fail(
            "n_critic",
            f"must be >= 1 (one discriminator step every n_critic generator "
            f"steps), got {config.n_critic}",
        )
    if config.gradient_accumulation_steps < 1:
        _fail(
            "gradient_accumulation_steps", f"must be >= 1, got {config.gradient_accumulation_steps}"
        )
    if config.batch_size < 1:
        _fail("batch_size", f"must be >= 1, got {config.batch_size}")
    if num_devices is not None and config.batch_size % num_devices:
        _fail(
            "batch_size",
            f"{config.batch_size} is not divisible by the {num_devices} devices "
            f"of the mesh; use a multiple of {num_devices}",
        )
    if config.batch_size % jax.process_count():
        _fail(
            "batch_size",
            f"{config.batch_size} is not divisible by the {jax.process_count()} processes",
        )
    # The run length `schedule.total_steps` computes.
    if (config.optim.total_steps or config.epochs * config.iterations_per_epoch) < 1:
        _fail("epochs", "epochs * iterations_per_epoch (or optim.total_steps) must be >= 1")
    if config.iterations_per_epoch < 1:
        _fail("iterations_per_epoch", f"must be >= 1, got {config.iterations_per_epoch}")
    if not 0.0 <= config.ema_decay < 1.0:
        _fail("ema_decay", f"must be in [0, 1), got {config.ema_decay}")
    check_model(config.model)
    if config.model.arch == "mst_plus_plus" and config.train_discriminator:
        _fail(
            "train_discriminator",
            "MST++ (model.arch='mst_plus_plus') is trained generator-only; set "
            "--config.train_discriminator=False (configs/mst_plus_plus.py does)",
        )
    _check_losses(config)


def check_model(model_cfg: Any, arch: str | None = None) -> None:
    """`config.model`: the keys that architecture `arch` reads (default: the one `model.arch`
    names, itself checked)."""
    if arch is None:
        arch = model_cfg["arch"]
        if arch not in ARCHITECTURES:
            _fail(
                "model.arch",
                f"unknown architecture {arch!r}; valid names: " + ", ".join(ARCHITECTURES),
            )
    _one_of("model.remat", model_cfg["remat"], REMAT_POLICIES)
    if arch == "mst_plus_plus":
        _check_mst_plus_plus(model_cfg)
        return
    _one_of("model.output_activation", model_cfg["output_activation"], OUTPUT_ACTIVATIONS)
    _one_of("model.attention_mode", model_cfg["attention_mode"], ATTENTION_MODES)
    if model_cfg["blocks_per_stage"] < 1:
        _fail("model.blocks_per_stage", f"must be >= 1, got {model_cfg['blocks_per_stage']}")
    if not len(model_cfg["split_sizes"]):
        _fail("model.split_sizes", "must hold at least one split size, got []")


def _check_mst_plus_plus(model_cfg: Any) -> None:
    mst = model_cfg["mst_plus_plus"]
    n_feat, stage, sst_stage = mst["n_feat"], mst["stage"], mst["sst_stage"]
    num_blocks = tuple(mst["num_blocks"])
    if n_feat < 1 or stage < 1 or sst_stage < 1:
        _fail(
            "model.mst_plus_plus",
            f"n_feat, stage and sst_stage must be >= 1, got {n_feat}, {stage}, {sst_stage}",
        )
    if len(num_blocks) != sst_stage + 1 or min(num_blocks) < 1:
        _fail(
            "model.mst_plus_plus.num_blocks",
            f"expected {sst_stage + 1} counts >= 1 (one per encoder level, then the "
            f"bottleneck), got {num_blocks}",
        )
    if model_cfg["out_channels"] != n_feat:
        _fail(
            "model.mst_plus_plus.n_feat",
            "the output adds conv_in's features, so n_feat must equal model.out_channels "
            f"({model_cfg['out_channels']}), got {n_feat}",
        )


def check_data(data_cfg: Any) -> None:
    """`config.data`: the source, the memory mode and the patch grid."""
    if choice(data_cfg.source) not in SOURCES:
        raise ValueError(f"unknown data.source {data_cfg.source!r}: use one of {SOURCES}")
    if choice(data_cfg.memory_mode) not in MEMORY_MODES:
        raise ValueError(
            f"unknown data.memory_mode {data_cfg.memory_mode!r}: use one of {list(MEMORY_MODES)}"
        )
    try:
        size = int(data_cfg.lazy_cache_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(
            f"data.lazy_cache_size must be a positive integer, got {data_cfg.lazy_cache_size!r}"
        )
    if data_cfg.patch_size < 1 or data_cfg.stride < 1:
        raise ValueError(
            f"data.patch_size ({data_cfg.patch_size}) and data.stride ({data_cfg.stride}) must "
            "be positive"
        )


def _check_losses(config: Any) -> None:
    loss, sinkhorn = config.loss, config.sinkhorn
    if loss.r1_chunks < 1 or config.batch_size % loss.r1_chunks:
        _fail("loss.r1_chunks", f"{loss.r1_chunks} must be >= 1 and divide batch_size")
    if not config.train_discriminator:
        # Generator-only: the GAN loss and the Sinkhorn settings are not read.
        if not (loss.lambda_rec or loss.lambda_mrae):
            _fail(
                "loss.lambda_rec",
                "generator-only training needs loss.lambda_rec (Charbonnier) or "
                "loss.lambda_mrae > 0; both are 0",
            )
        return
    if loss.lambda_perceptual > 0:
        _fail(
            "loss.lambda_perceptual",
            f"{loss.lambda_perceptual}, but no perceptual feature extractor is available in "
            "cswin_jax (the original shipped none either); set loss.lambda_perceptual = 0.0",
        )
    if sinkhorn.epsilon <= 0:
        _fail("sinkhorn.epsilon", f"must be > 0, got {sinkhorn.epsilon}")
    if sinkhorn.iters < 1:
        _fail("sinkhorn.iters", f"must be >= 1, got {sinkhorn.iters}")
