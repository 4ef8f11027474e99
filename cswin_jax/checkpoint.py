"""Orbax checkpoints: the on-disk layout, weights-only files, reading a model's weights from any
checkpoint folder, and the check that weights fit a model (`train_checkpoint.TrainCheckpointer`
writes and resumes a training run's).

On-disk layout under a checkpoint root (`<workdir>/checkpoints`, or `config.checkpoint_dir`):

  <root>/train/<step>/{state,config,data}   CheckpointManager; newest `checkpoint_keep` kept.
                                           `state` is the whole TrainState (params, EMA,
                                           optimizer states, spectral-norm state, counters, RNG,
                                           learning-rate scale),
                                           `data` the grain iterator position, `config` JSON.
  <root>/best/<step>/{weights,config,metrics}  the EMA generator (and discriminator) with the
                                           lowest validation MRAE; one kept. With the
                                           divergence guard on, also `state`: the full
                                           TrainState the guard rolls back to.
  <root>/damaged/<step>                    training steps found unreadable at resume, moved
                                           aside (never deleted).

A weights-only checkpoint (what `python -m cswin_jax.convert` writes) is a CheckpointManager
folder whose single step holds `{weights,config}`, like `best/`. `weights` is
`{'generator': {'params': ...}, 'discriminator': {'params': ..., 'spectral_norm': ...}}`
(discriminator optional).

Saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames on
commit); a half-written step is ignored on restore, and a finalized step with any unreadable
item falls back to the previous one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cswin_jax import cli

TRAIN_SUBDIR = "train"
BEST_SUBDIR = "best"
DAMAGED_SUBDIR = "damaged"  # unreadable training steps, moved aside on resume
MAX_LISTED = 10  # misfit weights named in an error; the rest are counted


def open_manager(
    directory: pathlib.Path, item_names: tuple[str, ...], keep: int, *, read_only=False
):
    """An Orbax CheckpointManager of `item_names` in `directory`, the newest `keep` kept."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=item_names)


def _to_numpy_tree(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def save_model_checkpoint(
    directory: str | pathlib.Path,
    *,
    generator_params: Any,
    discriminator_variables: Mapping | None = None,
    config: Mapping,
    step: int = 0,
) -> pathlib.Path:
    """Writes a weights-only checkpoint (generator params, optional discriminator variables)."""
    directory = pathlib.Path(directory)
    weights: dict[str, Any] = {"generator": {"params": _to_numpy_tree(generator_params)}}
    if discriminator_variables is not None:
        weights["discriminator"] = _to_numpy_tree(dict(discriminator_variables))
    mngr = open_manager(directory, ("weights", "config"), 1)
    try:
        mngr.save(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardSave(weights), config=ocp.args.JsonSave(dict(config))
            ),
            force=True,
        )
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return directory


def _resolve_model_dir(directory: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Finds the CheckpointManager folder to read and what it holds ('weights' or 'state')."""
    if not directory.exists():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist; pass a training workdir, its "
            "checkpoints/ folder, or a folder written by `python -m cswin_jax.convert`"
        )
    candidates = [directory, directory / "checkpoints"]
    for base in candidates:
        for sub, kind in ((BEST_SUBDIR, "weights"), (TRAIN_SUBDIR, "state")):
            if _has_steps(base / sub):
                return base / sub, kind
    if _has_steps(directory):
        step_dirs = sorted(_step_dirs(directory), key=lambda p: int(p.name))
        kind = "weights" if (step_dirs[-1] / "weights").exists() else "state"
        return directory, kind
    raise ValueError(
        f"{directory} is not an Orbax checkpoint of this project (no step folders with "
        "'weights' or 'state'); pass a training workdir or a converted checkpoint folder"
    )


def _step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]


def _has_steps(directory: pathlib.Path) -> bool:
    return any((p / "weights").exists() or (p / "state").exists() for p in _step_dirs(directory))


def restore_model_variables(
    directory: str | pathlib.Path, *, use_ema: bool = True
) -> tuple[Any, dict | None, dict]:
    """Reads model weights from any checkpoint this project writes.

    Args:
      directory: a training workdir, its `checkpoints/` root, a `train/` or `best/` manager
        folder, or a converted (weights-only) checkpoint folder. A root with a `best/` model
        prefers it; otherwise the newest training state is read.
      use_ema: for training states, return the EMA generator weights (else the raw ones).

    Returns:
      (generator_params, discriminator_variables or None, config_dict).
    """
    manager_dir, kind = _resolve_model_dir(pathlib.Path(directory))
    mngr = open_manager(manager_dir, (kind, "config"), 1, read_only=True)
    errors, restored = [], None
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                restored = mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        **{kind: ocp.args.StandardRestore(), "config": ocp.args.JsonRestore()}
                    ),
                )
                break
            except Exception as e:  # damaged step: try the previous one
                logging.warning("checkpoint %s step %d is unreadable (%s)", manager_dir, step, e)
                errors.append(f"step {step}: {e}")
    finally:
        mngr.close()
    if restored is None:
        raise ValueError(
            f"could not read any checkpoint in {manager_dir}:\n  " + "\n  ".join(errors)
        )
    config = dict(restored["config"])
    tree = restored[kind]
    if kind == "weights":
        disc = tree.get("discriminator")
        return tree["generator"]["params"], disc, config
    gen = tree["ema_params"] if use_ema else tree["gen_params"]
    disc = None
    if tree.get("disc_params") is not None:
        disc = {"params": tree["disc_params"], "spectral_norm": tree.get("disc_spectral_norm")}
    return gen, disc, config


# --------------------------------------------------------------------------------------------
# Do loaded weights fit a model? (init_from, inference, the PyTorch converter)
# --------------------------------------------------------------------------------------------


def misfit_message(misshaped: list[str], missing: list[str], unused: list[str]) -> str | None:
    """'N tensors do not fit (...): the first ten, ... (k more)', or None when all fit."""
    problems = [*misshaped, *missing, *unused]
    if not problems:
        return None
    more = f", ... ({len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return (
        f"{len(problems)} tensors do not fit ({len(misshaped)} misshaped: checkpoint vs config "
        f"shape, {len(missing)} missing, {len(unused)} unused): "
        f"{', '.join(problems[:MAX_LISTED])}{more}"
    )


def check_weights_fit(loaded: Any, expected: Any, what: str) -> None:
    """Raises a one-line `cli.UserError` starting with `what` when the tree `loaded` lacks a
    weight of `expected` (arrays or ShapeDtypeStructs), has one more, or one of another shape."""
    from flax import traverse_util  # noqa: PLC0415

    def shapes(tree):
        flat = traverse_util.flatten_dict(dict(tree)) if tree else {}
        return {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in flat.items()}

    have, want = shapes(loaded), shapes(expected)
    message = misfit_message(
        [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]],
        [f"{k} missing {want[k]}" for k in want if k not in have],
        [f"{k} {have[k]} unused" for k in have if k not in want],
    )
    if message:
        raise cli.UserError(f"{what}: {message}")
