"""The generator's attention modules: spectral attention and CSWin spatial attention, NHWC.

* `EfficientSpectralAttention`: the original's pooled-query/key channel attention.
* `CSWinAttention`: the original CSWIN v2 algorithm (`attention_mode='v2'`): full-length
  row and column attention with all heads, zero padding to a multiple of the split size
  without a key mask, a window-cyclic relative bias and LePE on each branch output.
* `CSWinStripeAttention`: the CSWin paper's cross-shaped windows (`attention_mode='cswin'`).

Logits, softmax and normalisation statistics are computed in float32 whatever `dtype` is.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cswin_jax.models.layers import (
    DepthwiseConv3x3,
    GroupNorm,
    Pointwise,
    gelu,
    trunc_normal_init,
)

Array = jax.Array
Dtype = Any

# Attention with more than _CHUNK_ABOVE_LOGITS logits runs in sequential chunks of rows/columns
# of _MAX_LOGITS_PER_CHUNK logits each: this bounds memory (a full 482x512 frame would otherwise
# materialise ~2 GB of logits per branch) and keeps each chunk in cache: on XLA CPU, 16 MB chunks
# ran full frames faster than 64 MB ones (bench/forward.py --sizes 482x512 prints the time). One
# 128x128 patch (9.4M logits) runs unchunked.
_CHUNK_ABOVE_LOGITS = 1 << 24
_MAX_LOGITS_PER_CHUNK = 1 << 22
# Up to this many chunks are unrolled into the program; more run in a loop.
_MAX_UNROLLED_CHUNKS = 8


class EfficientSpectralAttention(nn.Module):
    """The original's `EfficientSpectralAttention(C, heads)`.

    q, k = GroupNorm(8)(1x1 conv(x)) (no bias), v = 1x1 conv(x) (no bias). The spatial means
    of q and k are L2-normalised per head (eps 1e-8); logits[i, j] = q_i * k_j / sqrt(d) (an
    outer product of pooled vectors), softmax over j; out[..., head, i] = sum_j attn[i, j]
    v[..., head, j]; then proj = GroupNorm(8)(1x1 conv(out + pos_embed(x))), where pos_embed
    is depthwise 3x3 -> GELU -> depthwise 3x3 of the input. The GroupNorms use 8 groups
    whatever the generator's norm_groups (the original does not pass its config here).

    x: [B, H, W, C] -> [B, H, W, C]. Channel index = head * d + j, d = C / heads.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        heads = self.num_heads
        head_dim = channels // heads
        q = Pointwise(channels, use_bias=False, dtype=self.dtype, name="to_q_0")(x)
        q = GroupNorm(8, dtype=self.dtype, name="to_q_1")(q)
        k = Pointwise(channels, use_bias=False, dtype=self.dtype, name="to_k_0")(x)
        k = GroupNorm(8, dtype=self.dtype, name="to_k_1")(k)
        v = Pointwise(channels, use_bias=False, dtype=self.dtype, name="to_v")(x)

        def pooled_unit(t):
            mean = jnp.mean(t.astype(jnp.float32), axis=(1, 2)).reshape(batch, heads, head_dim)
            norm = jnp.sqrt(jnp.sum(jnp.square(mean), axis=-1, keepdims=True))
            return jnp.nan_to_num(mean / jnp.maximum(norm, 1e-8))

        q_unit, k_unit = pooled_unit(q), pooled_unit(k)
        logits = q_unit[..., :, None] * k_unit[..., None, :] / math.sqrt(head_dim)
        attn = jax.nn.softmax(logits, axis=-1)  # [B, heads, i, j], float32
        # Apply the per-head mixing as one block-diagonal [C, C] matrix per image:
        # out[c_out = head*d + i] = sum_j attn[head, i, j] v[c_in = head*d + j].
        eye = jnp.eye(heads, dtype=attn.dtype)
        mixing = jnp.einsum("bhij,hg->bhjgi", attn, eye).reshape(batch, channels, channels)
        out = jnp.einsum("bxyc,bce->bxye", v, mixing.astype(v.dtype))

        pos = DepthwiseConv3x3(dtype=self.dtype, name="pos_embed_0")(x)
        pos = DepthwiseConv3x3(dtype=self.dtype, name="pos_embed_2")(gelu(pos))
        out = Pointwise(channels, dtype=self.dtype, name="proj_0")(out + pos)
        return GroupNorm(8, dtype=self.dtype, name="proj_1")(out)


class LePE(nn.Module):
    """The original's locally-enhanced positional encoding: x + GELU(depthwise3x3(x)).

    x: [B, H, W, C] -> [B, H, W, C]. (Applied to the attention output, not to V.)
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x + gelu(DepthwiseConv3x3(dtype=self.dtype, name="pe_conv_0")(x))


def window_cyclic_bias(table_line: Array, length: int, split_size: int) -> Array:
    """bias[head, i, j] = table_line[(i mod s) - (j mod s) + s - 1, head].

    table_line: [2s - 1, heads] (the centre row or column of a relative-position table);
    `length` must be a multiple of s. Returns [heads, length, length] float32: one s x s block
    tiled over the padded row/column (periodic in both axes, as the original builds it). The
    gather touches only s*s entries; the tiling is a broadcast, which XLA fuses cheaply into the
    logits (a full-size gather there was the slowest part of the attention on CPU).
    """
    pos = np.arange(split_size)
    index = pos[:, None] - pos[None, :] + split_size - 1
    block = jnp.transpose(table_line.astype(jnp.float32)[index], (2, 0, 1))  # [heads, s, s]
    heads, reps = block.shape[0], length // split_size
    tiled = jnp.broadcast_to(
        block[:, None, :, None, :], (heads, reps, split_size, reps, split_size)
    )
    return tiled.reshape(heads, length, length)


@jax.custom_vjp
def _add_shared_bias(logits: Array, bias: Array) -> Array:
    """`logits + bias` for logits [N, ...] and a bias of shape `logits.shape[1:]` shared by all
    N sequences, with the bias's gradient (the cotangent summed over N) computed as one
    matrix-vector product. XLA CPU's reduction over the leading axis of these shapes ran ~50x
    slower than the product (137 ms against 2.5 ms for [266, 4, 133, 133], the default model's
    first level at batch 2) and was a tenth of the generator's backward pass. Only the
    summation order differs from autodiff's (tests/test_attention.py checks the gradients)."""
    return logits + bias


def _add_shared_bias_fwd(logits: Array, bias: Array) -> tuple[Array, None]:
    return logits + bias, None


def _add_shared_bias_bwd(_, cotangent: Array) -> tuple[Array, Array]:
    num = cotangent.shape[0]
    summed = jnp.dot(jnp.ones((num,), cotangent.dtype), cotangent.reshape(num, -1))
    return cotangent, summed.reshape(cotangent.shape[1:])


_add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def _softmax_attention(q: Array, k: Array, v: Array, bias: Array | None, scale: float) -> Array:
    """softmax(q k^T * scale + bias) v over sequences, heads-major layout.

    q, k, v: [N, heads, L, d]; bias: float32, broadcastable to [N, heads, L, L], or None.
    Returns [N, heads, L, d] in v's dtype. Logits and softmax in float32; the softmax
    normalisation is applied after the value product (one division per output, not per logit).
    """
    logits = jnp.einsum("nhid,nhjd->nhij", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None and bias.shape == logits.shape[1:]:
        logits = _add_shared_bias(logits, bias.astype(logits.dtype))
    elif bias is not None:
        logits = logits + bias
    # The max shift cancels in the softmax; no gradient through it.
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum(
        "nhij,nhjd->nhid", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def _chunked_attention(q: Array, k: Array, v: Array, bias: Array, scale: float) -> Array:
    """`_softmax_attention` with a bias shared by all sequences, run in sequential chunks of
    sequences when the logits would be large (memory only; numerically identical). Symbolic
    sizes (a `jax.export` with any height and width) cannot decide the chunking: in one piece."""
    num_seq, heads, length, _ = q.shape
    per_seq = heads * length * length
    logits = num_seq * per_seq
    if not isinstance(logits, int) or logits <= _CHUNK_ABOVE_LOGITS:
        return _softmax_attention(q, k, v, bias, scale)
    chunk = max(1, _MAX_LOGITS_PER_CHUNK // per_seq)

    # Recomputed in the backward pass: a chunk's logits and weights are rebuilt from its q, k
    # and v instead of being stored for every chunk, so the gradient's memory is bounded too.
    @jax.checkpoint
    def one(qi, ki, vi):
        return _softmax_attention(qi, ki, vi, bias, scale)

    if -(-num_seq // chunk) > _MAX_UNROLLED_CHUNKS:
        # Many chunks (full frames): one loop keeps the program small.
        return jax.lax.map(lambda t: one(*(a[None] for a in t))[0], (q, k, v), batch_size=chunk)
    # Few chunks (training patches): unrolled, since XLA CPU runs a loop body's operations
    # markedly slower than the same operations at the top level of the program.
    starts = range(0, num_seq, chunk)
    return jnp.concatenate(
        [one(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk]) for i in starts]
    )


class CSWinAttention(nn.Module):
    """The original CSWIN v2 `CSWinAttentionBlock(C, heads, s)` (`attention_mode='v2'`).

    The input is zero-padded bottom/right to a multiple of `split_size` (no key mask: padded
    tokens, whose q/k/v are the qkv biases, are attended to). Horizontal branch: every padded
    row is one sequence of length Wp with all heads; vertical branch: every padded column, length
    Hp, with its own qkv weights. Scale d^-1/2. Bias: the window-cyclic bias built from the centre
    row of `relative_position_bias_table_h` (horizontal) / centre column of `..._v` (vertical).
    LePE runs on each branch output (on the padded map), the branches are averaged, projected by
    a 1x1 conv, then cropped back.

    x: [B, H, W, C] -> [B, H, W, C].
    """

    num_heads: int
    split_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        s, heads = self.split_size, self.num_heads
        head_dim = channels // heads
        scale = head_dim**-0.5
        table_shape = (2 * s - 1, 2 * s - 1, heads)
        table_h = self.param("relative_position_bias_table_h", trunc_normal_init(), table_shape)
        table_v = self.param("relative_position_bias_table_v", trunc_normal_init(), table_shape)

        pad_h, pad_w = (-height) % s, (-width) % s
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = height + pad_h, width + pad_w

        # Horizontal branch: every padded row is a sequence, q/k/v [B*Hp, heads, Wp, d].
        qkv_h = Pointwise(3 * channels, dtype=self.dtype, name="qkv_h")(x)
        qkv_h = qkv_h.reshape(batch * hp, wp, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        bias_h = window_cyclic_bias(table_h[s - 1], wp, s)
        out_h = _chunked_attention(qkv_h[0], qkv_h[1], qkv_h[2], bias_h, scale)
        out_h = out_h.transpose(0, 2, 1, 3).reshape(batch, hp, wp, channels)
        out_h = LePE(dtype=self.dtype, name="lepe_h")(out_h)

        # Vertical branch: every padded column is a sequence, q/k/v [B*Wp, heads, Hp, d].
        qkv_v = Pointwise(3 * channels, dtype=self.dtype, name="qkv_v")(x)
        qkv_v = qkv_v.reshape(batch, hp, wp, 3, heads, head_dim).transpose(3, 0, 2, 4, 1, 5)
        qkv_v = qkv_v.reshape(3, batch * wp, heads, hp, head_dim)
        bias_v = window_cyclic_bias(table_v[:, s - 1], hp, s)
        out_v = _chunked_attention(qkv_v[0], qkv_v[1], qkv_v[2], bias_v, scale)
        out_v = out_v.reshape(batch, wp, heads, hp, head_dim).transpose(0, 3, 1, 2, 4)
        out_v = LePE(dtype=self.dtype, name="lepe_v")(out_v.reshape(batch, hp, wp, channels))

        out = Pointwise(channels, dtype=self.dtype, name="proj")((out_h + out_v) / 2)
        return out[:, :height, :width, :]


class CSWinStripeAttention(nn.Module):
    """The CSWin paper's cross-shaped window attention (`attention_mode='cswin'`).

    One qkv projection (C -> 3C); channels and heads are split in half: the first half attends
    within vertical stripes (full height x `split_size` columns), the second half within
    horizontal stripes (`split_size` rows x full width), each token to every token of its
    stripe. LePE is a depthwise 3x3 conv (with bias) on V, run inside each stripe with zero
    padding at the stripe border, and added to the attention output. The halves are
    concatenated and projected (1x1 conv). The map is zero-padded bottom/right to a multiple
    of `split_size`; padded tokens are masked out as keys and their V is zero.

    x: [B, H, W, C] -> [B, H, W, C]; needs an even `num_heads` and C divisible by it.
    """

    num_heads: int
    split_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        s, heads = self.split_size, self.num_heads
        if heads < 2 or heads % 2 or channels % heads:
            raise ValueError(
                f"attention_mode='cswin' needs an even num_heads dividing the channels, found "
                f"num_heads={heads} for {channels} channels"
            )
        half, half_heads = channels // 2, heads // 2
        head_dim = channels // heads
        scale = head_dim**-0.5
        pad_h, pad_w = (-height) % s, (-width) % s
        hp, wp = height + pad_h, width + pad_w
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        valid = np.zeros((hp, wp), bool)
        valid[:height, :width] = True
        qkv = Pointwise(3 * channels, dtype=self.dtype, name="qkv")(x)
        qkv = qkv * jnp.asarray(valid, qkv.dtype)[None, :, :, None]
        q, k, v = jnp.split(qkv, 3, axis=-1)

        def stripes(t, vertical):
            # [B, Hp, Wp, c] -> windows [B * n, rows, cols, c].
            if vertical:
                t = t.reshape(batch, hp, wp // s, s, t.shape[-1]).transpose(0, 2, 1, 3, 4)
                return t.reshape(batch * (wp // s), hp, s, t.shape[-1])
            return t.reshape(batch * (hp // s), s, wp, t.shape[-1])

        def unstripes(t, vertical):
            if vertical:
                t = t.reshape(batch, wp // s, hp, s, t.shape[-1]).transpose(0, 2, 1, 3, 4)
            return t.reshape(batch, hp, wp, t.shape[-1])

        outputs = []
        branches = ((True, slice(0, half), "get_v_v"), (False, slice(half, None), "get_v_h"))
        for vertical, part, name in branches:
            qw, kw, vw = (stripes(t[..., part], vertical) for t in (q, k, v))
            mask = jnp.broadcast_to(
                jnp.asarray(valid, jnp.float32)[None, :, :, None], (batch, hp, wp, 1)
            )
            mask = stripes(mask, vertical)
            num_win, rows, cols, _ = qw.shape
            seq = (num_win, rows * cols, half_heads, head_dim)
            key_mask = mask[..., 0].reshape(num_win, 1, 1, rows * cols)
            bias = jnp.where(key_mask > 0, 0.0, -jnp.inf)
            attn = _softmax_attention(
                *(t.reshape(seq).transpose(0, 2, 1, 3) for t in (qw, kw, vw)), bias, scale
            ).transpose(0, 2, 1, 3)
            lepe = DepthwiseConv3x3(dtype=self.dtype, name=name)(vw)
            out = attn.reshape(num_win, rows, cols, half) + lepe
            outputs.append(unstripes(out, vertical))
        out = Pointwise(channels, dtype=self.dtype, name="proj")(jnp.concatenate(outputs, -1))
        return out[:, :height, :width, :]
