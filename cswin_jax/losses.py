"""Generator and discriminator losses of the Sinkhorn-GAN, in float32.

Every function here is pure `jax.numpy`, jittable and vmappable, and casts its inputs to float32
first, so a bfloat16 prediction under mixed precision is scored in float32 (the original raised a
TypeError when prediction and target dtypes differed, which skipped every AMP step).

Images are NHWC with the 31 bands last: `hsi: [B, H, W, 31]` (any leading shape works for the
pointwise losses). Discriminator logits are `[B, H', W', 1]`.

Terms:

* `charbonnier`: mean(sqrt((p - t)^2 + eps^2)), eps 1e-3.
* `sam_loss`: spectral angle in radians, the original's form: per-pixel L2 normalisation with
  `F.normalize` semantics (x / max(||x||, 1e-6)), cosine clamped to [-0.999, 0.999], acos, mean.
  Identical spectra therefore score acos(0.999) = 0.0447 rad, not 0 (kept for parity).
* `mrae_loss`: mean(|p - t| / max(|t|, eps)) with a training-safe floor eps (default 1e-3): the
  metric's (t + 1e-8) denominator explodes on ARAD's dark pixels, and training on it is
  ill-conditioned.
* `adversarial_generator_loss` / `discriminator_sinkhorn_loss`: the GAN objectives on
  `cswin_jax.sinkhorn.sinkhorn_divergences` (the generator minimises the divergence from the
  detached real maps, the discriminator maximises it).
* `r1_penalty`: R1 on the real HSI input.
* `adaptive_loss_weights` / `generator_loss`: the combined generator loss (the
  original's warm-up and ramp of the term weights, plus an MRAE term).

Lazy R1 regularisation (done by the trainer, not here): the penalty is added to the
discriminator loss only every `loss.r1_interval` (16) discriminator steps and multiplied by that
interval, so its expected contribution per step equals the every-step penalty (StyleGAN2). The
original computed R1 only when `iteration % 16 == 0` coincided with a discriminator step, which
never happened under gradient accumulation 2, and used neither the 1/2 nor the interval factor.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cswin_jax.sinkhorn import sinkhorn_divergences

CHARBONNIER_EPSILON = 1e-3
SAM_NORMALIZE_EPS = 1e-6
SAM_COSINE_CLAMP = 0.999
MRAE_LOSS_EPS = 1e-3


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Pointwise terms.
# --------------------------------------------------------------------------------------------


def charbonnier(pred: jax.Array, target: jax.Array, eps: float = CHARBONNIER_EPSILON) -> jax.Array:
    """Charbonnier loss mean(sqrt((pred - target)^2 + eps^2)).

    Args:
      pred: [..., C] prediction, any float dtype.
      target: same shape as `pred`.
      eps: smoothing constant (the original's 1e-3).

    Returns:
      float32 scalar.
    """
    diff = _f32(pred) - _f32(target)
    return jnp.mean(jnp.sqrt(diff * diff + jnp.float32(eps) ** 2))


def _normalize_bands(x: jax.Array, eps: float) -> jax.Array:
    """`torch.nn.functional.normalize` over the last axis: x / max(||x||_2, eps)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def sam_loss(
    pred: jax.Array,
    target: jax.Array,
    normalize_eps: float = SAM_NORMALIZE_EPS,
    cosine_clamp: float = SAM_COSINE_CLAMP,
) -> jax.Array:
    """Spectral angle mapper loss in radians (the original's `SAMLoss`).

    Args:
      pred: [..., C] prediction with the bands on the last axis.
      target: same shape as `pred`.
      normalize_eps: floor of the per-pixel L2 norm.
      cosine_clamp: the cosine is clamped to [-cosine_clamp, cosine_clamp] before acos, so
        gradients stay bounded; identical spectra score acos(cosine_clamp).

    Returns:
      float32 scalar, mean angle over pixels; NaN when any input is NaN.
    """
    pred_unit = _normalize_bands(_f32(pred), normalize_eps)
    target_unit = _normalize_bands(_f32(target), normalize_eps)
    cosine = jnp.sum(pred_unit * target_unit, axis=-1)
    cosine = jnp.clip(cosine, -cosine_clamp, cosine_clamp)
    # A NaN prediction stays NaN (the original maps it to 0, a perfect score), so the
    # non-finite step guard sees it.
    return jnp.mean(jnp.arccos(cosine))


def mrae_loss(pred: jax.Array, target: jax.Array, eps: float = MRAE_LOSS_EPS) -> jax.Array:
    """Training MRAE mean(|pred - target| / max(|target|, eps)).

    The floor keeps the loss well conditioned on near-black pixels; the evaluation metric
    (`cswin_jax.metrics.mrae`) keeps the original's (target + 1e-8) denominator instead.

    Args:
      pred: [..., C] prediction.
      target: same shape as `pred`.
      eps: denominator floor.

    Returns:
      float32 scalar.
    """
    pred, target = _f32(pred), _f32(target)
    return jnp.mean(jnp.abs(pred - target) / jnp.maximum(jnp.abs(target), eps))


# --------------------------------------------------------------------------------------------
# GAN objectives on the Sinkhorn divergence.
# --------------------------------------------------------------------------------------------


def adversarial_generator_loss(
    fake_logits: jax.Array,
    real_logits: jax.Array,
    sinkhorn_cfg: Mapping[str, Any],
    *,
    rescale_floor: float | None = None,
) -> jax.Array:
    """Generator adversarial term clip(mean_b S(fake_b, stop_gradient(real_b)), 0, loss_clip).

    The real logits are detached, but the joint scale still routes gradient to the fake cloud
    when the fake holds the largest |value| (as in the original).

    Args:
      fake_logits: [B, H', W', 1] discriminator logits of the generated HSI.
      real_logits: [B, H', W', 1] discriminator logits of the real HSI.
      sinkhorn_cfg: `config.sinkhorn` (also reads `loss_clip`).
      rescale_floor: see `sinkhorn_divergences`.

    Returns:
      float32 scalar.
    """
    div, _ = sinkhorn_divergences(
        fake_logits,
        jax.lax.stop_gradient(real_logits),
        sinkhorn_cfg,
        rescale_floor=rescale_floor,
    )
    return jnp.clip(jnp.mean(div), 0.0, float(sinkhorn_cfg.loss_clip))


def discriminator_sinkhorn_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    sinkhorn_cfg: Mapping[str, Any],
    *,
    rescale_floor: float | None = None,
) -> jax.Array:
    """Discriminator loss -mean_b S(real_b, fake_b), gradients to both maps.

    The fake HSI is detached upstream (the trainer feeds `stop_gradient(fake_hsi)` to D); both
    logit maps here depend on the discriminator's parameters. No clamp: the original's hard
    clamp of S at 0 only killed the gradient near convergence.

    Args:
      real_logits: [B, H', W', 1].
      fake_logits: [B, H', W', 1].
      sinkhorn_cfg: `config.sinkhorn`.
      rescale_floor: see `sinkhorn_divergences`.

    Returns:
      float32 scalar.
    """
    div, _ = sinkhorn_divergences(
        real_logits, fake_logits, sinkhorn_cfg, rescale_floor=rescale_floor
    )
    return -jnp.mean(div)


# --------------------------------------------------------------------------------------------
# R1.
# --------------------------------------------------------------------------------------------


def r1_penalty(
    logits_fn: Callable[[jax.Array], tuple[jax.Array, Any]],
    hsi: jax.Array,
    gamma: float,
    *,
    half: bool = True,
) -> tuple[jax.Array, Any]:
    """R1 gradient penalty on the real HSI input of the discriminator.

    penalty = f * gamma * mean_b sum_{h,w,c} (d sum(logits) / d hsi)^2 with f = 1/2 (`half`,
    the standard R1 and the original's later fix) or f = 1 (`half=False`, the original CSWIN v2
    trainer's `apply_r1_regularization`). Computed in float32. Lazy regularisation (every
    `loss.r1_interval` discriminator steps, multiplied by the interval) is the trainer's job.

    Args:
      logits_fn: hsi -> (logits [B, H', W', 1], aux); closes over the RGB input and the
        discriminator variables, e.g. `lambda h: D.apply(vars, rgb, h, train=True,
        mutable=['spectral_norm'])`; aux (e.g. the updated spectral-norm state) is passed
        through. Differentiate `r1_penalty` w.r.t. the discriminator parameters inside
        `logits_fn`'s closure for the D update (double backprop).
      hsi: [B, H, W, 31] real HSI.
      gamma: R1 weight (`loss.r1_gamma`, 10).
      half: use the 1/2 factor.

    Returns:
      (penalty float32 scalar, aux).
    """

    def summed_logits(hsi_in: jax.Array):
        logits, aux = logits_fn(hsi_in)
        return jnp.sum(_f32(logits)), aux

    grad_hsi, aux = jax.grad(summed_logits, has_aux=True)(_f32(hsi))
    per_sample = jnp.sum(jnp.square(grad_hsi), axis=tuple(range(1, grad_hsi.ndim)))
    factor = 0.5 if half else 1.0
    return jnp.float32(factor * gamma) * jnp.mean(per_sample), aux


def chunked_r1_penalty(
    logits_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]],
    rgb: jax.Array,
    hsi: jax.Array,
    gamma: float,
    *,
    chunks: int = 1,
    half: bool = True,
) -> tuple[jax.Array, Any]:
    """`r1_penalty` over `chunks` slices of the batch, one slice at a time.

    The penalty's double backward keeps the discriminator's forward and first-backward
    activations, the largest part of a GAN step's memory at the default width
    (`bench/memory.py --trainer --r1_chunks 1,4` prints the effect of chunking). Here the
    batch is cut into `chunks` strided slices (samples c, c + chunks, ...: each device's share
    of a batch-sharded array stays on it) and a checkpointed `lax.scan` runs them in turn, so
    the backward holds one slice's activations. The discriminator treats samples
    independently (no batch statistics), so the value and its gradient are the full batch's,
    up to summation order. `chunks=1` is `r1_penalty` itself.

    Args:
      logits_fn: (rgb, hsi) -> (logits, aux), e.g. a train-mode discriminator call; aux (the
        spectral-norm state) is taken from the last slice: the power iteration does not
        depend on the data, so every slice returns the same one.
      rgb, hsi: [B, H, W, 3] and [B, H, W, 31], B divisible by `chunks`.
    """
    if chunks == 1:
        return r1_penalty(lambda h: logits_fn(rgb, h), hsi, gamma, half=half)
    batch = hsi.shape[0]
    if chunks < 1 or batch % chunks:
        raise ValueError(
            f"loss.r1_chunks={chunks} must divide the discriminator's batch of {batch}"
        )

    def strided(x):  # [B, ...] -> [chunks, B / chunks, ...], slice c = samples c, c + chunks
        return jnp.moveaxis(x.reshape(batch // chunks, chunks, *x.shape[1:]), 1, 0)

    @jax.checkpoint
    def one_slice(total, slices):
        rgb_c, hsi_c = slices
        penalty, aux = r1_penalty(lambda h: logits_fn(rgb_c, h), hsi_c, gamma, half=half)
        return total + penalty, aux

    total, auxes = jax.lax.scan(one_slice, jnp.zeros((), jnp.float32), (strided(rgb), strided(hsi)))
    return total / chunks, jax.tree.map(lambda a: a[-1], auxes)


# --------------------------------------------------------------------------------------------
# Combined generator loss.
# --------------------------------------------------------------------------------------------


def adaptive_loss_weights(step: Any, loss_cfg: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Loss weights of the original's `NoiseRobustLoss.get_adaptive_weights`.

    With it = max(step, 0), W = `loss.warmup_iterations`, R = `loss.adaptive_ramp_iterations`,
    p = min(1, (it - W) / R):
      it < W:  rec = l_rec, perc = l_perc * it/W, adv = 0.5 * l_adv * it/W, sam = l_sam * it/W;
      it >= W: rec = l_rec (1 - 0.3 p), perc = l_perc (1 + p), adv = l_adv (1 + 0.5 p),
               sam = l_sam.
    `loss.use_adaptive_weights` False gives the plain lambdas. The MRAE term (not in the
    original) always weighs `loss.lambda_mrae`.

    `step` is the generator's optimizer step (the original keyed this to its iteration counter,
    which counted micro-batches; here the schedule is in optimizer steps). A Python int computes
    the weights as Python floats and rounds them to float32, exactly like the original; a traced
    step computes them in float32 (within 1 ulp).

    Returns:
      dict with float32 scalars 'rec', 'perc', 'adv', 'sam', 'mrae'.
    """
    lam_rec = float(loss_cfg.lambda_rec)
    lam_perc = float(loss_cfg.lambda_perceptual)
    lam_adv = float(loss_cfg.lambda_adversarial)
    lam_sam = float(loss_cfg.lambda_sam)
    lam_mrae = float(loss_cfg.lambda_mrae)
    warmup = int(loss_cfg.warmup_iterations)
    ramp = float(loss_cfg.adaptive_ramp_iterations)

    if not loss_cfg.use_adaptive_weights:
        weights = {"rec": lam_rec, "perc": lam_perc, "adv": lam_adv, "sam": lam_sam}
    elif isinstance(step, (int, np.integer)):
        it = max(int(step), 0)
        if it < warmup:
            f = it / warmup
            weights = {
                "rec": lam_rec,
                "perc": lam_perc * f,
                "adv": lam_adv * 0.5 * f,
                "sam": lam_sam * f,
            }
        else:
            p = min(1.0, (it - warmup) / ramp)
            weights = {
                "rec": lam_rec * (1.0 - 0.3 * p),
                "perc": lam_perc * (1.0 + p),
                "adv": lam_adv * (1.0 + 0.5 * p),
                "sam": lam_sam,
            }
    else:
        it = jnp.maximum(jnp.asarray(step), 0).astype(jnp.float32)
        in_warmup = it < warmup
        f = it / jnp.float32(max(warmup, 1))
        p = jnp.clip((it - warmup) / jnp.float32(ramp), 0.0, 1.0)
        weights = {
            "rec": jnp.where(in_warmup, lam_rec, lam_rec * (1.0 - 0.3 * p)),
            "perc": jnp.where(in_warmup, lam_perc * f, lam_perc * (1.0 + p)),
            "adv": jnp.where(in_warmup, lam_adv * 0.5 * f, lam_adv * (1.0 + 0.5 * p)),
            "sam": jnp.where(in_warmup, lam_sam * f, lam_sam),
        }
    weights["mrae"] = lam_mrae
    return {
        k: jnp.asarray(np.float32(v) if isinstance(v, float) else v, jnp.float32)
        for k, v in weights.items()
    }


def generator_loss(
    hsi_pred: jax.Array,
    hsi_true: jax.Array,
    fake_logits: jax.Array | None,
    real_logits: jax.Array | None,
    step: Any,
    config: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Combined generator loss (the original's `NoiseRobustLoss.forward`).

    total = clip(w_rec * Charbonnier + w_sam * SAM + w_adv * adversarial + w_mrae * MRAE,
    0, loss.max_loss_value), weights from `adaptive_loss_weights(step, config.loss)`. The
    perceptual term is 0: no feature extractor ships (the original's default lambda is 0 too).

    Args:
      hsi_pred: [B, H, W, 31] generator output (any float dtype; scored in float32).
      hsi_true: [B, H, W, 31] ground truth.
      fake_logits: [B, H', W', 1] D logits of `hsi_pred`, or None (generator-only recipe).
      real_logits: [B, H', W', 1] D logits of `hsi_true` (detached here), or None.
      step: generator optimizer step (int or int array).
      config: the run config (reads `config.loss` and `config.sinkhorn`).

    Returns:
      (total float32 scalar, terms) with terms: reconstruction, perceptual, adversarial, sam,
      mrae, weighted_rec, weighted_perc, weighted_adv, weighted_sam, weighted_mrae and the
      weights weight_rec, weight_perc, weight_adv, weight_sam, weight_mrae.

    `config_checks.validate_config` refuses `loss.lambda_perceptual > 0` (no feature extractor
    is available).
    """
    loss_cfg = config.loss
    pred, true = _f32(hsi_pred), _f32(hsi_true)
    weights = adaptive_loss_weights(step, loss_cfg)

    zero = jnp.zeros((), jnp.float32)
    terms = {
        "reconstruction": charbonnier(pred, true),
        "perceptual": zero,
        "sam": sam_loss(pred, true),
        "mrae": mrae_loss(pred, true) if float(loss_cfg.lambda_mrae) != 0 else zero,
    }
    use_adversarial = (
        fake_logits is not None
        and real_logits is not None
        and float(loss_cfg.lambda_adversarial) != 0
    )
    terms["adversarial"] = (
        adversarial_generator_loss(fake_logits, real_logits, config.sinkhorn)
        if use_adversarial
        else zero
    )
    weighted = {
        "weighted_rec": weights["rec"] * terms["reconstruction"],
        "weighted_perc": weights["perc"] * terms["perceptual"],
        "weighted_adv": weights["adv"] * terms["adversarial"],
        "weighted_sam": weights["sam"] * terms["sam"],
        "weighted_mrae": weights["mrae"] * terms["mrae"],
    }
    total = (
        weighted["weighted_rec"]
        + weighted["weighted_perc"]
        + weighted["weighted_adv"]
        + weighted["weighted_sam"]
        + weighted["weighted_mrae"]
    )
    total = jnp.clip(total, 0.0, float(loss_cfg.max_loss_value))
    terms.update(weighted)
    terms.update({f"weight_{k}": v for k, v in weights.items()})
    return total, terms
