"""Orbax checkpoints: training state with exact resume, the best model, and weights-only files.

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

import contextlib
import dataclasses
import errno
import json
import os
import pathlib
import shutil
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
# Training-state fields renamed since earlier versions wrote checkpoints: old name -> new name
# (`step` and `disc_step` counted updates applied, as `gen_updates` and `disc_updates` do).
RENAMED_STATE_FIELDS = {"step": "gen_updates", "disc_step": "disc_updates"}
# Fields added to the training state since then, with the value an older state resumes with.
ADDED_STATE_FIELDS = {"lr_scale": 1.0, "rollbacks": 0}


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
        self._best = _manager(
            self.root / BEST_SUBDIR, ("weights", "config", "metrics", "state"), 1
        )
        self._state_bytes = 0

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
        self._state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                                for x in jax.tree.leaves(state))  # fmt: skip
        with self._disk_errors():
            return self._train.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _disk_errors(self):
        """Turns a save that failed for a full, read-only or forbidden disk (at once, or later
        in the asynchronous writer) into one `UserError` naming the folder and the space needed.
        Orbax commits a step by renaming it when complete, so earlier steps stay readable."""
        try:
            yield
        except Exception as e:
            code = disk_error(e)
            if code is None:
                raise
            free = shutil.disk_usage(_existing_parent(self.root)).free
            done = self._train.latest_step()
            kept = (f"step {done} is intact and a restart resumes from it" if done is not None
                    else "no complete step was written")  # fmt: skip
            if code == errno.ENOSPC or code == errno.EDQUOT:
                fix = (f"a checkpoint needs about {_mb(self._state_bytes)} and {_mb(free)} are "
                       "free there: free space or choose another --workdir")  # fmt: skip
            else:
                fix = "choose a writable --workdir (or config.checkpoint_dir)"
            raise cli.UserError(
                f"saving a checkpoint under {self.root} failed: {os.strerror(code)}; {fix} ({kept})"
            ) from e

    def restore(self, abstract_state: Any, data_iterator=None) -> tuple[Any, int]:
        """Restores the newest readable step into the structure of `abstract_state`.

        Returns (state, step). A step is restored as a whole (state, config and data iterator
        position together): when any of its items is damaged, the step is skipped with a
        warning naming it and the previous one is tried, so a crash costs at most the steps
        since the last good checkpoint. Skipped steps are moved aside to `<root>/damaged/`
        (nothing is deleted) so that the resumed run can save those step numbers again.
        """
        steps = sorted(self._train.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no training checkpoint under {self.root / TRAIN_SUBDIR}")
        errors = []
        for step in steps:
            folder = self.root / TRAIN_SUBDIR / str(step)
            target, to_current = _as_saved(abstract_state, folder / "state")
            items = {"state": ocp.args.StandardRestore(target)}
            if (folder / "config").exists():
                items["config"] = ocp.args.JsonRestore()
            if data_iterator is not None and (folder / "data").exists():
                import grain  # noqa: PLC0415

                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._train.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # damaged step: fall back to the previous one
                logging.warning(
                    "checkpoint step %d under %s is unreadable (%s); resuming from the step "
                    "before it",
                    step,
                    self.root,
                    " ".join(str(e).split())[:300],
                )
                errors.append(f"step {step}: {' '.join(str(e).split())[:300]}")
                continue
            self._set_aside(s for s in steps if s > step)
            return to_current(restored["state"]), step
        raise ValueError(
            f"no readable checkpoint under {self.root / TRAIN_SUBDIR} ("
            + "; ".join(errors)
            + "); start a new --workdir, or move the folder away to start afresh"
        )

    def _set_aside(self, steps) -> None:
        """Moves damaged `steps` to `<root>/damaged/<step>` (process 0; all wait)."""
        steps = list(steps)
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.root / DAMAGED_SUBDIR
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, k = aside / str(step), 1
                while target.exists():
                    target, k = aside / f"{step}.{k}", k + 1
                (self.root / TRAIN_SUBDIR / str(step)).rename(target)
                logging.warning("moved the unreadable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"cswin_jax_set_aside_{steps[0]}")
        self._train.reload()

    def restore_config(self, step: int | None = None) -> dict | None:
        """The config saved with `step`, or with the newest step whose config is readable."""
        steps = [step] if step is not None else sorted(self._train.all_steps(), reverse=True)
        for candidate in steps:
            try:
                restored = self._train.restore(
                    candidate, args=ocp.args.Composite(config=ocp.args.JsonRestore())
                )
            except Exception as e:  # damaged config: the state restore falls back too
                if step is not None:
                    raise
                logging.warning(
                    "checkpoint step %d under %s has an unreadable config (%s)",
                    candidate,
                    self.root,
                    " ".join(str(e).split())[:300],
                )
                continue
            return dict(restored["config"])
        return None

    def save_best(
        self, step: int, weights: Mapping, config: Mapping, mrae: float, state: Any = None
    ):
        """Saves `weights` (EMA generator, discriminator) as the best model, with the full
        training `state` when given (what `restore_best_state` returns)."""
        items = {
            "weights": ocp.args.StandardSave(dict(weights)),
            "config": ocp.args.JsonSave(dict(config)),
            "metrics": ocp.args.JsonSave({"mrae": float(mrae), "step": int(step)}),
        }
        if state is not None:
            items["state"] = ocp.args.StandardSave(state)
        with self._disk_errors():
            self._best.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_best_state(self, abstract_state: Any) -> tuple[Any, int] | None:
        """(the training state saved with the best model, its step), or None when the best
        model was saved without one (or there is none)."""
        self._best.wait_until_finished()
        step = self._best.latest_step()
        if step is None:
            return None
        folder = self.root / BEST_SUBDIR / str(step) / "state"
        if not folder.exists():
            return None
        target, to_current = _as_saved(abstract_state, folder)
        restored = self._best.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return to_current(restored["state"]), step

    def wait(self):
        with self._disk_errors():
            self._train.wait_until_finished()
            self._best.wait_until_finished()

    def close(self):
        with self._disk_errors():
            self._train.close()
            self._best.close()


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _as_saved(abstract_state: Any, folder: pathlib.Path) -> tuple[Any, Any]:
    """(restore target, function to today's structure) for the state saved in `folder`.

    A state saved before a field of the training state was renamed (`RENAMED_STATE_FIELDS`)
    or added (`ADDED_STATE_FIELDS`) restores into a dict under the names it has, and the
    function rebuilds today's state from it (added fields at their defaults); any other state
    restores as it is.
    """
    unchanged = abstract_state, lambda state: state
    if not dataclasses.is_dataclass(abstract_state):
        return unchanged
    try:
        saved = json.loads((folder / "_METADATA").read_text())["tree_metadata"]
        names = {entry["key_metadata"][0]["key"] for entry in saved.values()}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return unchanged  # unreadable: the restore itself reports it
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    old_names = {new: old for old, new in RENAMED_STATE_FIELDS.items()
                 if new in fields and new not in names and old in names}  # fmt: skip
    added = {name for name in ADDED_STATE_FIELDS if name in fields and name not in names}
    if not old_names and not added:
        return unchanged
    target = {old_names.get(n, n): value for n, value in fields.items() if n not in added}

    def default(name: str) -> jax.Array:
        like = fields[name]
        value = np.asarray(ADDED_STATE_FIELDS[name], like.dtype)
        return jax.device_put(value, getattr(like, "sharding", None))

    def to_current(state: Mapping) -> Any:
        return type(abstract_state)(
            **{n: default(n) if n in added else state[old_names.get(n, n)] for n in fields}
        )

    return target, to_current


def disk_error(exc: BaseException) -> int | None:
    """The errno of a full/read-only/forbidden disk behind `exc` (its chain included), or None.

    Python writes raise OSError; tensorstore's array writes raise ValueError with the OS text
    and `os_error_code='28'` in the message.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return exc.errno
        text = str(exc)
        for code in _DISK_ERRNOS:
            if f"os_error_code='{code}'" in text or os.strerror(code) in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _existing_parent(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


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
