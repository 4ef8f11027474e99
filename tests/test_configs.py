"""Configs (`configs/*.py`): the original trainer's keys and defaults, env paths, recipes."""

import json
import re

import ml_collections
import pytest

from configs import base, gan, mst_plus_plus, optimized, quickstart
from cswin_jax import config_checks, models, schedule
from tests.train_setup import tiny_config

# The original trainer's flat keys and defaults (issue #2 item 8), with where each lives here
# (val_batch_size, sinkhorn_kernel_clamp and sinkhorn_force_fp32 have none: REMOVED_KEYS).
ORIGINAL_DEFAULTS = {
    "seed": 42,
    "batch_size": 20,
    "data.patch_size": 128,
    "data.stride": 8,
    "epochs": 300,
    "iterations_per_epoch": 1000,
    "gradient_accumulation_steps": 2,
    "data.num_workers": 2,
    "n_critic": 1,
    "mixed_precision": True,
    "data.memory_mode": "standard",
    "optim.warmup_steps": 2000,
    "optim.generator_lr": 2e-4,
    "optim.discriminator_lr": 5e-5,
    "sinkhorn.epsilon": 0.1,
    "sinkhorn.iters": 50,
    "sinkhorn.max_points": 1024,
    "sinkhorn.loss_clip": 5.0,
    "loss.use_r1": True,
    "loss.r1_gamma": 10.0,
    "loss.lambda_rec": 1.0,
    "loss.lambda_perceptual": 0.0,
    "loss.lambda_adversarial": 0.1,
    "loss.lambda_sam": 0.05,
    "checkpoint_keep": 5,
    "model.in_channels": 3,
    "model.out_channels": 31,
    "model.base_channels": 64,
    "model.split_sizes": (7, 7, 7),
    "model.norm_groups": 8,
    "model.num_heads": 4,
    "model.output_activation": "none",
    "model.activation_delay_iters": 20000,
    "model.clamp_range": 10.0,
    "model.clamp_after_iters": 0,
    "discriminator.base_dim": 64,
    "discriminator.num_heads": 8,
    "discriminator.num_blocks": (2, 2, 2),
    "discriminator.mlp_ratio": 2.0,
    "discriminator.dropout": 0.0,
    "data.excluded_scenes": ["ARAD_1K_0314"],
}


# Settings of the original without effect here, removed from configs/base.py (its docstring
# says why); older checkpoints' saved configs still hold them.
REMOVED_KEYS = ("data.val_batch_size", "sinkhorn.kernel_clamp", "sinkhorn.force_fp32")
RECIPES = [
    (base, None),
    (gan, None),
    (optimized, None),
    (quickstart, None),
    (quickstart, "generator"),
    (mst_plus_plus, None),
    (mst_plus_plus, "quickstart"),
]


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("module", [base, gan])
def test_original_defaults(module):
    config = module.get_config()
    assert isinstance(config, ml_collections.ConfigDict)
    for key, value in ORIGINAL_DEFAULTS.items():
        got = _get(config, key)
        assert got == value and type(got) is type(value), f"{key}: {got!r} != {value!r}"


def test_paths_default_from_the_environment(monkeypatch, tmp_path):
    for var in ("HSI_DATA_DIR", "HSI_LOG_DIR", "HSI_CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    config = base.get_config()
    assert config.data.data_dir == "./data/ARAD_1K"
    assert config.log_dir == "./artifacts/logs"
    assert config.checkpoint_dir == "./artifacts/checkpoints"
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "arad"))
    monkeypatch.setenv("HSI_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("HSI_CKPT_DIR", str(tmp_path / "ckpt"))
    config = base.get_config()  # read at call time
    assert config.data.data_dir == str(tmp_path / "arad")
    assert config.log_dir == str(tmp_path / "logs")
    assert config.checkpoint_dir == str(tmp_path / "ckpt")


def test_recipes():
    g, o, q = gan.get_config(), optimized.get_config(), quickstart.get_config()
    assert (g.recipe, o.recipe, q.recipe) == ("gan", "optimized", "quickstart")
    # gan: the Sinkhorn-GAN defaults.
    assert g.train_discriminator and (g.optim.b1, g.optim.b2) == (0.5, 0.999)
    assert g.ema_decay == 0.999 and g.optim.end_lr == 1e-6
    # optimized: generator only, Charbonnier, Adam (0.9, 0.999) 4e-4, cosine over 300k, remat.
    assert not o.train_discriminator and o.loss.lambda_adversarial == 0.0
    assert (o.optim.b1, o.optim.b2, o.optim.generator_lr) == (0.9, 0.999, 4e-4)
    assert o.optim.total_steps == 300_000 and o.model.remat != "none"
    # quickstart: synthetic data, small widths, a few hundred steps.
    assert q.data.source == "synthetic" and q.model.base_channels < 64
    assert q.epochs * q.iterations_per_epoch <= 1000


def test_mst_plus_plus_recipe():
    """configs/mst_plus_plus.py: the MST++ reference recipe, generator-only."""
    m = mst_plus_plus.get_config()
    assert m.recipe == "mst_plus_plus" and m.model.arch == "mst_plus_plus"
    assert base.get_config().model.arch == "cswin"
    assert not m.train_discriminator and m.gradient_accumulation_steps == 1
    assert (m.loss.lambda_rec, m.loss.lambda_mrae) == (0.0, 1.0)
    assert m.loss.lambda_adversarial == m.loss.lambda_sam == 0.0 and not m.loss.use_r1
    assert (m.optim.generator_lr, m.optim.b1, m.optim.b2) == (4e-4, 0.9, 0.999)
    assert m.optim.warmup_steps == 0 and m.optim.end_lr == 1e-6 and m.optim.grad_clip_norm == 0
    assert m.epochs * m.iterations_per_epoch == 300_000 and m.optim.total_steps == 0
    assert (m.batch_size, m.data.patch_size, m.data.stride) == (20, 128, 8)
    assert m.ema_decay == base.get_config().ema_decay and not m.mixed_precision
    assert m.model.mst_plus_plus.to_dict() == {
        "n_feat": 31,
        "stage": 3,
        "sst_stage": 2,
        "num_blocks": (1, 1, 1),
    }


def test_configs_are_locked_against_typos():
    """A misspelt key fails at override time (config_flags locks the ConfigDict)."""
    config = base.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="batch_sizee"):
        config.batch_sizee = 4


def test_quickstart_variants():
    """configs/quickstart.py:generator is the quick start's generator, data and schedule without
    the discriminator; mst_plus_plus.py:quickstart is MST++'s recipe on the quick start's run."""
    q, g = quickstart.get_config(), quickstart.get_config("generator")
    assert q.train_discriminator and q.loss.lambda_adversarial > 0
    assert not q.loss.use_r1  # one compiled step program (schedule.step_kinds)
    assert schedule.step_kinds(q, 0, 800) == [schedule.PLAIN_STEP]
    assert not g.train_discriminator and not g.loss.use_r1 and g.loss.lambda_adversarial == 0
    assert g.model.to_dict() == q.model.to_dict() and g.data.to_dict() == q.data.to_dict()
    assert (g.loss.lambda_rec, g.loss.lambda_mrae) == (q.loss.lambda_rec, q.loss.lambda_mrae)
    assert g.epochs * g.iterations_per_epoch == q.epochs * q.iterations_per_epoch
    m = mst_plus_plus.get_config("quickstart")
    assert m.model.arch == "mst_plus_plus" and not m.train_discriminator
    assert m.model.mst_plus_plus == mst_plus_plus.get_config().model.mst_plus_plus
    assert m.data.to_dict() == q.data.to_dict() and m.batch_size == q.batch_size
    assert (m.epochs, m.iterations_per_epoch, m.ema_decay) == (
        q.epochs,
        q.iterations_per_epoch,
        q.ema_decay,
    )
    for module, arg in ((quickstart, "gann"), (mst_plus_plus, "tiny")):
        with pytest.raises(ValueError, match=f":{arg}: unknown variant"):
            module.get_config(arg)


@pytest.mark.parametrize(("module", "arg"), RECIPES)
def test_recipes_are_valid_and_survive_a_checkpoint(module, arg):
    """Every recipe passes `config_checks.validate_config`, has none of the removed keys, and
    comes back unchanged from a checkpoint's JSON through `base.complete`."""
    config = module.get_config(arg)
    config_checks.validate_config(config, num_devices=1)
    for key in REMOVED_KEYS:
        section, leaf = key.split(".")
        assert leaf not in config[section], key
    saved = json.loads(json.dumps(config.to_dict()))  # tuples come back as lists
    assert base.complete(saved).to_dict() == config.to_dict()


def _older_saved_config() -> dict:
    """Today's base config as a checkpoint from before model.arch, model.mst_plus_plus,
    model.attention_mode, model.remat, model.blocks_per_stage and discriminator.remat existed,
    still holding the removed keys."""
    saved = json.loads(json.dumps(base.get_config().to_dict()))
    for key in ("arch", "mst_plus_plus", "attention_mode", "remat", "blocks_per_stage"):
        del saved["model"][key]
    del saved["discriminator"]["remat"]
    saved["data"]["val_batch_size"] = 4
    saved["sinkhorn"].update(kernel_clamp=60.0, force_fp32=True)
    saved["model"]["base_channels"] = 32
    return saved


def test_complete_fills_missing_keys_and_drops_removed_ones():
    saved = _older_saved_config()
    with pytest.raises(KeyError):  # the builders have no fallbacks
        models.build_generator(saved["model"])
    config = base.complete(saved)
    defaults = base.get_config()
    assert config.model.base_channels == 32  # saved values win
    for key in ("arch", "attention_mode", "remat", "blocks_per_stage", "mst_plus_plus"):
        assert config.model[key] == defaults.model[key], key
    assert config.discriminator.remat is False
    assert config.model.split_sizes == (7, 7, 7)  # a tuple again
    for key in REMOVED_KEYS:
        section, leaf = key.split(".")
        assert leaf not in config[section], key
    config_checks.validate_config(config, num_devices=1)
    assert models.build_generator(config.model).base_channels == 32
    assert base.complete(None).to_dict() == defaults.to_dict()
    assert base.complete(config).to_dict() == config.to_dict()  # a ConfigDict too


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_critic", 0, "config.n_critic: must be >= 1"),
        ("batch_size", 0, "config.batch_size: must be >= 1, got 0"),
        ("iterations_per_epoch", 0, "config.epochs: epochs * iterations_per_epoch"),
        ("ema_decay", 1.0, "config.ema_decay: must be in [0, 1), got 1.0"),
        ("model.blocks_per_stage", 0, "config.model.blocks_per_stage: must be >= 1, got 0"),
        ("model.remat", "all", "config.model.remat: unknown value 'all'; use one of none,"),
        ("data.source", "hf", "unknown data.source 'hf': use one of ('arad', 'synthetic', 'tfds')"),
        ("data.memory_mode", "ssd", "unknown data.memory_mode 'ssd': use one of ['standard',"),
        ("data.patch_size", 0, "data.patch_size (0) and data.stride (8) must be positive"),
        ("loss.r1_chunks", 3, "config.loss.r1_chunks: 3 must be >= 1 and divide batch_size"),
        ("sinkhorn.epsilon", -1.0, "config.sinkhorn.epsilon: must be > 0, got -1.0"),
    ],
)
def test_validate_config_names_the_key_and_the_fix(key, value, message):
    """`config_checks.validate_config` holds every rule; `train.make_setup` runs all but the data
    rules (`check_training`), the data pipeline the data rules (`check_data`)."""
    config = base.get_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        config_checks.validate_config(config, num_devices=1)
    if section == "data":
        config_checks.check_training(config)
    else:
        config_checks.check_data(config.data)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("n_critic", 0, "n_critic"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
        ("batch_size", 6, "not divisible by the 8 devices"),
        ("loss.r1_chunks", 3, "r1_chunks: 3 must be >= 1 and divide batch_size"),
    ],
)
def test_invalid_config_is_rejected(key, value, match):
    config = tiny_config()
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        config_checks.validate_config(config, num_devices=8)
