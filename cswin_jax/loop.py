"""The training loop: `train_and_evaluate`, around the pure step of `cswin_jax.train`.

Host-side work only: the mesh and shardings, the grain input iterator, Orbax checkpoints
(automatic resume, best model, SIGTERM/SIGINT save), validation on the EMA weights, metric
writers and the progress bar.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import pathlib
import signal
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import cswin_jax
from cswin_jax import checkpoint as ckpt_lib
from cswin_jax import cli, divergence, inference, metrics, models, scoring, sharding
from cswin_jax.config_checks import validate_config
from cswin_jax.data import pipeline
from cswin_jax.programs import compiled_programs
from cswin_jax.schedule import step_kind, total_steps
from cswin_jax.train import TrainState
from cswin_jax.train_checkpoint import TrainCheckpointer


def _architecture(config_dict: Mapping) -> dict:
    keys = ("model", "discriminator", "train_discriminator")
    arch = {k: config_dict.get(k) for k in keys}
    arch["model"] = models.architecture_signature(arch["model"])
    # JSON round trip: tuples in the live config come back from the checkpoint as lists.
    return json.loads(json.dumps(arch))


_BARRIERS = itertools.count()


class _StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("received signal %d: saving a checkpoint, then exiting", signum)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stack_micro_batches(iterator, n: int) -> dict[str, np.ndarray]:
    parts = [next(iterator) for _ in range(n)]
    return {k: np.stack([p[k] for p in parts]) for k in ("rgb", "hsi")}


def log_floor(config: ml_collections.ConfigDict, writer, train_scenes, valid_scenes) -> dict:
    """Fits the per-pixel polynomial floor (`cswin_jax.floor`, `config.eval.floor_*`) on the
    training split, scores it on `valid_scenes` as validation scores the model (clamped
    metrics too when `config.eval.clamp_predictions`) and writes `floor/order<k>/<metric>`
    scalars at step 0, the reference lines of the `val/` curves. Returns the floor summary.
    """
    from cswin_jax import floor  # noqa: PLC0415

    summary = floor.evaluate_floor(
        train_scenes,
        valid_scenes,
        clamp_predictions=config.eval.clamp_predictions,
        **floor.settings(config),
    )
    scalars = {
        f"floor/order{result['order']}/{name}": value
        for result in summary["orders"]
        for name, value in result["mean"].items()
    }
    writer.scalars(0, scalars)
    logging.info(
        "per-pixel floor on %d validation scenes (polynomial least squares on %d training "
        "pixels, %.1f s): %s",
        summary["orders"][0]["num_scored"] if summary["orders"] else 0,
        summary["num_pixels"],
        summary["seconds"],
        " | ".join(
            f"order {r['order']} mrae={r['mean'].get('mrae', math.nan):.4g} "
            f"psnr={r['mean'].get('psnr', math.nan):.4g}"
            for r in summary["orders"]
        ),
    )
    return summary


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | None, *, stop_after: int | None = None
) -> TrainState:
    """Trains (resuming from the newest checkpoint), validates and checkpoints.

    A fresh run first logs the per-pixel floor (`log_floor`, with `config.eval.floor`).

    Args:
      config: a config from `configs/`.
      workdir: run folder for TensorBoard events and checkpoints; when None, events go to
        `config.log_dir` and checkpoints to `config.checkpoint_dir`.
      stop_after: leave (with a checkpoint) after this many steps of this invocation, as a
        preempted job would; the next call resumes.
    Returns:
      The final TrainState.
    """
    from cswin_jax import metric_writers  # noqa: PLC0415

    mesh = sharding.make_mesh()
    validate_config(config, mesh.size)
    log_dir = pathlib.Path(workdir) if workdir else pathlib.Path(config.log_dir)
    ckpt_root = (
        pathlib.Path(workdir) / "checkpoints" if workdir else pathlib.Path(config.checkpoint_dir)
    )
    is_chief = jax.process_index() == 0
    config_dict = config.to_dict()
    # Every exit path (the end, a user error, a crash, a signal) closes the input pipeline's
    # worker processes, the checkpointer (after its pending saves) and the writers.
    with contextlib.ExitStack() as cleanup:
        writer = metric_writers.MetricWriter(log_dir, config, enabled=is_chief)
        cleanup.callback(_quietly, writer.close, "closing the metric writer")
        data_root = pipeline.resolve_data_root(config, workdir or log_dir)
        train_scenes = pipeline.open_scenes(config, data_root, "train")
        train_iter = pipeline.create_train_iterator(config, data_root, scenes=train_scenes)
        if hasattr(train_iter, "close"):
            cleanup.callback(_quietly, train_iter.close, "stopping the input workers")
        valid_scenes = pipeline.load_split(config, data_root, split="valid")
        _warn_uncropped(valid_scenes)
        checkpointer, latest = _open_checkpointer(ckpt_root, config, config_dict)
        cleanup.callback(_quietly, checkpointer.close, "closing the checkpointer")

        if latest is None and is_chief and config.eval.floor:
            # Before the compile: the other processes compile meanwhile, then all meet below.
            log_floor(config, writer, train_scenes, valid_scenes)

        programs = compiled_programs(config, mesh)
        # Every process has its programs compiled before any of them runs one.
        sharding.wait_for_all_processes(f"cswin_jax_compiled_{next(_BARRIERS)}")
        state_sharding, batch_sharding = programs.state_sharding, programs.batch_sharding
        if latest is not None:
            state, start = checkpointer.restore(programs.abstract_state, train_iter)
            logging.info(
                "resumed from %s at step %d (%d generator updates, %d steps skipped as non-finite)",
                ckpt_root,
                start,
                int(state.gen_updates),
                int(state.nonfinite_total),
            )
        else:
            start = 0
            with cli.without_compile_alarm():  # compiled here, and freed once it has run
                state = programs.init_fn(jax.random.key(config.seed))
            if config.init_from:
                state = _load_initial_weights(state, config.init_from, state_sharding, config.model)
        # The compiler, the cache loader and the initialiser leave gigabytes freed but held by
        # malloc on their threads; the steps would carry them in the process's peak.
        cswin_jax.release_freed_memory()
        best_mrae = checkpointer.best_metric()
        best_mrae = math.inf if best_mrae is None else best_mrae
        step_fns, predict_fn = programs.step_fns, programs.predict_fn

        # Loop steps count the batches consumed and number the checkpoints (`start` is the
        # restored one's); state.gen_updates counts the generator updates applied, lower after
        # a skipped step.
        n_steps = total_steps(config)
        accum = config.gradient_accumulation_steps
        patches_per_step = config.batch_size * accum
        history: list[dict] = []
        t0 = time.time()
        progress = metric_writers.Progress(n_steps, start)
        cleanup.callback(_quietly, progress.close, "closing the progress bar")
        with _StopRequested() as stop:
            step = start
            while step < n_steps:
                host_batch = _stack_micro_batches(train_iter, accum)
                batch = {
                    k: jax.make_array_from_process_local_data(batch_sharding, v)
                    for k, v in host_batch.items()
                }
                state, step_metrics = step_fns[step_kind(config, step)](state, batch)
                step += 1
                history.append(step_metrics)
                if step % config.log_every == 0 or step == n_steps:
                    fetched = jax.device_get(history)
                    history = []
                    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    elapsed = time.time() - t0
                    summary["patches_per_second"] = (
                        patches_per_step * len(fetched) / max(elapsed, 1e-9)
                    )
                    t0 = time.time()
                    writer.scalars(step, {f"train/{k}": v for k, v in summary.items()})
                    progress.update(step, summary)
                    peak = int(jax.device_get(state.nonfinite_peak))
                    if peak >= config.max_consecutive_nonfinite:
                        checkpointer.wait()
                        raise FloatingPointError(
                            f"{peak} consecutive training steps had non-finite losses or "
                            "gradients (limit max_consecutive_nonfinite="
                            f"{config.max_consecutive_nonfinite}); the last good state is in "
                            f"{ckpt_root}. Lower the learning rates or check the data for NaN/Inf."
                        )
                if step % config.iterations_per_epoch == 0 or step == n_steps:
                    val_start = time.time()
                    rows = scoring.evaluate_scenes(
                        inference.ModelApply(predict_fn, {"params": state.ema_params}),
                        valid_scenes,
                        config.eval,
                        clamp_predictions=config.eval.clamp_predictions,
                        progress=False,
                    )
                    val = scoring.summarize(rows)["mean"]
                    if not val:
                        raise ValueError("the validation split has no scene with ground truth")
                    writer.scalars(step, {f"val/{k}": v for k, v in val.items()})
                    logging.info(
                        "step %d validation (EMA weights): %s",
                        step,
                        " ".join(f"{k}={v:.5g}" for k, v in val.items()),
                    )
                    guard = config.divergence_guard
                    if guard.enabled and divergence.diverged(
                        val["mrae"], best_mrae, guard.mrae_factor
                    ):
                        state = divergence.roll_back(
                            state,
                            checkpointer,
                            programs.abstract_state,
                            guard,
                            step=step,
                            mrae=val["mrae"],
                            best_mrae=best_mrae,
                        )
                    elif val["mrae"] < best_mrae:
                        best_mrae = val["mrae"]
                        checkpointer.save_best(
                            step,
                            _model_weights(state),
                            config_dict,
                            best_mrae,
                            state=state if guard.enabled else None,
                        )
                        if is_chief:
                            logging.info(
                                "new best model (mrae %.5g) written to %s",
                                best_mrae,
                                ckpt_root / ckpt_lib.BEST_SUBDIR,
                            )
                    t0 += time.time() - val_start  # patches/s counts training time only
                preempted = stop_agreed(stop.signum is not None) or (
                    stop_after is not None and step - start >= stop_after
                )
                if step % config.checkpoint_every == 0 or step == n_steps or preempted:
                    checkpointer.save(step, state, config_dict, train_iter, force=True)
                    if is_chief:
                        logging.info(
                            "checkpoint of step %d written to %s",
                            step,
                            ckpt_root / ckpt_lib.TRAIN_SUBDIR / str(step),
                        )
                if preempted:
                    break
        checkpointer.wait()  # a failed final save is reported, not swallowed by the clean-up
        return state


def _warn_uncropped(scenes) -> None:
    """One warning when validation frames are too small for the benchmark's centre crop, whose
    metrics are then the protocol's sentinel (mrae 999) and cannot pick a best model."""
    margin = metrics.CENTER_SLICE_MARGIN
    small = {scene.rgb.shape[:2] for scene in scenes if min(scene.rgb.shape[:2]) <= 2 * margin}
    if small:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(small))
        logging.warning(
            "validation frames of %s have no centre crop (the benchmark scores rows and columns "
            "%d: -%d), so their metrics are the sentinel mrae=999 psnr=0; use frames larger than "
            "%d px on both sides (e.g. data.synthetic.height / width)",
            sizes,
            margin,
            margin,
            2 * margin,
        )


def _quietly(close: Callable[[], object], what: str) -> None:
    """Runs a clean-up step; its own failure is logged, never raised over the run's outcome
    (a run that ended cleanly has already waited for its saves)."""
    try:
        close()
    except Exception as e:  # noqa: BLE001
        logging.warning("%s failed: %s", what, " ".join(str(e).split())[:300])


def stop_agreed(local: bool) -> bool:
    """True on every process when `local` is true on any one of them.

    A preemption signal reaches the processes of a job at different moments; each checks its
    flag between steps, and all must leave at the same step (with one checkpoint), or one
    would wait in a collective for the others forever. One tiny all-gather per step."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


def _open_checkpointer(ckpt_root: pathlib.Path, config, config_dict: Mapping):
    """The run's checkpointer and the step to resume from (None: a fresh run).

    Checkpoints of this architecture are resumed (`init_from` then only applies to fresh
    runs, and is ignored with a warning). Checkpoints of another architecture are refused,
    unless `init_from` is set: then they are moved aside, not deleted, to
    `<root>.replaced-<k>`, and the run starts afresh from the `init_from` weights.
    """
    checkpointer = TrainCheckpointer(ckpt_root, keep=config.checkpoint_keep)
    latest = checkpointer.latest_step()
    if latest is None:
        return checkpointer, None
    saved = _architecture(checkpointer.restore_config() or {})
    if saved == _architecture(config_dict):
        if config.init_from:
            logging.warning(
                "%s holds checkpoints of this run: resuming at step %d; init_from=%s is "
                "ignored (it initialises fresh runs only)",
                ckpt_root,
                latest,
                config.init_from,
            )
        return checkpointer, latest
    checkpointer.close()
    if not config.init_from:
        what = (
            models.architecture_mismatch(saved["model"], config.model, str(ckpt_root))
            or f"{ckpt_root} holds a checkpoint of another architecture ({json.dumps(saved)})"
        )
        raise ValueError(
            f"{what}; "
            "use a new --workdir, or pass --config.init_from=PATH to start this one afresh "
            f"from those weights (its checkpoints are then moved to {ckpt_root}.replaced-<k>)"
        )
    # Every process has closed its checkpointer before any moves the folder.
    sharding.wait_for_all_processes(f"cswin_jax_replace_{next(_BARRIERS)}")
    sharding.process_zero_first(
        f"cswin_jax_replace_{next(_BARRIERS)}", lambda: _move_aside(ckpt_root)
    )
    return TrainCheckpointer(ckpt_root, keep=config.checkpoint_keep), None


def _move_aside(root: pathlib.Path) -> pathlib.Path | None:
    """Renames `root` to `<root>.replaced-<k>`; None when it holds no training checkpoints
    (already moved by process 0 on a shared filesystem)."""
    if not (root / ckpt_lib.TRAIN_SUBDIR).exists():
        return None
    k = 1
    while (target := root.with_name(f"{root.name}.replaced-{k}")).exists():
        k += 1
    root.rename(target)
    logging.warning(
        "moved the checkpoints of another architecture from %s to %s (init_from is set)",
        root,
        target,
    )
    return target


def _model_weights(state: TrainState) -> dict:
    weights = {"generator": {"params": state.ema_params}}
    if state.disc_params is not None:
        weights["discriminator"] = {
            "params": state.disc_params,
            "spectral_norm": state.disc_spectral_norm,
        }
    return weights


def _load_initial_weights(state: TrainState, path: str, state_sharding, model_cfg) -> TrainState:
    """`--config.init_from`: weights only (e.g. a converted PyTorch checkpoint)."""
    gen_params, disc_vars, saved_config = ckpt_lib.restore_model_variables(path)
    mismatch = models.architecture_mismatch(
        saved_config.get("model"), model_cfg, f"init_from={path}"
    )
    if mismatch:
        raise ValueError(mismatch)

    def fit(target, loaded, what):
        ckpt_lib.check_weights_fit(
            loaded,
            target,
            f"init_from={path}: the {what} weights do not fit this config's "
            f"config.{'model' if what == 'generator' else 'discriminator'}",
        )
        return jax.tree.map(lambda t, l: jnp.asarray(l, t.dtype), target, loaded)

    gen = fit(state.gen_params, gen_params, "generator")
    state = state.replace(gen_params=gen, ema_params=jax.tree.map(jnp.copy, gen))
    if disc_vars is not None and state.disc_params is not None:
        state = state.replace(
            disc_params=fit(state.disc_params, disc_vars["params"], "discriminator"),
            disc_spectral_norm=fit(
                state.disc_spectral_norm, disc_vars["spectral_norm"], "discriminator spectral-norm"
            ),
        )
    logging.info("initialised weights from %s", path)
    return jax.device_put(state, state_sharding)
