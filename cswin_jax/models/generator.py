"""The noise-robust CSWin U-Net generator (RGB -> 31-band HSI), NHWC Flax port.

Topology (the original CSWIN v2 PyTorch generator, B = base_channels):

  x = rgb + denoising(rgb)                       conv3x3 3->B/2, GELU, B/2->B/2, GELU, B/2->3
  emb = GELU(GN(conv3x3 3->B))                   embedding
  e1 = encoder1(emb)                             2 x DualTransformerBlock(B, split[0])
  e2 = encoder2(down1(e1))                       resize to (H//2, W//2), conv3x3 B->2B, GN, GELU
  x = bottleneck(down2(e2))                      2 x DTB(4B, split[2])
  x = decoder1(concat[resize(up1(x)), e2])       upsample x2, conv3x3 4B->2B, GN, GELU; 2 x DTB(4B)
  x = compressor2(concat[resize(up2(compressor1(x))), e1]); x = decoder2(x)
  hsi = to_spectral(resize(x) + emb)             conv3x3 B->31, then output activation / clamp

`resize` is the size fix for odd inputs (e.g. 241 -> 120 -> 240 rows): a bilinear resize to the
skip tensor's size, applied after the up module. Parameter names follow `cswin_jax.convert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cswin_jax import config_checks
from cswin_jax.models.attention import (
    CSWinAttention,
    CSWinStripeAttention,
    EfficientSpectralAttention,
)
from cswin_jax.models.layers import (
    Conv3x3,
    DepthwiseConv3x3,
    Pointwise,
    adaptive_group_norm,
    checkpointed_call,
    gelu,
    resize_bilinear,
)

Array = jax.Array
Dtype = Any


class DWConvBlock(nn.Module):
    """Depthwise 3x3 -> pointwise 1x1 -> adaptive GroupNorm -> GELU. [B,H,W,I] -> [B,H,W,O].

    The depthwise output is not kept for the backward pass: the depthwise and pointwise pair
    runs under `checkpointed_call` (recomputing the nine-tap sum), and the pointwise layer
    has its written-out backward (`channel_matmul`). Same numbers; measured on the default
    generator's forward and backward at batch 2, 128², float32 (`bench/step_parts.py --parts
    g_fwd_bwd`, alternating): 4.96 -> 4.70 s and 5.84 -> 5.37 GiB of XLA temporaries (the
    recomputation alone: 5.30 GiB at unchanged time; recomputing the GroupNorm and GELU too:
    4.41 GiB but 5.34 s).
    """

    features: int
    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        depthwise = DepthwiseConv3x3(dtype=self.dtype, name="depthwise")
        pointwise = Pointwise(
            self.features, dtype=self.dtype, written_backward=True, name="pointwise"
        )
        x = checkpointed_call(self, (depthwise, pointwise), x)
        x = adaptive_group_norm(self.features, self.norm_groups, dtype=self.dtype, name="norm")(x)
        return gelu(x)


class FeedForward(nn.Module):
    """1x1 C->4C, GELU, DWConvBlock(4C, 4C), 1x1 4C->C (the original's `ffn.net`)."""

    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        hidden = 4 * channels
        h = gelu(Pointwise(hidden, dtype=self.dtype, name="net_0")(x))
        h = DWConvBlock(hidden, self.norm_groups, dtype=self.dtype, name="net_2")(h)
        return Pointwise(channels, dtype=self.dtype, name="net_3")(h)


class NoiseAwareBlock(nn.Module):
    """Noise-aware gating, residual inside: x + gate * features.

    noise = sigmoid(conv3x3(C/4->1)(GELU(conv3x3(C->C/4)(x)))); features = two DWConvBlocks;
    gate = sigmoid(1x1 conv(concat[features, noise])) (noise is the last input channel).
    """

    norm_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        noise = Conv3x3(channels // 4, dtype=self.dtype, name="noise_est_conv_0")(x)
        noise = Conv3x3(1, dtype=self.dtype, name="noise_est_conv_2")(gelu(noise))
        noise = jax.nn.sigmoid(noise)
        features = DWConvBlock(
            channels, self.norm_groups, dtype=self.dtype, name="features_conv_0"
        )(x)
        features = DWConvBlock(
            channels, self.norm_groups, dtype=self.dtype, name="features_conv_1"
        )(features)
        gate = Pointwise(channels, dtype=self.dtype, name="gate_0")(
            jnp.concatenate([features, noise], axis=-1)
        )
        return x + jax.nn.sigmoid(gate) * features


class SpectralAttentionWrapper(nn.Module):
    """Holds `EfficientSpectralAttention` under the name `attention` (the original wraps it in a
    NaN-checking module, which adds that level to the parameter names)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return EfficientSpectralAttention(self.num_heads, dtype=self.dtype, name="attention")(x)


class SpatialAttentionWrapper(nn.Module):
    """Holds the CSWin attention (`'v2'` or `'cswin'`) under the name `attention`."""

    num_heads: int
    split_size: int
    attention_mode: str = "v2"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cls = CSWinAttention if self.attention_mode == "v2" else CSWinStripeAttention
        return cls(self.num_heads, self.split_size, dtype=self.dtype, name="attention")(x)


class DualTransformerBlock(nn.Module):
    """x += ESA(norm1 x); x += CSWin(norm2 x); x += FFN(norm3 x); x = NoiseAware(x).

    norm1/2/3 are adaptive GroupNorms (base `norm_groups`). x: [B, H, W, C] -> same.
    `remat='attention'` recomputes both attention branches in the backward pass; under
    `remat='block'` (the caller recomputes the whole block) the attention branches, the
    feed-forward and the noise-aware block are each recomputed again inside that
    recomputation (`layers.checkpointed_call`).
    """

    split_size: int
    num_heads: int
    norm_groups: int
    attention_mode: str = "v2"
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]

        def norm(name):
            return adaptive_group_norm(channels, self.norm_groups, dtype=self.dtype, name=name)

        def branch(module, h, policies=("attention", "block")):
            # Under 'block' the whole block is recomputed (by the caller) and, inside that
            # recomputation, each sub-layer again: only one sub-layer's activations are live.
            return checkpointed_call(self, module, h) if self.remat in policies else module(h)

        spectral = SpectralAttentionWrapper(self.num_heads, dtype=self.dtype, name="spectral_attn")
        x = x + branch(spectral, norm("norm1")(x))
        spatial = SpatialAttentionWrapper(
            self.num_heads,
            self.split_size,
            self.attention_mode,
            dtype=self.dtype,
            name="spatial_attn",
        )
        x = x + branch(spatial, norm("norm2")(x))
        ffn = FeedForward(self.norm_groups, dtype=self.dtype, name="ffn")
        x = x + branch(ffn, norm("norm3")(x), ("block",))
        noise_block = NoiseAwareBlock(self.norm_groups, dtype=self.dtype, name="noise_block")
        return branch(noise_block, x, ("block",))


class Resample(nn.Module):
    """Bilinear resize to `(height, width)` -> conv3x3 -> adaptive GroupNorm -> GELU.

    The original's down (resize to (H//2, W//2)) and up (resize to (2H, 2W)) modules.
    """

    features: int
    norm_groups: int
    factor: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        height, width = x.shape[1], x.shape[2]
        if self.factor < 1:
            size = (height // 2, width // 2)
        else:
            size = (2 * height, 2 * width)
        x = resize_bilinear(x, *size)
        x = Conv3x3(self.features, dtype=self.dtype, name="conv")(x)
        x = adaptive_group_norm(self.features, self.norm_groups, dtype=self.dtype, name="norm")(x)
        return gelu(x)


def _three_split_sizes(split_sizes: Sequence[int]) -> tuple[int, int, int]:
    """The original pads a shorter list by repeating its last value and truncates longer ones.

    `split_sizes` holds at least one size (`config_checks.check_model`).
    """
    sizes = [int(s) for s in split_sizes]
    sizes = (sizes + [sizes[-1]] * 3)[:3]
    return sizes[0], sizes[1], sizes[2]


def output_head(
    x: Array,
    *,
    activation: str,
    train: bool,
    step: Array | int | None,
    activation_delay_iters: int,
    clamp_range: float,
    clamp_after_iters: int,
) -> Array:
    """The original's output activation and train-only clamp (see `Generator` for `step`).

    x: [B, H, W, C] float32 pre-activation -> same shape. `activation` is one of
    `config_checks.OUTPUT_ACTIVATIONS`.
    """
    step = jnp.asarray(0 if step is None else step)
    if activation == "sigmoid":
        return jax.nn.sigmoid(x)
    if activation == "tanh":
        return 0.5 * (jnp.tanh(x) + 1.0)
    linear = jnp.asarray(True)
    if activation == "delayed_sigmoid":
        active = step > activation_delay_iters
        x = jnp.where(active, jax.nn.sigmoid(x), x)
        linear = jnp.logical_not(active)
    if train:
        in_window = jnp.asarray(True) if clamp_after_iters == 0 else step < clamp_after_iters
        clamped = jnp.clip(x, -clamp_range, clamp_range)
        x = jnp.where(jnp.logical_and(linear, in_window), clamped, x)
    return x


class Generator(nn.Module):
    """CSWIN v2 generator. Fields mirror `config.model`; their defaults are configs/base.py's
    (`build_generator(config.model)` builds one, its values checked).

    Call: `hsi = model.apply({'params': params}, rgb, train=False, step=None)` with
    rgb: [B, H, W, in_channels] (any H, W >= 2), returns [B, H, W, out_channels] float32.

    `step` replaces the original's hidden iteration counter. It is the counter value the
    original's output head *sees*: an original eval forward after `set_iteration(k)` corresponds
    to `step=k`, and an original train forward after `set_iteration(k)` to `step=k + 1` (the
    original increments its counter before using it in every train-mode forward; its seed trainer
    calls `set_iteration(iteration)` before each forward, so it sees `iteration + 1`). `None`
    means 0. It may be a traced int array. With it:

    * `delayed_sigmoid` applies the sigmoid when `step > activation_delay_iters` (strict),
      identity before; `sigmoid` is sigma(x), `tanh` is 0.5 * (tanh(x) + 1), `none` identity.
    * Only when `train=True` and the output is linear (`none`, or `delayed_sigmoid` not yet
      active) and (`clamp_after_iters == 0` or `step < clamp_after_iters`) is the output
      hard-clamped to [-clamp_range, clamp_range]. Eval never clamps.

    `dtype` is the compute dtype (bfloat16 allowed); parameters are `param_dtype` (float32);
    GroupNorm statistics, attention logits and softmax are float32; the output is float32.
    `blocks_per_stage`: dual-attention blocks per stage (the original: 2, fixed).
    `remat`: 'none', 'attention' (recompute attention branches in backward) or 'block'
    (recompute whole DualTransformerBlocks, and each sub-layer again inside them) — memory
    only, same numbers (`layers.ordered_checkpoint`; bench/memory.py prints each policy's XLA
    temporaries).
    """

    in_channels: int
    out_channels: int
    base_channels: int
    split_sizes: Sequence[int]
    norm_groups: int
    num_heads: int
    blocks_per_stage: int
    output_activation: str
    activation_delay_iters: int
    clamp_range: float
    clamp_after_iters: int
    attention_mode: str
    remat: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _stage(self, x: Array, name: str, split_size: int) -> Array:
        for index in range(self.blocks_per_stage):
            block = DualTransformerBlock(
                split_size,
                self.num_heads,
                self.norm_groups,
                self.attention_mode,
                remat=self.remat,
                dtype=self.dtype,
                name=f"{name}_{index}",
            )
            x = checkpointed_call(self, block, x) if self.remat == "block" else block(x)
        return x

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False, step: Array | int | None = None) -> Array:
        """rgb: [B, H, W, in_channels] -> hsi [B, H, W, out_channels] float32."""
        if self.param_dtype != jnp.float32:
            raise ValueError(f"Generator: param_dtype must be float32, found {self.param_dtype}")
        if rgb.ndim != 4 or rgb.shape[-1] != self.in_channels:
            raise ValueError(
                f"Generator: expected rgb of shape [B, H, W, {self.in_channels}] (NHWC), "
                f"found shape {tuple(rgb.shape)}"
            )
        split_enc1, split_enc2, split_mid = _three_split_sizes(self.split_sizes)
        base, groups, dt = self.base_channels, self.norm_groups, self.dtype

        x = rgb.astype(dt)
        noise = gelu(Conv3x3(base // 2, dtype=dt, name="denoising_0")(x))
        noise = gelu(Conv3x3(base // 2, dtype=dt, name="denoising_2")(noise))
        x = x + Conv3x3(self.in_channels, dtype=dt, name="denoising_4")(noise)

        emb = Conv3x3(base, dtype=dt, name="embedding_0")(x)
        emb = gelu(adaptive_group_norm(base, groups, dtype=dt, name="embedding_1")(emb))

        e1 = self._stage(emb, "encoder1", split_enc1)
        x = Resample(2 * base, groups, 0.5, dtype=dt, name="down1")(e1)
        e2 = self._stage(x, "encoder2", split_enc2)
        x = Resample(4 * base, groups, 0.5, dtype=dt, name="down2")(e2)
        x = self._stage(x, "bottleneck", split_mid)

        x = Resample(2 * base, groups, 2.0, dtype=dt, name="up1")(x)
        x = resize_bilinear(x, e2.shape[1], e2.shape[2])
        x = self._stage(jnp.concatenate([x, e2], axis=-1), "decoder1", split_enc2)
        x = Pointwise(2 * base, dtype=dt, name="compressor1")(x)

        x = Resample(base, groups, 2.0, dtype=dt, name="up2")(x)
        x = resize_bilinear(x, e1.shape[1], e1.shape[2])
        x = Pointwise(base, dtype=dt, name="compressor2")(jnp.concatenate([x, e1], axis=-1))
        x = self._stage(x, "decoder2", split_enc1)

        x = resize_bilinear(x, emb.shape[1], emb.shape[2])
        hsi = Conv3x3(self.out_channels, dtype=dt, name="to_spectral")(x + emb)
        return output_head(
            hsi.astype(jnp.float32),
            activation=self.output_activation,
            train=train,
            step=step,
            activation_delay_iters=self.activation_delay_iters,
            clamp_range=self.clamp_range,
            clamp_after_iters=self.clamp_after_iters,
        )


def build_generator(model_cfg: Any, dtype: Dtype = jnp.float32) -> Generator:
    """Builds the generator from `config.model` (an ml_collections.ConfigDict or a dict with
    every key of configs/base.py's; checked by `config_checks.check_model`)."""
    config_checks.check_model(model_cfg, "cswin")
    return Generator(
        in_channels=int(model_cfg["in_channels"]),
        out_channels=int(model_cfg["out_channels"]),
        base_channels=int(model_cfg["base_channels"]),
        split_sizes=tuple(int(s) for s in model_cfg["split_sizes"]),
        norm_groups=int(model_cfg["norm_groups"]),
        num_heads=int(model_cfg["num_heads"]),
        blocks_per_stage=int(model_cfg["blocks_per_stage"]),
        output_activation=str(model_cfg["output_activation"]),
        activation_delay_iters=int(model_cfg["activation_delay_iters"]),
        clamp_range=float(model_cfg["clamp_range"]),
        clamp_after_iters=int(model_cfg["clamp_after_iters"]),
        attention_mode=str(model_cfg["attention_mode"]),
        remat=str(model_cfg["remat"]),
        dtype=dtype,
    )
