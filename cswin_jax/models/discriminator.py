"""The spectral-norm transformer discriminator of the original CSWIN v2 PyTorch code, NHWC.

`Discriminator(rgb, hsi)` concatenates `rgb: [B, H, W, 3]` and `hsi: [B, H, W, 31]` and returns
a patch map of realness logits `[B, H', W', 1]` (float32, clamped to +-10) with
H' = floor((floor((H - 1) / 2)) / 2) + 1 (32x32 for 128x128 patches):

  input_proj        SN conv 7x7 (34 -> D) -> GELU                      (D = base_dim)
  encoder_stages_0  blocks at D, full resolution
  encoder_stages_1  downsample SN conv 3x3 stride 2 pad 1 (D -> 2D) -> GELU, blocks at 2D
  encoder_stages_2  downsample SN conv 3x3 stride 2 pad 1 (2D -> 4D) -> GELU, blocks at 4D
  output_proj       SN conv 3x3 (4D -> 2D) -> GELU -> SN conv 1x1 (2D -> 1), clamp +-10

Each block: x += 0.1 * MDTA(LN1(x)); x += 0.1 * MLP(LN2(x)), with channel LayerNorm (eps 1e-5)
and Restormer-style channel attention (per-head learnable temperature, q/k L2-normalised over
pixels, logits clamped to +-50, float32 softmax). Every convolution is spectrally normalised
(`cswin_jax.models.spectral_norm.SNConv`).

Variables: `{'params': ..., 'spectral_norm': ...}`. Module names follow the original's attribute
names (see `cswin_jax.convert`): `input_proj/conv`, `encoder_stages_1/downsample/conv`,
`encoder_stages_0/blocks_0/{norm1,norm2}`, `.../attn/{temperature,qkv,qkv_dwconv,project_out}`,
`.../mlp_0`, `.../mlp_3`, `output_proj_0`, `output_proj_2`. Conv kernels are HWIO, named
`kernel` (the original's `weight_orig`); each conv's power-iteration vectors are `u` (O,) and
`v` (I/groups * kh * kw,) in collection `spectral_norm`, in the original's order.

Usage:
  train (advances u, v):  logits, updates = D.apply(vars, rgb, hsi, train=True,
                                                    mutable=['spectral_norm'])
  eval (stored u, v):     logits = D.apply(vars, rgb, hsi, train=False)

Non-finite values: the original raises in training mode (not possible inside `jit`; the trainer
checks losses instead) and falls back in eval mode; the eval fallbacks are reproduced here: a
non-finite input gives an all-zero output map, non-finite attention logits become 0, and a block
whose output is not finite everywhere passes its input through.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cswin_jax.models.layers import gelu
from cswin_jax.models.spectral_norm import SNConv

Array = jax.Array
Dtype = Any

RGB_CHANNELS = 3
HSI_CHANNELS = 31
ATTENTION_L2_EPS = 1e-12  # F.normalize default
ATTENTION_LOGIT_CLAMP = 50.0
OUTPUT_CLAMP = 10.0
RESIDUAL_SCALE = 0.1
LAYER_NORM_EPS = 1e-5


def xavier_uniform(gain: float) -> nn.initializers.Initializer:
    """PyTorch `xavier_uniform_(w, gain)`: U(+-gain * sqrt(6 / (fan_in + fan_out))).

    For an HWIO kernel, fan_in = kh*kw*I and fan_out = kh*kw*O, as PyTorch computes them from
    the OIHW weight (I is the per-group input width for grouped convs).
    """
    return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform", in_axis=-2, out_axis=-1)


# Memory: the backward pass of these cheap elementwise/reduction steps would otherwise keep
# several float32 copies of full-resolution activations; recomputing them in the backward
# pass keeps only their inputs (the depthwise conv inside SNConv does the same). Same numbers
# either way.
_gelu = jax.checkpoint(gelu)  # keeps x, not erf/exp intermediates


@jax.checkpoint
def _channel_layer_norm(x: Array, scale: Array, bias: Array) -> Array:
    """PyTorch LayerNorm over the last axis (biased variance, eps 1e-5), in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * lax.rsqrt(var + LAYER_NORM_EPS) * scale + bias).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _channel_attention_weights(q: Array, k: Array, temperature: Array, nan_safe: bool) -> Array:
    """softmax(clamp((q/|q|)(k/|k|)^T * t, +-50)) in float32.

    q, k: [B, N, heads, c] (N = pixels); returns [B, heads, c, c].

    q and k are L2-normalised over the N (pixel) axis with eps 1e-12, as F.normalize(dim=-1)
    on the original's (B, heads, c, N) layout. `nan_safe`: the original's eval-mode
    nan_to_num(0) on the logits.
    """
    q = q.astype(jnp.float32)
    k = k.astype(jnp.float32)
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), ATTENTION_L2_EPS)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=1, keepdims=True), ATTENTION_L2_EPS)
    logits = jnp.einsum("bnhc,bnhd->bhcd", q, k) * temperature[:, None, None]
    logits = jnp.clip(logits, -ATTENTION_LOGIT_CLAMP, ATTENTION_LOGIT_CLAMP)
    if nan_safe:
        logits = jnp.nan_to_num(logits, nan=0.0)
    return jax.nn.softmax(logits, axis=-1)


class ChannelLayerNorm(nn.Module):
    """`nn.LayerNorm(C)` applied channels-last: x [..., C] -> same, in x's dtype (stats float32)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return _channel_layer_norm(x, scale, bias)


class SNConvBlock(nn.Module):
    """SN conv (xavier-uniform gain sqrt(2), zero bias) -> GELU. Submodule name `conv`."""

    features: int
    kernel_size: int
    strides: int
    padding: int
    dtype: Dtype = jnp.float32
    strided_via_subsample: bool = False  # see SNConv

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = SNConv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            strided_via_subsample=self.strided_via_subsample,
            kernel_init=xavier_uniform(math.sqrt(2.0)),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="conv",
        )(x, train)
        return _gelu(y)


class SpectralSelfAttention(nn.Module):
    """MDTA-style channel attention. x: [B, H, W, C] -> [B, H, W, C].

    qkv = SN dw3x3(SN 1x1(x)) (no biases); channel = head * (C / heads) + j. q and k are
    L2-normalised over pixels (eps 1e-12) in float32, logits = (q k^T) * temperature clamped to
    +-50, float32 softmax over the key channels, out = attn v, then SN 1x1 `project_out`.
    """

    dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        batch, height, width, _ = x.shape
        heads = self.num_heads
        head_dim = self.dim // heads
        temperature = self.param("temperature", nn.initializers.ones, (heads,), jnp.float32)
        conv = lambda features, k, groups, name: SNConv(  # noqa: E731
            features,
            (k, k),
            padding=k // 2,
            feature_group_count=groups,
            use_bias=False,
            kernel_init=xavier_uniform(1.0),
            dtype=self.dtype,
            name=name,
        )
        qkv = conv(3 * self.dim, 1, 1, "qkv")(x, train)
        qkv = conv(3 * self.dim, 3, 3 * self.dim, "qkv_dwconv")(qkv, train)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (batch, height * width, heads, head_dim)
        attn = _channel_attention_weights(
            q.reshape(shape), k.reshape(shape), temperature, not train
        )
        if self.dropout > 0.0:
            attn = nn.Dropout(self.dropout, deterministic=not train)(attn)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn.astype(self.dtype), v.reshape(shape))
        out = out.reshape(batch, height, width, self.dim)
        return conv(self.dim, 1, 1, "project_out")(out, train)


class SNTransformerBlock(nn.Module):
    """x += 0.1 * attn(LN1(x)); x += 0.1 * MLP(LN2(x)). x: [B, H, W, C] -> same.

    MLP = SN 1x1 (C -> mlp_ratio*C, bias) -> GELU -> dropout -> SN 1x1 (-> C, bias) -> dropout,
    PyTorch default init, submodules `mlp_0` and `mlp_3` (the original's Sequential indices).
    LayerNorms run in float32 over the channel axis, eps 1e-5.
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = ChannelLayerNorm(name="norm1")(x)
        y = SpectralSelfAttention(
            self.dim, self.num_heads, dropout=self.dropout, dtype=self.dtype, name="attn"
        )(y, train)
        x = x + RESIDUAL_SCALE * y
        y = ChannelLayerNorm(name="norm2")(x)
        y = SNConv(int(self.dim * self.mlp_ratio), dtype=self.dtype, name="mlp_0")(y, train)
        y = _gelu(y)
        if self.dropout > 0.0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = SNConv(self.dim, dtype=self.dtype, name="mlp_3")(y, train)
        if self.dropout > 0.0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + RESIDUAL_SCALE * y


class DiscriminatorStage(nn.Module):
    """Optional stride-2 `downsample` SNConvBlock, then `blocks_<i>` at width `dim`."""

    dim: int
    num_blocks: int
    num_heads: int
    mlp_ratio: float
    dropout: float
    downsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    strided_via_subsample: bool = False  # see SNConv

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.downsample:
            x = SNConvBlock(
                self.dim,
                3,
                2,
                1,
                dtype=self.dtype,
                strided_via_subsample=self.strided_via_subsample,
                name="downsample",
            )(x, train)
        # remat: keep only each block's input for the backward pass and recompute the rest
        # (explicit names keep the parameter paths identical with and without remat).
        block_cls = (
            nn.remat(SNTransformerBlock, static_argnums=(2,)) if self.remat else SNTransformerBlock
        )
        for i in range(self.num_blocks):
            y = block_cls(
                self.dim,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, train)
            # The original reverts a block with a non-finite output to its input (eval only).
            x = y if train else jnp.where(jnp.all(jnp.isfinite(y)), y, x)
        return x


class Discriminator(nn.Module):
    """SNTransformerDiscriminator (see the module docstring).

    Fields mirror `config.discriminator` (defaults in configs/base.py); `dtype` is the compute
    dtype (bfloat16 under mixed precision), parameters, norms, softmax and the output stay
    float32.
    """

    base_dim: int
    num_heads: int
    num_blocks: Sequence[int]
    mlp_ratio: float
    dropout: float
    remat: bool  # recompute each transformer block in the backward pass (memory only)
    rgb_channels: int = RGB_CHANNELS
    hsi_channels: int = HSI_CHANNELS
    dtype: Dtype = jnp.float32
    # The stride-2 downsampling convolutions as stride-1 ones subsampled (see SNConv): same
    # numbers, a slower forward and a faster double backward. The trainer turns it on for the
    # R1 penalty's discriminator call only.
    strided_via_subsample: bool = False

    @nn.compact
    def __call__(self, rgb: Array, hsi: Array, train: bool = False) -> Array:
        """rgb: [B, H, W, 3], hsi: [B, H, W, 31] -> logits [B, H', W', 1] float32 in [-10, 10]."""
        self._check_inputs(rgb, hsi)
        x = jnp.concatenate([rgb, hsi], axis=-1).astype(self.dtype)
        x = SNConvBlock(self.base_dim, 7, 1, 3, dtype=self.dtype, name="input_proj")(x, train)
        dim = self.base_dim
        for i, blocks in enumerate(self.num_blocks):
            if i > 0:
                dim *= 2
            x = DiscriminatorStage(
                dim,
                blocks,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                downsample=i > 0,
                remat=self.remat,
                dtype=self.dtype,
                strided_via_subsample=self.strided_via_subsample,
                name=f"encoder_stages_{i}",
            )(x, train)
        x = SNConv(
            dim // 2,
            (3, 3),
            padding=1,
            kernel_init=xavier_uniform(0.1),
            dtype=self.dtype,
            name="output_proj_0",
        )(x, train)
        x = _gelu(x)
        x = SNConv(1, kernel_init=xavier_uniform(0.1), dtype=self.dtype, name="output_proj_2")(
            x, train
        )
        logits = jnp.clip(x.astype(jnp.float32), -OUTPUT_CLAMP, OUTPUT_CLAMP)
        if not train:  # the original's eval fallback for a non-finite input: all zeros
            finite = jnp.all(jnp.isfinite(rgb)) & jnp.all(jnp.isfinite(hsi))
            logits = jnp.where(finite, logits, jnp.zeros_like(logits))
        return logits

    def _check_inputs(self, rgb: Array, hsi: Array) -> None:
        expected = {"rgb": self.rgb_channels, "hsi": self.hsi_channels}
        for name, arr in (("rgb", rgb), ("hsi", hsi)):
            if arr.ndim != 4 or arr.shape[-1] != expected[name]:
                raise ValueError(
                    f"Discriminator: expected {name} of shape [B, H, W, {expected[name]}] "
                    f"(NHWC), found {tuple(arr.shape)}"
                )
        if rgb.shape[:3] != hsi.shape[:3]:
            raise ValueError(
                f"Discriminator: rgb {tuple(rgb.shape)} and hsi {tuple(hsi.shape)} must share "
                "batch, height and width"
            )


def build_discriminator(disc_cfg: Mapping[str, Any], dtype: Dtype = jnp.float32) -> Discriminator:
    """Discriminator from `config.discriminator` (base_dim, num_heads, num_blocks, mlp_ratio,
    dropout, remat: bool); `dtype` is the compute dtype."""
    return Discriminator(
        base_dim=int(disc_cfg["base_dim"]),
        num_heads=int(disc_cfg["num_heads"]),
        num_blocks=tuple(int(b) for b in disc_cfg["num_blocks"]),
        mlp_ratio=float(disc_cfg["mlp_ratio"]),
        dropout=float(disc_cfg["dropout"]),
        remat=bool(disc_cfg["remat"]),
        dtype=dtype,
    )
