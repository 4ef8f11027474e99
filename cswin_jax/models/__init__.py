"""Flax networks: the generators (RGB -> HSI) and the spectral-norm discriminator.

`config.model.arch` names the generator: 'cswin' (`generator.py`, the CSWIN v2 U-Net) or
'mst_plus_plus' (`mst_plus_plus.py`, MST++). `build_generator(config.model)` builds it; both
are called as `model.apply({'params': p}, rgb, train=..., step=...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cswin_jax import config_checks

# What each architecture is called in messages.
ARCHITECTURE_NAMES = {"cswin": "CSWin", "mst_plus_plus": "MST++"}
# The recipe to name in messages about weights of each architecture.
RECIPES = {
    "cswin": "a CSWin config (e.g. --config=configs/optimized.py)",
    "mst_plus_plus": "--config=configs/mst_plus_plus.py",
}
# The config section only one architecture reads (dropped from the other's signature).
_OWN_SECTIONS = {"mst_plus_plus": "mst_plus_plus"}
# The architecture of a config saved before `model.arch` existed: CSWin was the only one then
# (whatever configs/base.py's default for new configs is).
ARCH_BEFORE_THE_KEY = "cswin"


def architecture(model_cfg: Any) -> str:
    """`model_cfg.arch`, of a run's or a saved config (`ARCH_BEFORE_THE_KEY` when a saved one
    predates the key, or has no model section). The names are checked by
    `config_checks.check_model`."""
    if model_cfg is None:
        return ARCH_BEFORE_THE_KEY
    return str(model_cfg.get("arch", ARCH_BEFORE_THE_KEY))


def build_generator(model_cfg: Any, dtype: Any = None):
    """The generator `config.model.arch` names, built from `config.model` (compute `dtype`,
    float32 by default). Every key is read, none has a fallback: a config saved before a key
    existed is completed first (`configs.base.complete`)."""
    import jax.numpy as jnp  # noqa: PLC0415

    config_checks.check_model(model_cfg)
    dtype = jnp.float32 if dtype is None else dtype
    if model_cfg["arch"] == "mst_plus_plus":
        from cswin_jax.models import mst_plus_plus  # noqa: PLC0415

        return mst_plus_plus.build_mst_plus_plus(model_cfg, dtype=dtype)
    from cswin_jax.models import generator  # noqa: PLC0415

    return generator.build_generator(model_cfg, dtype=dtype)


def architecture_signature(model_cfg: Mapping | None) -> dict:
    """The `config.model` entries that decide whether two runs hold the same generator: all of
    them, with `arch` filled in and the other architecture's own section dropped (so a CSWin
    config written before MST++ existed matches today's)."""
    model = dict(model_cfg or {})
    arch = architecture(model)
    model["arch"] = arch
    for other, section in _OWN_SECTIONS.items():
        if other != arch:
            model.pop(section, None)
    return model


def architecture_mismatch(
    saved_model_cfg: Any, model_cfg: Any, source: str, fix: str | None = None
) -> str | None:
    """One line when `source` (weights whose config.model is `saved_model_cfg`) holds another
    generator architecture than `model_cfg` builds, else None.

    The line names both architectures and ends with `fix` (default: the recipe to use with
    those weights).
    """
    saved = architecture(saved_model_cfg)
    wanted = architecture(model_cfg)
    if saved == wanted:
        return None
    fix = fix or f"use {RECIPES[saved]} with it"
    return (
        f"{source} holds {ARCHITECTURE_NAMES[saved]} generator weights (model.arch={saved!r}), "
        f"this config builds {ARCHITECTURE_NAMES[wanted]} (model.arch={wanted!r}); {fix}"
    )
