"""The divergence guard (`config.divergence_guard`): after a validation that went wrong, the
run goes back to the training state saved with the best model, with lower learning rates.

A validation went wrong when its MRAE is not finite or above `mrae_factor` times the best so
far. The learning rates are scaled by `TrainState.lr_scale` inside the step, so lowering them
changes a value of the state, not the compiled programs; the scale and the count of rollbacks
are part of the state, and a resumed run goes on exactly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging


def diverged(mrae: float, best_mrae: float, mrae_factor: float) -> bool:
    """Whether a validation MRAE calls for a rollback (`best_mrae`: inf before any best)."""
    return not math.isfinite(mrae) or (math.isfinite(best_mrae) and mrae > mrae_factor * best_mrae)


def roll_back(
    state: Any,
    checkpointer: Any,
    abstract_state: Any,
    guard: ml_collections.ConfigDict,
    *,
    step: int,
    mrae: float,
    best_mrae: float,
) -> Any:
    """The state to train on after validation at loop `step` diverged: the best model's state
    with `lr_scale` times `guard.lr_factor` and one more rollback counted, or `state` itself
    (with a warning) when no rollback is left or the best model has no state saved with it.
    """
    done = int(jax.device_get(state.rollbacks))
    what = (
        f"step {step}: validation MRAE {mrae:.5g} "
        + ("is not finite" if not math.isfinite(mrae) else f"is above {guard.mrae_factor:g} x ")
        + (f"the best ({best_mrae:.5g})" if math.isfinite(mrae) else "")
    )
    if done >= guard.max_rollbacks:
        logging.warning(
            "%s; no rollback left (divergence_guard.max_rollbacks=%d): training goes on",
            what,
            guard.max_rollbacks,
        )
        return state
    best = checkpointer.restore_best_state(abstract_state)
    if best is None:
        logging.warning(
            "%s; there is no best model saved with its training state to roll back to (the "
            "guard saves one with each new best): training goes on",
            what,
        )
        return state
    best_state, best_step = best
    scale = float(jax.device_get(state.lr_scale)) * guard.lr_factor

    def like(value, name):  # a scalar of the state's dtype, placed as the step takes it
        leaf = getattr(abstract_state, name)
        return jax.device_put(np.asarray(value, leaf.dtype), getattr(leaf, "sharding", None))

    logging.warning(
        "%s: rolled back to the state of step %d, learning rates x %g (rollback %d of %d)",
        what,
        best_step,
        scale,
        done + 1,
        guard.max_rollbacks,
    )
    return best_state.replace(
        lr_scale=like(scale, "lr_scale"), rollbacks=like(done + 1, "rollbacks")
    )
