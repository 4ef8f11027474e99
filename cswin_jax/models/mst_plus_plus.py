"""MST++ (the NTIRE 2022 spectral-reconstruction winner), NHWC Flax port, RGB -> 31-band HSI.

Topology (the official `MST_Plus_Plus(in_channels=3, out_channels=31, n_feat=31, stage=3)`):

  x = reflect-pad rgb at the bottom/right to a multiple of 8
  f = conv_in(x)                                  3x3 conv 3->n_feat, no bias
  h = body(f)                                     `stage` cascaded SSTs (`MST` below)
  hsi = (conv_out(h) + f)[:, :H, :W]              3x3 conv n_feat->31, no bias; crop back

One SST (`MST(dim=n_feat, stage=sst_stage, num_blocks=num_blocks)`, a U-net, d = n_feat):

  e0 = embedding(x)                               3x3 conv d->d, no bias
  encoder level i: skip_i = MSAB(e_i); e_{i+1} = 4x4 stride-2 conv (pad 1, no bias) d_i->2 d_i
  bottleneck: MSAB at d * 2^sst_stage
  decoder level i: 2x2 stride-2 transposed conv (bias) to half the channels, concat with the
      skip, 1x1 conv (no bias) back to half, MSAB
  out = mapping(.) + x                            3x3 conv d->d, no bias

An MSAB holds `num_blocks[level]` blocks `x = S-MSA(x) + x; x = FFN(LN(x)) + x`, with
spectral-wise multi-head attention (tokens are channels: heads = dim / d, head dim d; q and k
L2-normalised over the pixels, `softmax(k q^T * rescale)`, a learnable per-head scale, no
sqrt(d)) plus a positional branch on v (depthwise 3x3, GELU, depthwise 3x3), and the FFN
1x1 d->4d, GELU, depthwise 3x3, GELU, 1x1 4d->d, all without bias.

Initialisation as the official code: linear layers trunc_normal(std 0.02) with zero bias,
LayerNorm ones/zeros, convolutions PyTorch's default kaiming-uniform (a = sqrt(5)), the
attention rescale ones. Parameter names follow the `cswin_jax.convert` naming rule, so an
official state_dict (`body.0.encoder_layers.0.0.blocks.0.0.to_q.weight`, ...) converts
directly; the transposed convolutions keep `(kh, kw, O, I)` kernels (PyTorch's
`(I, O, kh, kw)` transposed like a conv weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cswin_jax import config_checks
from cswin_jax.models.layers import (
    Conv2d,
    DepthwiseConv3x3,
    Pointwise,
    checkpointed_call,
    gelu,
    torch_uniform_init,
    trunc_normal_init,
)

Array = jax.Array
Dtype = Any

# The official forward pads to a multiple of 8 whatever the depth (4 would do for 2 levels).
PAD_MULTIPLE = 8


def _l2_normalize(x: Array, axis: int) -> Array:
    """PyTorch `F.normalize(x, p=2, dim=axis)`: x / max(||x||, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


class SpectralAttention(nn.Module):
    """S-MSA (the official `MS_MSA`): attention between channels, plus a positional branch.

    x: [B, H, W, C] -> [B, H, W, C], C = heads * head_dim. Logits and softmax in float32.
    """

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        heads, head_dim = self.heads, self.head_dim
        inner = heads * head_dim
        if inner != channels:
            raise ValueError(
                f"SpectralAttention: {heads} heads x {head_dim} channels != {channels} input "
                "channels (MST++ needs each stage width to be a multiple of n_feat)"
            )

        def linear(name, use_bias=False):
            return Pointwise(
                inner if name != "proj" else channels,
                use_bias=use_bias,
                kernel_init=trunc_normal_init(0.02),
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                name=name,
            )

        tokens = x.reshape(batch, height * width, channels)
        q_inp, k_inp, v_inp = (linear(n)(tokens) for n in ("to_q", "to_k", "to_v"))

        def heads_first(t):  # [B, N, heads * d] -> [B, heads, d, N]
            return t.reshape(batch, -1, heads, head_dim).transpose(0, 2, 3, 1)

        q, k, v = heads_first(q_inp), heads_first(k_inp), heads_first(v_inp)
        q = _l2_normalize(q.astype(jnp.float32), axis=-1)
        k = _l2_normalize(k.astype(jnp.float32), axis=-1)
        rescale = self.param("rescale", nn.initializers.ones, (heads,), jnp.float32)
        logits = jnp.einsum("bhin,bhjn->bhij", k, q) * rescale[:, None, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhij,bhjn->bhin", attn, v)  # [B, heads, d, N]
        out = out.transpose(0, 3, 1, 2).reshape(batch, height * width, inner)
        out = linear("proj", use_bias=True)(out).reshape(batch, height, width, channels)

        pos = v_inp.reshape(batch, height, width, channels)
        pos = DepthwiseConv3x3(use_bias=False, dtype=self.dtype, name="pos_emb_0")(pos)
        pos = DepthwiseConv3x3(use_bias=False, dtype=self.dtype, name="pos_emb_2")(gelu(pos))
        return out + pos


class FeedForward(nn.Module):
    """1x1 C->4C, GELU, depthwise 3x3, GELU, 1x1 4C->C, no biases (the official `net`)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        hidden = self.mult * channels
        h = gelu(Pointwise(hidden, use_bias=False, dtype=self.dtype, name="net_0")(x))
        h = gelu(DepthwiseConv3x3(use_bias=False, dtype=self.dtype, name="net_2")(h))
        return Pointwise(channels, use_bias=False, dtype=self.dtype, name="net_4")(h)


class PreNormFeedForward(nn.Module):
    """`FFN(LayerNorm(x))` (the official `PreNorm`: children `norm` and `fn`)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # PyTorch LayerNorm: eps 1e-5, two-pass variance, statistics in float32.
        normed = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name="norm")(
            x
        )
        return FeedForward(dtype=self.dtype, name="fn")(normed)


class SpectralAttentionBlocks(nn.Module):
    """The official `MSAB`: `num_blocks` x (S-MSA residual, pre-norm FFN residual).

    x: [B, H, W, C] -> same. `remat='attention'` recomputes each S-MSA in the backward pass,
    `'block'` each S-MSA and each FFN (`layers.checkpointed_call`).
    """

    heads: int
    head_dim: int
    num_blocks: int
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def branch(module, h, policies):
            return checkpointed_call(self, module, h) if self.remat in policies else module(h)

        for index in range(self.num_blocks):
            attention = SpectralAttention(
                self.heads, self.head_dim, dtype=self.dtype, name=f"blocks_{index}_0"
            )
            x = branch(attention, x, ("attention", "block")) + x
            ffn = PreNormFeedForward(dtype=self.dtype, name=f"blocks_{index}_1")
            x = branch(ffn, x, ("block",)) + x
        return x


class ConvTranspose2x2(nn.Module):
    """PyTorch `ConvTranspose2d(I, O, kernel_size=2, stride=2)` with bias: [B, H, W, I] ->
    [B, 2H, 2W, O].

    Stride equals the kernel, so each input pixel writes its own 2x2 output block: one matmul.
    Kernel `(2, 2, O, I)`; PyTorch's default init with fan_in = O * 4 (its weight's dim 1).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, in_features = x.shape
        fan_in = self.features * 4
        kernel = self.param(
            "kernel",
            torch_uniform_init(fan_in),
            (2, 2, self.features, in_features),
            self.param_dtype,
        )
        bias = self.param("bias", torch_uniform_init(fan_in), (self.features,), self.param_dtype)
        y = jnp.einsum("bhwi,kloi->bhkwlo", x.astype(self.dtype), kernel.astype(self.dtype))
        y = y.reshape(batch, 2 * height, 2 * width, self.features)
        return y + bias.astype(self.dtype)


class SpectralTransformer(nn.Module):
    """One SST, the official `MST(dim, stage, num_blocks)` U-net. x: [B, H, W, dim] -> same,
    H and W multiples of 2^stage."""

    dim: int
    stage: int = 2
    num_blocks: Sequence[int] = (1, 1, 1)
    remat: str = "none"
    dtype: Dtype = jnp.float32

    def _blocks(self, width: int, num_blocks: int, name: str) -> SpectralAttentionBlocks:
        return SpectralAttentionBlocks(
            width // self.dim, self.dim, num_blocks, self.remat, dtype=self.dtype, name=name
        )

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt, dim, stage = self.dtype, self.dim, self.stage

        def conv(features, name, kernel_size=3, stride=1):
            padding = 1  # 3x3 stride 1 and 4x4 stride 2 both pad 1
            return Conv2d(
                features, kernel_size, stride, padding, use_bias=False, dtype=dt, name=name
            )

        fea = conv(dim, "embedding")(x)
        skips = []
        width = dim
        for level in range(stage):
            fea = self._blocks(width, self.num_blocks[level], f"encoder_layers_{level}_0")(fea)
            skips.append(fea)
            fea = conv(2 * width, f"encoder_layers_{level}_1", kernel_size=4, stride=2)(fea)
            width *= 2
        fea = self._blocks(width, self.num_blocks[-1], "bottleneck")(fea)
        for level in range(stage):
            half = width // 2
            fea = ConvTranspose2x2(half, dtype=dt, name=f"decoder_layers_{level}_0")(fea)
            fea = jnp.concatenate([fea, skips[stage - 1 - level]], axis=-1)
            fea = Pointwise(half, use_bias=False, dtype=dt, name=f"decoder_layers_{level}_1")(fea)
            blocks = self.num_blocks[stage - 1 - level]
            fea = self._blocks(half, blocks, f"decoder_layers_{level}_2")(fea)
            width = half
        return conv(dim, "mapping")(fea) + x


class MSTPlusPlus(nn.Module):
    """MST++. Fields mirror `config.model` and `config.model.mst_plus_plus` (configs/base.py).

    Call: `hsi = model.apply({'params': params}, rgb, train=False, step=None)` with
    rgb: [B, H, W, in_channels] (any H, W >= 1), returns [B, H, W, out_channels] float32.
    `train` and `step` are accepted for the CSWin generator's call signature and ignored
    (MST++ has no train-only behaviour).

    Official defaults: n_feat 31, stage 3 SSTs of 2 levels, num_blocks (1, 1, 1) (encoder
    levels, then the bottleneck), 1,619,625 parameters. `dtype` is the compute dtype
    (bfloat16 allowed); attention logits, softmax and LayerNorm statistics are float32.
    `remat`: 'none', 'attention' or 'block' (see `SpectralAttentionBlocks`), memory only.
    """

    in_channels: int
    out_channels: int
    n_feat: int
    stage: int
    sst_stage: int
    num_blocks: Sequence[int]
    remat: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False, step: Array | int | None = None) -> Array:
        """rgb: [B, H, W, in_channels] -> hsi [B, H, W, out_channels] float32."""
        del train, step
        if self.param_dtype != jnp.float32:
            raise ValueError(f"MSTPlusPlus: param_dtype must be float32, found {self.param_dtype}")
        if rgb.ndim != 4 or rgb.shape[-1] != self.in_channels:
            raise ValueError(
                f"MSTPlusPlus: expected rgb of shape [B, H, W, {self.in_channels}] (NHWC), "
                f"found shape {tuple(rgb.shape)}"
            )
        height, width = rgb.shape[1], rgb.shape[2]
        multiple = max(PAD_MULTIPLE, 2**self.sst_stage)
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        x = jnp.pad(rgb, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        dt = self.dtype

        def conv3x3(features, name):
            return Conv2d(features, use_bias=False, dtype=dt, name=name)

        feat = conv3x3(self.n_feat, "conv_in")(x.astype(dt))
        h = feat
        for index in range(self.stage):
            h = SpectralTransformer(
                self.n_feat,
                self.sst_stage,
                tuple(self.num_blocks),
                self.remat,
                dtype=dt,
                name=f"body_{index}",
            )(h)
        hsi = conv3x3(self.out_channels, "conv_out")(h) + feat
        return hsi[:, :height, :width].astype(jnp.float32)


def build_mst_plus_plus(model_cfg: Any, dtype: Dtype = jnp.float32) -> MSTPlusPlus:
    """Builds MST++ from `config.model` and its `mst_plus_plus` section (a ConfigDict or a dict
    with every key of configs/base.py's; checked by `config_checks.check_model`)."""
    config_checks.check_model(model_cfg, "mst_plus_plus")
    mst_cfg = model_cfg["mst_plus_plus"]
    return MSTPlusPlus(
        in_channels=int(model_cfg["in_channels"]),
        out_channels=int(model_cfg["out_channels"]),
        n_feat=int(mst_cfg["n_feat"]),
        stage=int(mst_cfg["stage"]),
        sst_stage=int(mst_cfg["sst_stage"]),
        num_blocks=tuple(int(n) for n in mst_cfg["num_blocks"]),
        remat=str(model_cfg["remat"]),
        dtype=dtype,
    )
