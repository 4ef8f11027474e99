"""Orbax checkpoints: training state with exact resume, the best model, and weights-only files.

On-disk layout under a checkpoint root (`<workdir>/checkpoints`, or `config.checkpoint_dir`):

  <root>/train/<step>/{state,config,data}   CheckpointManager; newest `checkpoint_keep` kept.
                                           `state` is the whole TrainState (params, EMA,
                                           optimizer states, spectral-norm state, step, RNG),
                                           `data` the grain iterator position, `config` JSON.
  <root>/best/<step>/{weights,config,metrics}  the EMA generator (and discriminator) with the
                                           lowest validation MRAE; one kept.

A weights-only checkpoint (what `python -m cswin_jax.convert` writes) is a CheckpointManager
folder whose single step holds `{weights,config}`, like `best/`. `weights` is
`{'generator': {'params': ...}, 'discriminator': {'params': ..., 'spectral_norm': ...}}`
(discriminator optional).

Saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames on
commit); a half-written step is ignored on restore, and a finalized step that fails to read
falls back to the previous one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

TRAIN_SUBDIR = "train"
BEST_SUBDIR = "best"


def _manager(directory: pathlib.Path, item_names: tuple[str, ...], keep: int, *, read_only=False):
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


class TrainCheckpointer:
    """The training run's checkpoints: periodic full state plus the best model kept apart."""

    def __init__(self, root: str | pathlib.Path, *, keep: int):
        self.root = pathlib.Path(root)
        self._train = _manager(self.root / TRAIN_SUBDIR, ("state", "config", "data"), keep)
        self._best = _manager(self.root / BEST_SUBDIR, ("weights", "config", "metrics"), 1)

    def latest_step(self) -> int | None:
        return self._train.latest_step()

    def best_metric(self) -> float | None:
        """Validation MRAE of the saved best model, or None."""
        step = self._best.latest_step()
        if step is None:
            return None
        restored = self._best.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
        return float(restored["metrics"]["mrae"])

    def save(self, step: int, state: Any, config: Mapping, data_iterator=None, *, force=False):
        """Saves the full training state at `step` (asynchronously)."""
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(dict(config)),
        }
        if data_iterator is not None:
            import grain  # noqa: PLC0415 - heavy import only when a pipeline exists

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._train.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator=None) -> tuple[Any, int]:
        """Restores the newest readable step into the structure of `abstract_state`.

        Returns (state, step). A finalized step whose files are damaged is skipped with a
        warning and the previous step is tried, so a crash costs at most the steps since the
        last good checkpoint.
        """
        steps = sorted(self._train.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no training checkpoint under {self.root / TRAIN_SUBDIR}")
        errors = []
        for step in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if (
                data_iterator is not None
                and (self.root / TRAIN_SUBDIR / str(step) / "data").exists()
            ):
                import grain  # noqa: PLC0415

                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._train.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # damaged step: fall back to the previous one
                logging.warning(
                    "checkpoint step %d under %s is unreadable (%s); trying the previous step",
                    step,
                    self.root,
                    e,
                )
                errors.append(f"step {step}: {e}")
                continue
            return restored["state"], step
        raise ValueError(
            f"no readable checkpoint under {self.root / TRAIN_SUBDIR}:\n  " + "\n  ".join(errors)
        )

    def restore_config(self, step: int | None = None) -> dict | None:
        step = self._train.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._train.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def save_best(self, step: int, weights: Mapping, config: Mapping, mrae: float):
        """Saves `weights` (EMA generator, discriminator) as the best model."""
        self._best.save(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardSave(dict(weights)),
                config=ocp.args.JsonSave(dict(config)),
                metrics=ocp.args.JsonSave({"mrae": float(mrae), "step": int(step)}),
            ),
            force=True,
        )

    def wait(self):
        self._train.wait_until_finished()
        self._best.wait_until_finished()

    def close(self):
        self._train.close()
        self._best.close()


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
    mngr = _manager(directory, ("weights", "config"), 1)
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
    mngr = _manager(manager_dir, (kind, "config"), 1, read_only=True)
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
