"""Building blocks shared by the generator's networks, NHWC, PyTorch-default initialisation.

Every module here reproduces one PyTorch layer of the original CSWIN v2 PyTorch code
number for number, in the layout Flax prefers:

* Full convolutions (`Conv2d`, `Conv3x3`) use `lax.conv_general_dilated` with HWIO kernels
  and symmetric zero padding (PyTorch `padding=p`).
* 1x1 convolutions are matmuls over the channel axis with `(in, out)` kernels (the checkpoint
  converter reshapes PyTorch's `(out, in, 1, 1)` weights onto them).
* Depthwise 3x3 convolutions are nine shifted multiply-adds with a `(3, 3, 1, C)` kernel:
  XLA's CPU lowering of grouped convolutions is far slower than this.
* GroupNorm statistics are always computed in float32 (eps 1e-5, PyTorch's default); its
  backward is written out (`group_norm`), keeping x and two numbers per group.

`checkpointed_call` is the rematerialisation the models' `remat` options use.

Weights are initialised like PyTorch's defaults: kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where fan_in
counts input channels per group times the kernel area.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
PyTree = Any


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    kaiming_uniform_(a=sqrt(5)) gives bound gain*sqrt(3/fan_in) with gain sqrt(2/(1+5)), which
    is exactly 1/sqrt(fan_in); the default bias init uses the same bound.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def trunc_normal_init(stddev: float = 0.02) -> nn.initializers.Initializer:
    """PyTorch `trunc_normal_(std=stddev)` with its default absolute bounds of +-2."""

    def init(key, shape, dtype=jnp.float32):
        lower, upper = -2.0 / stddev, 2.0 / stddev
        return stddev * jax.random.truncated_normal(key, lower, upper, shape, dtype)

    return init


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as PyTorch's `nn.GELU()`."""
    return jax.nn.gelu(x, approximate=False)


def adaptive_groups(channels: int, base_groups: int) -> int:
    """Largest g <= min(base_groups, channels) dividing both `channels` and `base_groups`."""
    for groups in range(min(base_groups, channels), 0, -1):
        if channels % groups == 0 and base_groups % groups == 0:
            return groups
    return 1


def resize_bilinear(x: Array, height: int, width: int) -> Array:
    """PyTorch `F.interpolate(mode='bilinear', align_corners=False)` to an explicit size.

    x: [B, H, W, C]. No antialiasing (PyTorch's bilinear never antialiases); with
    `antialias=False`, `jax.image.resize` uses the same half-pixel source coordinates and
    edge clamping for down- and upsampling by any ratio.
    """
    if x.shape[1] == height and x.shape[2] == width:
        return x
    shape = (x.shape[0], height, width, x.shape[3])
    return jax.image.resize(x, shape, method="bilinear", antialias=False).astype(x.dtype)


class Conv2d(nn.Module):
    """PyTorch `Conv2d(I, O, kernel_size, stride, padding, bias=use_bias)`, zero padding.

    x: [B, H, W, I] -> [B, H', W', O]; kernel `(k, k, I, O)` (HWIO).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        k, pad = self.kernel_size, self.padding
        fan_in = in_features * k * k
        kernel = self.param(
            "kernel",
            torch_uniform_init(fan_in),
            (k, k, in_features, self.features),
            self.param_dtype,
        )
        y = lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param(
                "bias", torch_uniform_init(fan_in), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class Conv3x3(Conv2d):
    """Full 3x3 convolution, stride 1, zero padding 1, with bias (`Conv2d`'s defaults).

    x: [B, H, W, I] -> [B, H, W, O]; kernel `(3, 3, I, O)` (HWIO).
    """


class Pointwise(nn.Module):
    """1x1 convolution (or `nn.Linear`) as a matmul over channels. x: [..., I] -> [..., O];
    kernel `(I, O)`."""

    features: int
    use_bias: bool = True
    # None: PyTorch's conv/linear default, U(-1/sqrt(I), 1/sqrt(I)) for kernel and bias.
    kernel_init: nn.initializers.Initializer | None = None
    bias_init: nn.initializers.Initializer | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    written_backward: bool = False  # `channel_matmul` instead of `jnp.dot` (same numbers)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        default_init = torch_uniform_init(in_features)
        kernel = self.param(
            "kernel",
            self.kernel_init or default_init,
            (in_features, self.features),
            self.param_dtype,
        )
        matmul = channel_matmul if self.written_backward else jnp.dot
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", self.bias_init or default_init, (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


@jax.custom_vjp
def channel_matmul(x: Array, kernel: Array) -> Array:
    """`jnp.dot(x, kernel)` over the last axis (x [..., I], kernel [I, O]) whose backward pass
    is written out as the two matmuls autodiff would build: x's cotangent dy @ kernel^T, the
    kernel's the contraction of x and dy over every leading axis.

    Same numbers as `jnp.dot` and its autodiff. What differs is what XLA CPU sees: the
    cotangent arrives as one value, computed once, instead of a graph it may fuse into each
    consumer. Measured in the generator's depthwise -> pointwise -> GroupNorm blocks
    (`DWConvBlock`), where XLA had fused the GroupNorm backward into a transposed copy that
    feeds the kernel gradient (337 ms of the 7.0 s of operation time in the generator's
    forward and backward at batch 2, 128²): with the block's recomputation, 4.96 -> 4.70 s
    (`bench/step_parts.py --parts g_fwd_bwd`). Elsewhere it measured slower or used more
    memory, so `Pointwise.written_backward` turns it on per layer. Reverse mode, any order.
    """
    return jnp.dot(x, kernel)


def _channel_matmul_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return jnp.dot(x, kernel), (x, kernel)


def _channel_matmul_bwd(residuals: tuple[Array, Array], cotangent: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    x_ct = jnp.dot(cotangent, kernel.T)
    kernel_ct = lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        cotangent.reshape(-1, cotangent.shape[-1]),
        (((0,), (0,)), ((), ())),
    )
    return x_ct.astype(x.dtype), kernel_ct.astype(kernel.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _shifted_sum(padded: Array, taps: Array, height: int, width: int) -> Array:
    """sum over the 3x3 offsets (a, b) of padded[:, a:a+H, b:b+W, :] * taps[a, b]."""
    out = None
    for dy in range(3):
        for dx in range(3):
            term = padded[:, dy : dy + height, dx : dx + width, :] * taps[dy, dx]
            out = term if out is None else out + term
    return out


def _pad1(x: Array) -> Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


@jax.custom_vjp
def _depthwise_taps(x: Array, taps: Array) -> Array:
    """Depthwise 3x3, zero padding 1, no bias: x [B, H, W, C], taps [3, 3, C].

    Its backward pass is written out: the input's cotangent is the same nine-tap sum over the
    padded cotangent with the taps flipped, and the taps' cotangent is nine multiply-reductions.
    Autodiff of the forward's nine slices instead builds nine zero-padded copies of the
    cotangent and sums them, and XLA CPU fused that sum into the transposes that feed the
    next kernel gradient, reading nine inputs out of order: 180 ms per call for the
    discriminator's 192-channel map at batch 2 (1.0 s of its 2.8 s backward pass in the default
    GAN step). Written this way it is differentiable again (R1's double backward) and equal up
    to float rounding (tests/test_attention.py)."""
    return _shifted_sum(_pad1(x), taps, x.shape[1], x.shape[2])


def _depthwise_taps_fwd(x: Array, taps: Array) -> tuple[Array, tuple[Array, Array]]:
    return _depthwise_taps(x, taps), (x, taps)


def _depthwise_taps_bwd(residuals: tuple[Array, Array], cotangent: Array) -> tuple[Array, Array]:
    x, taps = residuals
    height, width = x.shape[1], x.shape[2]
    x_ct = _depthwise_taps(cotangent, taps[::-1, ::-1])
    padded = _pad1(x).astype(jnp.float32)
    cotangent32 = cotangent.astype(jnp.float32)
    taps_ct = jnp.stack(
        [
            jnp.sum(padded[:, dy : dy + height, dx : dx + width, :] * cotangent32, axis=(0, 1, 2))
            for dy in range(3)
            for dx in range(3)
        ]
    )
    return x_ct.astype(x.dtype), taps_ct.reshape(taps.shape).astype(taps.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def depthwise_conv3x3(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """Depthwise 3x3 convolution, zero padding 1, as nine shifted multiply-adds.

    x: [B, H, W, C]; kernel: [3, 3, 1, C] (HWIO with one input channel per group); bias: [C].
    Equals `lax.conv_general_dilated(..., feature_group_count=C)` up to float rounding and is
    much faster on XLA CPU, forward and backward (`_depthwise_taps`). Reverse-mode only (its
    gradient is a custom VJP), to any order.
    """
    out = _depthwise_taps(x, kernel.reshape(3, 3, -1))
    if bias is not None:
        out = out + bias
    return out


class DepthwiseConv3x3(nn.Module):
    """Depthwise 3x3 conv (PyTorch `Conv2d(C, C, 3, padding=1, groups=C, bias=use_bias)`).

    x: [B, H, W, C] -> [B, H, W, C]; kernel `(3, 3, 1, C)`.
    """

    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(9), (3, 3, 1, channels), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", torch_uniform_init(9), (channels,), self.param_dtype)
            bias = bias.astype(self.dtype)
        return depthwise_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), bias)


class GroupNorm(nn.Module):
    """PyTorch `GroupNorm(num_groups, C, eps=1e-5)`, statistics in float32.

    x: [B, H, W, C] -> same shape, in `dtype`. Groups are contiguous channel blocks, as in
    PyTorch (channel c belongs to group c // (C / num_groups)).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _grouped(x: Array, num_groups: int) -> Array:
    """x [B, ..., C] as float32 [B, N, G, C/G] (contiguous channel blocks per group)."""
    return x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)


def _group_statistics(x: Array, num_groups: int, epsilon: float) -> tuple[Array, Array, Array]:
    """x [B, ..., C] -> (`_grouped(x)`, mean, 1/sqrt(var + eps)) [B, 1, G, 1]."""
    grouped = _grouped(x, num_groups)
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
    return grouped, mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
    """PyTorch's group normalisation of x [B, ..., C] (biased variance), float32 output.

    The gradient is written out (the standard normalisation backward), so that the backward
    pass keeps x and two numbers per group instead of autodiff's centred and normalised
    float32 copies of x (1.1 GiB of the default generator's residuals at batch 2, 128 x 128).
    Differentiable again, for second-order gradients.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
    grouped, mean, inv_std = _group_statistics(x, num_groups, epsilon)
    out = ((grouped - mean) * inv_std).reshape(x.shape) * scale + bias
    return out, (x, scale, mean, inv_std)


def _group_norm_bwd(num_groups, epsilon, residuals, cotangent):
    del epsilon
    x, scale, mean, inv_std = residuals
    grouped = _grouped(x, num_groups)
    normed = (grouped - mean) * inv_std
    cotangent = cotangent.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    d_scale = jnp.sum(cotangent * normed.reshape(x.shape), axis=axes)
    d_bias = jnp.sum(cotangent, axis=axes)
    d_normed = (cotangent * scale).reshape(grouped.shape)
    d_grouped = inv_std * (
        d_normed
        - jnp.mean(d_normed, axis=(1, 3), keepdims=True)
        - normed * jnp.mean(d_normed * normed, axis=(1, 3), keepdims=True)
    )
    return (
        d_grouped.reshape(x.shape).astype(x.dtype),
        d_scale.astype(scale.dtype),
        d_bias.astype(scale.dtype),
    )


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def adaptive_group_norm(
    channels: int, base_groups: int, *, name: str, dtype: Dtype = jnp.float32
) -> GroupNorm:
    """The original's `adaptive_group_norm(C, base_groups)` (see `adaptive_groups`)."""
    return GroupNorm(adaptive_groups(channels, base_groups), dtype=dtype, name=name)


def ordered_checkpoint(fn: Callable[[PyTree, Array], Array]) -> Callable[[PyTree, Array], Array]:
    """`fn(params, x)` that keeps only `(params, x)` for the backward pass and recomputes the rest
    there, with the order of that backward pass pinned down.

    `jax.checkpoint` (`nn.remat`) saved almost nothing on XLA CPU, for two reasons this fixes:

    * Its optimisation barrier, which keeps the recomputation from being merged with the
      forward pass, is expanded away early by XLA's CPU compiler. Here the recomputation
      starts from `x + 0 * cotangent[0]`: a data dependency on the output's cotangent that no
      compiler pass can drop or merge with the forward pass (one fused add; the value is `x`
      exactly, and a NaN/Inf cotangent gives NaN gradients as it would anyway).
    * The scheduler computes the chain of input cotangents first and defers each call's
      parameter gradients to the end of the backward pass, so every call's recomputed
      activations stay live until then. Here the input cotangent is made to depend on every
      parameter gradient of the call (`+ 0 * sum(max|g|)`; a max, because XLA merges a sum
      of a reduction into one reduction that no longer waits for the gradient itself).

    In XLA's memory analysis of the default generator's forward+backward with whole-block
    remat on CPU, `nn.remat` kept as many temporaries as no remat at all; the gradient
    dependency cut them by more than half, and recomputing each sub-layer inside the block
    (`DualTransformerBlock`) by more than half again (bench/memory.py prints them per policy;
    tests/test_generator.py checks the saving). Reverse mode only:
    used for the generator, never under the discriminator's second-order R1 gradient.
    """

    @jax.custom_vjp
    def call(params, x):
        return fn(params, x)

    def forward(params, x):
        return fn(params, x), (params, x)

    def backward(residuals, cotangent):
        params, x = residuals
        first = jax.tree.leaves(cotangent)[0].reshape(-1)[0]
        after_cotangent = x + (first * 0).astype(x.dtype)
        _, vjp = jax.vjp(fn, params, after_cotangent)
        params_ct, x_ct = vjp(cotangent)
        # The input's cotangent, which the layers before need next, waits for every parameter
        # gradient of this call: they are computed while its recomputed activations are live.
        done = sum(jnp.max(jnp.abs(g)).astype(jnp.float32) for g in jax.tree.leaves(params_ct))
        return params_ct, x_ct + (done * 0).astype(x_ct.dtype)

    call.defvjp(forward, backward)
    return call


def checkpointed_call(parent: nn.Module, child: nn.Module | Sequence[nn.Module], x: Array) -> Array:
    """`child(x)` under `ordered_checkpoint`, with the child's parameters where they would be.

    `child` is a submodule defined (not yet called) in `parent`'s compact method, or a sequence
    of them applied in turn (`c2(c1(x))`, recomputed together); each must use only the `params`
    collection. At initialisation, and when intermediates are captured
    (`capture_intermediates`), they are simply called: parameter names and shapes, and the
    recorded activations, are those of the plain call.
    """
    children = tuple(child) if isinstance(child, Sequence) else (child,)
    if parent.is_initializing() or parent.is_mutable_collection("intermediates"):
        for c in children:
            x = c(x)
        return x
    params = tuple(parent.variables["params"][c.name] for c in children)
    definitions = tuple(c.clone(parent=None) for c in children)

    def call(p, h):
        for definition, q in zip(definitions, p, strict=True):
            h = definition.apply({"params": q}, h)
        return h

    return ordered_checkpoint(call)(params, x)
