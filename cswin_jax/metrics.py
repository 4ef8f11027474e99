"""Evaluation metrics and the ARAD-1K / MST++ centre-crop protocol, in float32.

Every metric reduces over the whole input, like the original (validation batches hold one
image; for per-image numbers `jax.vmap` a metric over the batch). Inputs are NHWC with the 31
bands last: `[B, H, W, C]` or `[H, W, C]`; any float dtype, scored in float32.

* `mrae`: mean(|p - t| / (t + 1e-8)), the original's signed denominator (MST++ uses |p - t| / t).
* `rmse`, `mae`: global root-mean-square and mean absolute error.
* `psnr`: 20 log10(1 / sqrt(mse)) with data range 1 and the global MSE; 100 dB if mse < 1e-10.
* `ssim`: the original's fallback SSIM (the one that runs, since pytorch_msssim is not a
  dependency): 11x11 Gaussian window (sigma 1.5, float32), depthwise per band, zero "same"
  padding 5, C1 = 0.01^2, C2 = 0.03^2, mean over every pixel and band.
* `sam`: spectral angle in degrees; bands L2-normalised with eps 1e-8, cosine clamped to
  [-1 + 1e-8, 1 - 1e-8] (in float32 the upper bound is exactly 1.0), mean over pixels.
* `compute_metrics`: all six; `clamp_predictions=True` adds the same six computed on the
  prediction clamped to [0, 1] (as NTIRE submissions are), under `<name>_clamped` keys.
* `center_crop_metrics`: the MST++ protocol (`compute_mst_center_crop_metrics`): slice
  [128:-128, 128:-128]; an empty slice gives the sentinel {mrae 999, psnr 0, ssim 0, sam 999};
  otherwise the centred 226x256 window of the slice is scored (the whole slice when it is
  smaller than 226x256). For the 482x512 ARAD frame this is rows 128:354, columns 128:384.

All functions are jittable (shapes are static; the protocol's branches depend only on shapes).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

MRAE_EPS = 1e-8
PSNR_DATA_RANGE = 1.0
PSNR_MSE_FLOOR = 1e-10
PSNR_CAP = 100.0
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
SAM_EPS = 1e-8

CENTER_SLICE_MARGIN = 128  # the original's VALIDATION_CENTER_CROP_START/END (128, -128)
ARAD1K_CROP_HEIGHT = 226
ARAD1K_CROP_WIDTH = 256
EMPTY_CROP_SENTINEL = {"mrae": 999.0, "psnr": 0.0, "ssim": 0.0, "sam": 999.0}

METRIC_NAMES = ("psnr", "mrae", "rmse", "ssim", "sam", "mae")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_pair(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"metrics: prediction shape {pred.shape} != target shape {target.shape}; "
            "expected matching [B, H, W, C] or [H, W, C] arrays"
        )
    if pred.ndim not in (3, 4):
        raise ValueError(
            f"metrics: expected [B, H, W, C] or [H, W, C] arrays, got shape {pred.shape}"
        )


def mrae(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean relative absolute error mean(|p - t| / (t + 1e-8)). Returns a float32 scalar."""
    pred, target = _f32(pred), _f32(target)
    return jnp.mean(jnp.abs(pred - target) / (target + MRAE_EPS))


def rmse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Root-mean-square error over every element. Returns a float32 scalar."""
    diff = _f32(pred) - _f32(target)
    return jnp.sqrt(jnp.mean(diff * diff))


def mae(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over every element. Returns a float32 scalar."""
    return jnp.mean(jnp.abs(_f32(pred) - _f32(target)))


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """PSNR in dB with data range 1 and the MSE over the whole tensor; 100 if mse < 1e-10."""
    diff = _f32(pred) - _f32(target)
    mse = jnp.mean(diff * diff)
    safe_mse = jnp.maximum(mse, PSNR_MSE_FLOOR)
    value = 20.0 * jnp.log10(PSNR_DATA_RANGE / jnp.sqrt(safe_mse))
    return jnp.where(mse < PSNR_MSE_FLOOR, jnp.float32(PSNR_CAP), value)


def gaussian_taps(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D factor of the SSIM window: exp(-(x - size//2)^2 / (2 sigma^2)) computed in
    float64, stored as float32 and normalised in float32 (as torch does). [size] float32."""
    taps = np.array(
        [math.exp(-((x - size // 2) ** 2) / float(2 * sigma**2)) for x in range(size)],
        dtype=np.float32,
    )
    return taps / taps.sum(dtype=np.float32)


def gaussian_window(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The original's SSIM window: the outer product of `gaussian_taps`, multiplied out in
    float32. Returns a [size, size] float32 numpy array summing to 1."""
    taps = gaussian_taps(size, sigma)
    return np.outer(taps, taps).astype(np.float32)


def _as_batch(x: jax.Array) -> jax.Array:
    return x[None] if x.ndim == 3 else x


def ssim(pred: jax.Array, target: jax.Array) -> jax.Array:
    """SSIM with the original's fallback implementation (see module docstring).

    Args:
      pred: [B, H, W, C] or [H, W, C].
      target: same shape.

    Returns:
      float32 scalar, mean of the SSIM map over batch, pixels and bands.
    """
    pred, target = _as_batch(_f32(pred)), _as_batch(_f32(target))
    taps = gaussian_taps()
    pad = SSIM_WINDOW_SIZE // 2

    def blur(x: jax.Array) -> jax.Array:
        # The window is an outer product, so the "same" zero-padded 2-D convolution is a 1-D
        # pass along H, then one along W, each a sum of shifted copies (XLA CPU lowers the
        # depthwise 11x11 convolution this replaces to much slower code).
        height, width = x.shape[1], x.shape[2]
        xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0)))
        x = sum(float(t) * xp[:, k : k + height] for k, t in enumerate(taps))
        xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
        return sum(float(t) * xp[:, :, k : k + width] for k, t in enumerate(taps))

    mu_pred = blur(pred)
    mu_target = blur(target)
    mu_pred_sq = mu_pred * mu_pred
    mu_target_sq = mu_target * mu_target
    mu_cross = mu_pred * mu_target
    sigma_pred_sq = blur(pred * pred) - mu_pred_sq
    sigma_target_sq = blur(target * target) - mu_target_sq
    sigma_cross = blur(pred * target) - mu_cross
    ssim_map = ((2 * mu_cross + SSIM_C1) * (2 * sigma_cross + SSIM_C2)) / (
        (mu_pred_sq + mu_target_sq + SSIM_C1) * (sigma_pred_sq + sigma_target_sq + SSIM_C2)
    )
    return jnp.mean(ssim_map)


def sam(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Spectral angle in degrees, averaged over pixels (bands on the last axis).

    The cosine of identical float32 spectra can round a hair below 1, so identical inputs give
    a small non-zero angle (about 0.01 degrees), as in the original. NaN inputs give NaN.
    """
    pred, target = _f32(pred), _f32(target)
    pred_unit = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), SAM_EPS)
    target_unit = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), SAM_EPS)
    cosine = jnp.sum(pred_unit * target_unit, axis=-1)
    cosine = jnp.clip(cosine, np.float32(-1.0 + SAM_EPS), np.float32(1.0 - SAM_EPS))
    # A NaN prediction scores NaN, not the perfect 0 the original maps it to.
    return jnp.mean(jnp.degrees(jnp.arccos(cosine)))


def compute_metrics(
    pred: jax.Array, target: jax.Array, clamp_predictions: bool = False
) -> dict[str, jax.Array]:
    """All six metrics on whole arrays.

    Args:
      pred: [B, H, W, C] or [H, W, C] prediction.
      target: same shape.
      clamp_predictions: also score the prediction clamped to [0, 1] and report those numbers
        beside the raw ones under `<name>_clamped`.

    Returns:
      dict of float32 scalars: psnr, mrae, rmse, ssim, sam, mae (+ the `_clamped` six).
    """
    _check_pair(pred, target)
    pred, target = _f32(pred), _f32(target)
    functions = {"psnr": psnr, "mrae": mrae, "rmse": rmse, "ssim": ssim, "sam": sam, "mae": mae}
    results = {name: fn(pred, target) for name, fn in functions.items()}
    if clamp_predictions:
        clamped = jnp.clip(pred, 0.0, 1.0)
        results.update({f"{name}_clamped": fn(clamped, target) for name, fn in functions.items()})
    return results


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
    """Centred height x width window of [B, H, W, C] / [H, W, C] (y0 = (H-h)//2, x0 = (W-w)//2).

    Raises:
      ValueError: the input is smaller than the window.
    """
    h, w = x.shape[-3], x.shape[-2]
    if h < height or w < width:
        raise ValueError(f"center_crop: input {h}x{w} is smaller than the {height}x{width} window")
    y0, x0 = (h - height) // 2, (w - width) // 2
    return x[..., y0 : y0 + height, x0 : x0 + width, :]


def center_crop_metrics(
    pred: jax.Array, target: jax.Array, clamp_predictions: bool = False
) -> dict[str, jax.Array]:
    """The original's centre-crop protocol (`compute_mst_center_crop_metrics`).

    Slice [128:-128, 128:-128] of H and W; if that is empty, return the sentinel
    {mrae 999, psnr 0, ssim 0, sam 999} (four keys, as the original); if it is at least
    226x256, score its centred 226x256 window; otherwise score the whole slice (the original's
    fallback when the ARAD crop raised).

    Args:
      pred: [B, H, W, C] or [H, W, C] full-frame prediction.
      target: same shape.
      clamp_predictions: see `compute_metrics`.

    Returns:
      dict of float32 scalars (see `compute_metrics`), or the sentinel dict.
    """
    _check_pair(pred, target)
    window = scored_window(pred.shape[-3], pred.shape[-2])
    if window is None:
        sentinel = dict(EMPTY_CROP_SENTINEL)
        if clamp_predictions:
            sentinel.update({f"{k}_clamped": v for k, v in EMPTY_CROP_SENTINEL.items()})
        return {k: jnp.float32(v) for k, v in sentinel.items()}
    y0, x0, y1, x1 = window
    return compute_metrics(
        pred[..., y0:y1, x0:x1, :], target[..., y0:y1, x0:x1, :], clamp_predictions
    )


def scored_window(height: int, width: int) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the pixels `center_crop_metrics` scores in an HxW frame, None when
    the slice [128:-128, 128:-128] is empty: the centred 226x256 window of the slice, or the
    whole slice when it is smaller (rows 128:354, columns 128:384 of a 482x512 frame)."""
    margin = CENTER_SLICE_MARGIN
    if height <= 2 * margin or width <= 2 * margin:
        return None
    y0, x0, y1, x1 = margin, margin, height - margin, width - margin
    if y1 - y0 >= ARAD1K_CROP_HEIGHT and x1 - x0 >= ARAD1K_CROP_WIDTH:
        y0 += (y1 - y0 - ARAD1K_CROP_HEIGHT) // 2
        x0 += (x1 - x0 - ARAD1K_CROP_WIDTH) // 2
        y1, x1 = y0 + ARAD1K_CROP_HEIGHT, x0 + ARAD1K_CROP_WIDTH
    return y0, x0, y1, x1
