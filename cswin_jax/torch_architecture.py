"""What architecture an original checkpoint holds: from the original trainer's saved config
(`ORIGINAL_CONFIG_KEYS`) and from the PyTorch tensors' names and shapes, as
`{config key: (value, evidence)}` that `cswin_jax.convert` applies to a recipe.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections.config_flags import config_path

from cswin_jax import cli


def detect_architecture(state: Mapping[str, Any]) -> str | None:
    """The generator architecture (`config.model.arch`) a generator state_dict comes from:
    'mst_plus_plus' (`conv_in.*`, `body.<k>.*`), 'cswin' (`denoising.*`, `embedding.*`), or
    None when the names fit neither."""
    if "conv_in.weight" in state and any(n.startswith("body.") for n in state):
        return "mst_plus_plus"
    if any(n.startswith(("denoising.", "embedding.")) for n in state):
        return "cswin"
    return None


# --- the architecture a checkpoint records: {config key: (value, evidence)} -------------------

# The original trainers' flat config keys (`checkpoint['config']`) -> this project's keys.
ORIGINAL_CONFIG_KEYS = {
    **{k: f"model.{k}" for k in ("in_channels", "out_channels", "base_channels", "split_sizes",
                                 "norm_groups", "num_heads", "output_activation",
                                 "activation_delay_iters", "clamp_after_iters")},
    "generator_clamp_range": "model.clamp_range",
    **{f"discriminator_{k}": f"discriminator.{k}"
       for k in ("base_dim", "num_heads", "num_blocks", "mlp_ratio", "dropout")},
}  # fmt: skip
# CSWin keys that change the outputs but that a bare state_dict does not record.
NOT_IN_WEIGHTS = ("model.norm_groups", "model.output_activation")


def _plain(value: Any) -> Any:
    """JSON / numpy / omegaconf values as plain Python, sequences as tuples (for comparing)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _count(names, prefix: str) -> int:
    """How many distinct `<prefix><i>.` indices `names` hold ('encoder1.' -> 2)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for n in names if (m := pattern.match(n))})


def _take_shape(found, state, key, name, value_of=lambda dims: dims[0]) -> None:
    if name in state:
        dims = tuple(np.shape(state[name]))
        found[key] = (value_of(dims), f"{name} {dims}")


def _take_counts(found, state, key, prefixes) -> None:
    counts = tuple(_count(state, p) for p in prefixes)
    if counts and all(counts):
        found[key] = (counts if len(counts) > 1 else counts[0], f"the {prefixes[0]}<i> names")


def _infer_cswin(state, found) -> None:
    _take_shape(found, state, "model.base_channels", "embedding.0.weight")
    _take_shape(found, state, "model.in_channels", "embedding.0.weight", lambda dims: dims[1])
    _take_shape(found, state, "model.out_channels", "to_spectral.weight")
    _take_counts(found, state, "model.blocks_per_stage", ["encoder1."])
    table = ".0.spatial_attn.attention.relative_position_bias_table_h"  # (2s-1, 2s-1, heads)
    stages = ("encoder1", "encoder2", "bottleneck")
    tables = [np.shape(state[s + table]) for s in stages if s + table in state]
    if len(tables) == 3:
        evidence = f"its relative-position tables {' '.join(map(str, tables))}"
        found["model.split_sizes"] = (tuple((t[0] + 1) // 2 for t in tables), evidence)
        found["model.num_heads"] = (tables[0][2], evidence)
        found["model.attention_mode"] = ("v2", evidence)
    elif "encoder1.0.spatial_attn.attention.qkv.weight" in state:
        found["model.attention_mode"] = ("cswin", "its stripe-attention names")


def _infer_mst_plus_plus(state, found) -> None:
    _take_shape(found, state, "model.mst_plus_plus.n_feat", "conv_in.weight")
    _take_shape(found, state, "model.in_channels", "conv_in.weight", lambda dims: dims[1])
    _take_shape(found, state, "model.out_channels", "conv_out.weight")
    _take_counts(found, state, "model.mst_plus_plus.stage", ["body."])
    _take_counts(found, state, "model.mst_plus_plus.sst_stage", ["body.0.encoder_layers."])
    levels = range(_count(state, "body.0.encoder_layers."))
    blocks = [f"body.0.encoder_layers.{i}.0.blocks." for i in levels]
    blocks.append("body.0.bottleneck.blocks.")
    _take_counts(found, state, "model.mst_plus_plus.num_blocks", blocks)


def _infer_discriminator(state, found) -> None:
    _take_shape(found, state, "discriminator.base_dim", "input_proj.conv.weight_orig")
    stages = [f"encoder_stages.{i}.blocks." for i in range(_count(state, "encoder_stages."))]
    _take_counts(found, state, "discriminator.num_blocks", stages)
    for name in state:  # the last block's mlp, the widest, gives the most exact ratio
        if name.endswith(".attn.temperature"):
            _take_shape(found, state, "discriminator.num_heads", name)
        elif name.endswith(".mlp.0.weight_orig"):
            _take_shape(found, state, "discriminator.mlp_ratio", name, lambda d: d[0] / d[1])


def infer_architecture(generator_state, discriminator_state=None) -> dict[str, tuple[Any, str]]:
    """What the state_dicts' names and shapes fix: `{config key: (value, evidence)}`.

    CSWin: model.base_channels, in/out_channels, blocks_per_stage, split_sizes and num_heads
    (encoder1's, encoder2's and the bottleneck's relative-position tables), attention_mode;
    GroupNorm weights do not record their groups. MST++: model.in/out_channels and
    mst_plus_plus.*. Discriminator: base_dim, num_blocks, num_heads, mlp_ratio.
    """
    found: dict[str, tuple[Any, str]] = {}
    arch = detect_architecture(generator_state)
    if arch is not None:
        found["model.arch"] = (arch, "its tensor names")
        infer = _infer_cswin if arch == "cswin" else _infer_mst_plus_plus
        infer(generator_state, found)
    _infer_discriminator(discriminator_state or {}, found)
    return found


def checkpoint_architecture(generator_state, discriminator_state, trainer_config):
    """`infer_architecture` over the trainer config's `ORIGINAL_CONFIG_KEYS` (read for CSWin
    weights only: the original trains no other generator)."""
    found = {}
    if trainer_config and detect_architecture(generator_state) == "cswin":
        for theirs, ours in ORIGINAL_CONFIG_KEYS.items():
            if theirs in trainer_config:
                value = _plain(trainer_config[theirs])
                found[ours] = (value, f"its trainer config ({theirs}: {show(value)})")
    return found | infer_architecture(generator_state, discriminator_state)


def apply_architecture(config, found, overrides: Mapping[str, Any], source: str):
    """A copy of `config` with the checkpoint's values (`found`), then the user's explicit
    `overrides` (`{dotted key: value}`); one contradicting `found` is a one-line UserError."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, (value, evidence) in found.items():
            if key in overrides and _plain(overrides[key]) != value:
                raise cli.UserError(
                    f"--config.{key}={show(_plain(overrides[key]))} conflicts with {source}, "
                    f"which records {key}={show(value)} ({evidence}); drop the flag"
                )
            config_path.set_value(key, config, value)
        for key, value in overrides.items():
            config_path.set_value(key, config, value)
    return config


def fix_hint(found, config, section: str) -> str:
    """The `section` keys whose `config` values differ from what the tensors give, as a fix."""

    def current(key):
        try:
            return _plain(config_path.get_value(key, config))
        except (KeyError, AttributeError):
            return None

    mine = {k: v for k, (v, _) in found.items() if k.startswith(section)}
    wrong = [f"{k}={show(v)}" for k, v in mine.items() if current(k) != v]
    if not wrong:
        return f" (no {section}* setting fits them: another network's weights?)"
    return f" — the tensors record {', '.join(wrong)}: set those with --config.<key>=..."
