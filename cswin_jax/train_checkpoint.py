"""A training run's checkpoints (`TrainCheckpointer`): the full state every
`checkpoint_every` steps with exact resume, falling back past damaged steps; the best model by
validation MRAE (with its full state when the divergence guard is on); one-line errors for a
full or read-only disk. The on-disk layout is in `cswin_jax.checkpoint`, which also reads and
writes weights-only checkpoints.
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
from cswin_jax.checkpoint import BEST_SUBDIR, DAMAGED_SUBDIR, TRAIN_SUBDIR, open_manager

# Training-state fields renamed since earlier versions wrote checkpoints: old name -> new name
# (`step` and `disc_step` counted updates applied, as `gen_updates` and `disc_updates` do).
RENAMED_STATE_FIELDS = {"step": "gen_updates", "disc_step": "disc_updates"}
# Fields added to the training state since then, with the value an older state resumes with.
ADDED_STATE_FIELDS = {"lr_scale": 1.0, "rollbacks": 0}


class TrainCheckpointer:
    """The training run's checkpoints: periodic full state plus the best model kept apart."""

    def __init__(self, root: str | pathlib.Path, *, keep: int):
        self.root = pathlib.Path(root)
        self._train = open_manager(self.root / TRAIN_SUBDIR, ("state", "config", "data"), keep)
        self._best = open_manager(
            self.root / BEST_SUBDIR, ("weights", "config", "metrics", "state"), 1
        )
        self._state_bytes = 0

    def latest_step(self) -> int | None:
        return self._train.latest_step()

    def best_metric(self) -> float | None:
        """Validation MRAE of the saved best model, or None."""
        if (step := self._best.latest_step()) is None:
            return None
        args = ocp.args.Composite(metrics=ocp.args.JsonRestore())
        return float(self._best.restore(step, args=args)["metrics"]["mrae"])

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

    def _disk_errors(self):  # see the module-level `_disk_errors`
        return _disk_errors(self.root, self._train.latest_step, self._state_bytes)

    def restore(self, abstract_state: Any, data_iterator=None) -> tuple[Any, int]:
        """(state, step) of the newest readable step, restored into `abstract_state`'s structure.

        A step is restored as a whole (state, config, data position): one with a damaged item is
        skipped with a warning and moved aside to `<root>/damaged/` (nothing is deleted, and the
        resumed run can save that step number again), so a crash costs at most the steps since
        the last good checkpoint."""
        steps = sorted(self._train.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no training checkpoint under {self.root / TRAIN_SUBDIR}")
        errors = []
        for step in steps:
            folder = self.root / TRAIN_SUBDIR / str(step)
            target, to_current = _as_saved(abstract_state, folder / "state")
            items = _restore_items(folder, target, data_iterator)
            try:
                restored = self._train.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # damaged step: fall back to the previous one
                logging.warning(
                    "checkpoint step %d under %s is unreadable (%s); resuming from the step "
                    "before it",
                    step,
                    self.root,
                    _one_line(e),
                )
                errors.append(f"step {step}: {_one_line(e)}")
                continue
            _set_aside(self._train, self.root, [s for s in steps if s > step])
            return to_current(restored["state"]), step
        raise ValueError(
            f"no readable checkpoint under {self.root / TRAIN_SUBDIR} ("
            + "; ".join(errors)
            + "); start a new --workdir, or move the folder away to start afresh"
        )

    def restore_config(self, step: int | None = None) -> dict | None:
        """The config saved with `step`, or with the newest step whose config is readable."""
        steps = [step] if step is not None else sorted(self._train.all_steps(), reverse=True)
        for candidate in steps:
            try:
                args = ocp.args.Composite(config=ocp.args.JsonRestore())
                return dict(self._train.restore(candidate, args=args)["config"])
            except Exception as e:  # damaged config: the state restore falls back too
                if step is not None:
                    raise
                logging.warning("checkpoint step %d under %s has an unreadable config (%s)",
                                candidate, self.root, _one_line(e))  # fmt: skip
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
        folder = self.root / BEST_SUBDIR / str(step) / "state"
        if step is None or not folder.exists():
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


def _restore_items(folder: pathlib.Path, target: Any, data_iterator) -> dict:
    """The restore arguments of the items a training step in `folder` holds."""
    items = {"state": ocp.args.StandardRestore(target)}
    if (folder / "config").exists():
        items["config"] = ocp.args.JsonRestore()
    if data_iterator is not None and (folder / "data").exists():
        import grain  # noqa: PLC0415 - heavy import only when a pipeline exists

        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return items


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


@contextlib.contextmanager
def _disk_errors(root: pathlib.Path, latest_step, state_bytes: int):
    """Turns a save that failed for a full, read-only or forbidden disk (at once, or later in
    the asynchronous writer) into one `UserError` naming the folder and the space needed.
    Orbax commits a step by renaming it when complete, so earlier steps stay readable."""
    try:
        yield
    except Exception as e:
        code = disk_error(e)
        if code is None:
            raise
        free = shutil.disk_usage(_existing_parent(root)).free
        done = latest_step()
        kept = (f"step {done} is intact and a restart resumes from it" if done is not None
                else "no complete step was written")  # fmt: skip
        if code == errno.ENOSPC or code == errno.EDQUOT:
            fix = (f"a checkpoint needs about {_mb(state_bytes)} and {_mb(free)} are free "
                   "there: free space or choose another --workdir")  # fmt: skip
        else:
            fix = "choose a writable --workdir (or config.checkpoint_dir)"
        raise cli.UserError(
            f"saving a checkpoint under {root} failed: {os.strerror(code)}; {fix} ({kept})"
        ) from e


def _set_aside(manager, root: pathlib.Path, steps: list[int]) -> None:
    """Moves damaged `steps` to `<root>/damaged/<step>` (process 0; all wait)."""
    if not steps:
        return
    if jax.process_index() == 0:
        aside = root / DAMAGED_SUBDIR
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, k = aside / str(step), 1
            while target.exists():
                target, k = aside / f"{step}.{k}", k + 1
            (root / TRAIN_SUBDIR / str(step)).rename(target)
            logging.warning("moved the unreadable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"cswin_jax_set_aside_{steps[0]}")
    manager.reload()


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
