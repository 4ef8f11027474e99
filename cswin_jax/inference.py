"""Full-frame and tiled inference, with an optional 8-way D4 self-ensemble.

Tiling follows the original CSWIN v2 PyTorch code's `PatchInference`:

* stride = tile - overlap; per axis n = max(1, (L - overlap) // stride), plus one more tile
  when (n - 1) * stride + tile < L; tile i starts at min(i * stride, max(0, L - tile)).
  For 482x512 with tile 128 / overlap 16: rows {0, 112, 224, 336, 354}, cols
  {0, 112, 224, 336, 384} (25 tiles).
* A tile shorter than `tile` (the image is shorter than a tile along that axis) is
  reflect-padded at the bottom/right (edge-replicated where the padding is longer than the
  image, which reflection cannot fill); its output and weight are cropped top-left back to
  the valid region before accumulation.
* Blending weight = outer(w, w), w = [ramp, ones, reversed ramp], ramp =
  0.5 * (1 + cos(linspace(pi, 0, r))), r = min(overlap, tile // 4); output =
  sum(tile_out * weight) / sum(weight), accumulated in float32.
* An image no larger than one tile in both axes is run whole.

One deliberate difference: the original's ramp starts at exactly 0, so every pixel covered
only by tile edges (the image's outer border) gets summed weight 0 and comes out as 0. Here
the ramp is floored at `ramp_floor` (default 1e-6), so those pixels get the plain average of
the tiles that cover them. The floor is tiny on purpose: wherever the original's summed
weight is positive the floored weights change the result by about `ramp_floor` times the
tiles' disagreement, i.e. the output matches the original there to float32 precision.

All tiles go through one jitted function of a fixed `[batch_size, tile, tile, 3]` shape (the
last batch is padded), so any image size costs a single compilation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

ApplyFn = Callable[[jax.Array], jax.Array]

DEFAULT_RAMP_FLOOR = 1e-6


class ModelApply:
    """An `apply_fn` whose model variables are passed to jit as arguments.

    Closing over the variables in a plain lambda would bake every weight into the compiled
    program as a constant (slow to compile, one compilation per variables object). Calling
    this object is `fn(variables, rgb)`.

    Attributes:
      fn: `(variables, rgb [N, h, w, 3]) -> hsi [N, h, w, C]`, traceable.
      variables: the pytree passed as `fn`'s first argument.
    """

    def __init__(self, fn: Callable[[Any, jax.Array], jax.Array], variables: Any):
        self.fn = fn
        self.variables = variables

    def __call__(self, rgb: jax.Array) -> jax.Array:
        return self.fn(self.variables, rgb)

    def runner(self, ensemble: bool) -> ApplyFn:
        """The jitted `rgb -> hsi` of these variables; shared by every `ModelApply` of the same
        `fn` (the training loop validates new weights with the program compiled once)."""
        runners = _MODEL_RUNNERS.setdefault(self.fn, {})
        if ensemble not in runners:
            fn_ref = weakref.ref(self.fn)  # a strong reference would keep the key alive

            def run(variables, rgb):
                return _maybe_ensemble(lambda x: fn_ref()(variables, x), rgb, ensemble)

            runners[ensemble] = jax.jit(run)
        jitted = runners[ensemble]
        return lambda rgb: jitted(self.variables, rgb)


# Jitted runners of `ModelApply.fn`s, keyed weakly: a discarded model frees its programs.
_MODEL_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_generator_apply(model: Any, params: Any, *, step: int | None = None) -> ModelApply:
    """Wraps a Flax generator for inference: `rgb [N, h, w, 3] -> hsi [N, h, w, C]` float32.

    Args:
      model: a generator of `cswin_jax.models` (CSWin or MST++; any module called as
        `model.apply({'params': p}, rgb, train=False, step=step)`).
      params: its parameters.
      step: the optimizer step the weights come from; it selects the output activation of
        `delayed_sigmoid` models. None leaves the model's own default.
    """

    def fn(variables, rgb):
        hsi = model.apply(variables, rgb, train=False, step=step)
        return hsi.astype(jnp.float32)

    return ModelApply(fn, {"params": params})


# Jitted runners for plain callables, keyed weakly by the callable so that repeated calls with
# the same apply_fn reuse one compilation and a discarded apply_fn frees its runner.
_PLAIN_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _runner(apply_fn: ApplyFn, ensemble: bool) -> ApplyFn:
    if isinstance(apply_fn, ModelApply):
        return apply_fn.runner(ensemble)
    try:
        cache = _PLAIN_RUNNERS.setdefault(apply_fn, {})
        # The cached runner must not hold apply_fn strongly, or the weak key never dies.
        fn_ref = weakref.ref(apply_fn)
    except TypeError:  # not weak-referenceable (e.g. a builtin): no caching
        cache = {}

        def fn_ref():
            return apply_fn

    if ensemble not in cache:
        cache[ensemble] = jax.jit(lambda rgb: _maybe_ensemble(fn_ref(), rgb, ensemble))
    return cache[ensemble]


# ----------------------------------------------------------------------------- D4 ensemble


def _d4_forward(x: jax.Array, k: int, flip: bool) -> jax.Array:
    """x: [N, H, W, C]; flip W, then rotate k quarter turns in the (H, W) plane."""
    if flip:
        x = jnp.flip(x, axis=2)
    return jnp.rot90(x, k=k, axes=(1, 2))


def _d4_inverse(y: jax.Array, k: int, flip: bool) -> jax.Array:
    y = jnp.rot90(y, k=-k, axes=(1, 2))
    if flip:
        y = jnp.flip(y, axis=2)
    return y


_D4 = tuple((flip, k) for flip in (False, True) for k in range(4))


def self_ensemble(apply_fn: ApplyFn, rgb: jax.Array) -> jax.Array:
    """Mean over the 8 flips/rotations (dihedral group D4) of the inverse-mapped outputs.

    rgb: [N, H, W, 3]; returns [N, H, W, C] float32. Views of equal shape are batched into
    one model call (one call for square inputs, two otherwise).
    """
    n = rgb.shape[0]
    views = [_d4_forward(rgb, k, flip) for flip, k in _D4]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(view.shape, []).append(i)
    total = None
    for members in groups.values():
        outs = apply_fn(jnp.concatenate([views[i] for i in members], axis=0))
        outs = outs.astype(jnp.float32)
        for j, i in enumerate(members):
            flip, k = _D4[i]
            out = _d4_inverse(outs[j * n : (j + 1) * n], k, flip)
            total = out if total is None else total + out
    return total / len(_D4)


def _maybe_ensemble(apply_fn: ApplyFn, rgb: jax.Array, ensemble: bool) -> jax.Array:
    if ensemble:
        return self_ensemble(apply_fn, rgb)
    return apply_fn(rgb).astype(jnp.float32)


# ----------------------------------------------------------------------------- tiling


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of `length` pixels (the original's rule)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got overlap={overlap}")
    if length < 1:
        raise ValueError(f"image axis length must be >= 1, got {length}")
    stride = tile - overlap
    n = max(1, (length - overlap) // stride)
    if (n - 1) * stride + tile < length:
        n += 1
    return [min(i * stride, max(0, length - tile)) for i in range(n)]


def tile_positions(height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """[n_tiles, 4] int64 rows of (h_start, w_start, h_end, w_end), row-major like the original.

    Ends are clipped to the image, so a tile on an image shorter than `tile` is short.
    """
    rows = tile_starts(height, tile, overlap)
    cols = tile_starts(width, tile, overlap)
    return np.array(
        [(h0, w0, min(h0 + tile, height), min(w0 + tile, width)) for h0 in rows for w0 in cols],
        dtype=np.int64,
    )


def blend_weights(tile: int, overlap: int, ramp_floor: float = DEFAULT_RAMP_FLOOR) -> np.ndarray:
    """[tile, tile] float32 cosine-ramp blending mask; ramp_floor=0 gives the original's mask."""
    ramp_len = min(overlap, tile // 4)
    weight = np.ones(tile, dtype=np.float32)
    if ramp_len > 0:
        ramp = (0.5 * (1.0 + np.cos(np.linspace(np.pi, 0.0, ramp_len)))).astype(np.float32)
        ramp = np.maximum(ramp, np.float32(ramp_floor))
        weight[:ramp_len] = ramp
        weight[tile - ramp_len :] = ramp[::-1]
    return np.outer(weight, weight).astype(np.float32)


def _pad_tile(patch: np.ndarray, tile: int) -> np.ndarray:
    """patch: [h, w, 3] -> [tile, tile, 3], reflect-padded bottom/right (edge if too short)."""
    pads = [(0, tile - patch.shape[0]), (0, tile - patch.shape[1]), (0, 0)]
    for axis in (0, 1):
        if pads[axis][1] == 0:
            continue
        axis_pad = [(0, 0)] * 3
        axis_pad[axis] = pads[axis]
        # Reflection (without repeating the edge) needs pad < length, as in PyTorch.
        mode = "reflect" if pads[axis][1] < patch.shape[axis] else "edge"
        patch = np.pad(patch, axis_pad, mode=mode)
    return patch


def _as_batch(rgb: Any) -> tuple[np.ndarray, bool]:
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim == 3:
        return rgb[None], True
    if rgb.ndim == 4:
        return rgb, False
    raise ValueError(f"rgb must be [H, W, 3] or [B, H, W, 3], got shape {rgb.shape}")


def _check_channels(rgb: np.ndarray) -> None:
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb must have 3 channels in the last axis (NHWC), got {rgb.shape}")


def predict_whole(apply_fn: ApplyFn, rgb: Any, ensemble: bool = False) -> np.ndarray:
    """Runs the model on the full frame(s) at once.

    Args:
      apply_fn: `[N, h, w, 3] -> [N, h, w, C]`.
      rgb: [H, W, 3] or [B, H, W, 3] float32 (MST++ min-max normalised).
      ensemble: average the 8 D4 flips/rotations.

    Returns:
      [H, W, C] or [B, H, W, C] float32 numpy, matching `rgb`'s rank.
    """
    batch, squeeze = _as_batch(rgb)
    _check_channels(batch)
    run = _runner(apply_fn, ensemble)
    out = np.concatenate([np.asarray(run(batch[i : i + 1])) for i in range(len(batch))], axis=0)
    return out[0] if squeeze else out


def predict_tiled(
    apply_fn: ApplyFn,
    rgb: Any,
    *,
    tile: int,
    overlap: int,
    batch_size: int,
    ensemble: bool = False,
    ramp_floor: float = DEFAULT_RAMP_FLOOR,
) -> np.ndarray:
    """Overlapping-tile inference with cosine-ramp blending (see the module docstring).

    Args:
      apply_fn: `[N, h, w, 3] -> [N, h, w, C]`; called (jitted) on `[batch_size, tile, tile, 3]`
        batches, or once on the whole frame when it is no larger than one tile.
      rgb: [H, W, 3] or [B, H, W, 3] float32, any H, W >= 1.
      tile: square tile side (the original's `patch_size`).
      overlap: overlap between neighbouring tiles, 0 <= overlap < tile.
      batch_size: tiles per model call; the last batch is padded to this size.
      ensemble: average the 8 D4 flips/rotations of every tile.
      ramp_floor: lower bound on the blending ramp; must be > 0 so that no pixel gets zero
        summed weight (0 reproduces the original's zero border).

    Returns:
      [H, W, C] or [B, H, W, C] float32 numpy, matching `rgb`'s rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ramp_floor < 0:
        raise ValueError(f"ramp_floor must be >= 0, got {ramp_floor}")
    batch, squeeze = _as_batch(rgb)
    _check_channels(batch)
    height, width = batch.shape[1:3]
    if height <= tile and width <= tile:
        return predict_whole(apply_fn, rgb, ensemble=ensemble)

    positions = tile_positions(height, width, tile, overlap)
    weight = blend_weights(tile, overlap, ramp_floor)[..., None]
    run = _runner(apply_fn, ensemble)
    outputs = []
    for image in batch:
        tiles = np.stack([_pad_tile(image[h0:h1, w0:w1], tile) for h0, w0, h1, w1 in positions])
        hsi_sum = None
        weight_sum = np.zeros((height, width, 1), np.float32)
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first : first + batch_size]
            n_valid = len(chunk)
            if n_valid < batch_size:  # keep one compiled shape
                chunk = np.concatenate([chunk, np.zeros_like(tiles[: batch_size - n_valid])])
            chunk_out = np.asarray(run(chunk), dtype=np.float32)[:n_valid]
            if hsi_sum is None:
                hsi_sum = np.zeros((height, width, chunk_out.shape[-1]), np.float32)
            for (h0, w0, h1, w1), tile_out in zip(
                positions[first : first + n_valid], chunk_out, strict=True
            ):
                tile_weight = weight[: h1 - h0, : w1 - w0]
                hsi_sum[h0:h1, w0:w1] += tile_out[: h1 - h0, : w1 - w0] * tile_weight
                weight_sum[h0:h1, w0:w1] += tile_weight
        outputs.append(hsi_sum / np.maximum(weight_sum, np.finfo(np.float32).tiny))
    out = np.stack(outputs)
    return out[0] if squeeze else out


def eval_settings(config: Any) -> Any:
    """`config.eval` of a run's config (a ConfigDict or a checkpoint's dict) over the defaults
    of `configs/base.py`, so a checkpoint written before a key existed gets its default."""
    from configs import base  # noqa: PLC0415

    settings = base.get_config().eval
    saved = config.get("eval") if hasattr(config, "get") else None
    settings.update(dict(saved or {}))
    return settings


def predict_frame(
    apply_fn: ApplyFn, rgb: Any, settings: Any, *, tiled: bool | None = None, ensemble=False
) -> np.ndarray:
    """rgb [H, W, 3] (or [B, H, W, 3]) -> float32 cube: the whole frame in one call, or tiled
    with the tiles of `settings` (`config.eval`: tile_size, tile_overlap, tile_batch_size)
    when `tiled` (default: `settings.tiled`). The one prediction path of training
    validation, `evaluate` and `predict`."""
    if settings.tiled if tiled is None else tiled:
        return predict_tiled(
            apply_fn,
            rgb,
            tile=int(settings.tile_size),
            overlap=int(settings.tile_overlap),
            batch_size=int(settings.tile_batch_size),
            ensemble=ensemble,
        )
    return predict_whole(apply_fn, rgb, ensemble=ensemble)


def summed_weight(
    height: int, width: int, tile: int, overlap: int, ramp_floor: float = DEFAULT_RAMP_FLOOR
) -> np.ndarray:
    """[H, W] float32 sum of the blending weights of every tile covering each pixel.

    With ramp_floor=0 this is the original's denominator: its output is 0 exactly where this
    is 0. (An image no larger than one tile is run whole; this returns ones then.)
    """
    if height <= tile and width <= tile:
        return np.ones((height, width), np.float32)
    weight = blend_weights(tile, overlap, ramp_floor)
    total = np.zeros((height, width), np.float32)
    for h0, w0, h1, w1 in tile_positions(height, width, tile, overlap):
        total[h0:h1, w0:w1] += weight[: h1 - h0, : w1 - w0]
    return total


def seam_mask(height: int, width: int, tile: int, overlap: int, margin: int) -> np.ndarray:
    """[H, W] bool, True within `margin` pixels of a tile edge that lies inside the image.

    Image borders and the padded bottom/right of short tiles' edges are included too when the
    tile was padded there (the model saw padding that the whole frame does not have).
    """
    mask = np.zeros((height, width), bool)
    if height <= tile and width <= tile:
        return mask
    for h0, w0, h1, w1 in tile_positions(height, width, tile, overlap):
        padded_h = h1 - h0 < tile
        padded_w = w1 - w0 < tile
        edges_h = [e for e in (h0, h1) if 0 < e < height or (e == height and padded_h)]
        edges_w = [e for e in (w0, w1) if 0 < e < width or (e == width and padded_w)]
        for e in edges_h:
            mask[max(0, e - margin) : e + margin, w0:w1] = True
        for e in edges_w:
            mask[h0:h1, max(0, e - margin) : e + margin] = True
    return mask


COMPUTE_DTYPES = ("float32", "bfloat16")


def load_generator(
    checkpoint_dir: str, *, use_ema: bool = True, step: int | None = None, dtype: str = "float32"
) -> tuple[ModelApply, dict]:
    """Restores a generator from a checkpoint for inference.

    Args:
      checkpoint_dir: any folder `cswin_jax.checkpoint.restore_model_variables` reads.
      use_ema: EMA weights of a training state (the default; weights-only checkpoints hold
        only one set).
      step: optimizer step passed to the generator (matters only for 'delayed_sigmoid').
      dtype: compute dtype, 'float32' or 'bfloat16' (weights stay float32 and the output is
        float32; bfloat16 runs the convolutions, attention and MLPs in bfloat16, as training
        with `mixed_precision` does).

    Returns:
      (apply_fn `[N, h, w, 3] -> [N, h, w, 31]` float32, the run's config dict).
    """
    from configs import base
    from cswin_jax import checkpoint, models

    params, _, saved = checkpoint.restore_model_variables(checkpoint_dir, use_ema=use_ema)
    if "model" not in saved:
        raise ValueError(f"{checkpoint_dir}: the checkpoint's config has no 'model' section")
    # Keys added since the checkpoint was written get configs/base.py's defaults.
    config = base.complete(saved)
    config_dict = config.to_dict()
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    model = models.build_generator(config.model, dtype=jnp.dtype(dtype))
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 16, 16, config.model.in_channels))
    )
    checkpoint.check_weights_fit(
        params,
        abstract["params"],
        f"{checkpoint_dir}: the generator weights do not fit the architecture in the "
        "checkpoint's config (another architecture or a mismatched config.model?)",
    )
    delayed = config.model.get("output_activation") == "delayed_sigmoid"
    if models.architecture(config.model) == "cswin" and delayed and step is None:
        logging.warning(
            "%s: output_activation='delayed_sigmoid' depends on the training step, which the "
            "checkpoint does not give; assuming the sigmoid is active (pass step to override)",
            checkpoint_dir,
        )
        step = int(config.model.activation_delay_iters) + 1
    params = jax.tree.map(jnp.asarray, params)
    return make_generator_apply(model, params, step=step), config_dict
