"""Spectrally normalised convolutions: `torch.nn.utils.spectral_norm(nn.Conv2d(...))`, NHWC.

`SNConv` keeps the original's power-iteration state: `u` (O,) and `v` (I/groups * kh * kw,) per
conv in the collection `spectral_norm`, advanced once per train-mode call and used as stored in
eval mode; `spectral_norm_sigmas` reads every conv's sigma = u . (W v) back from the variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from cswin_jax.models.layers import depthwise_conv3x3, torch_uniform_init

Array = jax.Array
Dtype = Any

SPECTRAL_NORM_EPS = 1e-6  # torch.nn.utils.spectral_norm(eps=1e-6) in the original


def _l2_normalize(x: Array, eps: float) -> Array:
    """`F.normalize(x, dim=0, eps)`: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _random_unit_vector(key: Array, size: int) -> Array:
    """The original's u/v start state: N(0, 1) samples, L2-normalised (eps 1e-12)."""
    return _l2_normalize(jax.random.normal(key, (size,), jnp.float32), 1e-12)


def kernel_matrix(kernel: Array) -> Array:
    """HWIO `[kh, kw, I, O]` -> the original's `weight_orig.reshape(O, -1)`: `[O, I*kh*kw]`."""
    return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[-1], -1)


def spectral_sigma(kernel: Array, u: Array, v: Array) -> Array:
    """sigma = u . (W v), with gradient through the kernel only. Can be negative (see SNConv)."""
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    w_v = jnp.dot(kernel_matrix(kernel.astype(jnp.float32)), v, precision=lax.Precision.HIGHEST)
    return jnp.dot(u, w_v, precision=lax.Precision.HIGHEST)


# Memory: the backward pass would otherwise keep the depthwise conv's 9 shifted copies of its
# full-resolution input (at batch 20, 128x128: 9 bf16 copies of a [20,128,128,192] tensor per
# block); recomputing it in the backward pass keeps only its input. Same numbers either way.
_depthwise_conv3x3_recomputed = jax.checkpoint(depthwise_conv3x3)


class SNConv(nn.Module):
    """Spectrally normalised 2-D convolution: `torch.nn.utils.spectral_norm(nn.Conv2d(...))`.

    x: [B, H, W, I] -> [B, H', W', O]. Kernel `[kh, kw, I/groups, O]` in `params`; `u` (O,) and
    `v` (I/groups*kh*kw,) in collection `spectral_norm`, both random unit vectors at init.

    With W = the kernel as the original's `(O, I/groups*kh*kw)` matrix (`kernel_matrix`):
      train=True : one power iteration on the stored vectors, v <- normalize(W^T u),
                   u <- normalize(W v) (eps 1e-6, no gradient), written back; then
                   sigma = u . (W v).
      train=False: sigma = u . (W v) from the stored u, v, with no power iteration.
    The conv uses W / sigma; gradients flow through W (in both W and sigma), never through u, v.

    Why not `flax.linen.SpectralNorm`: it stores only u, as `(1, O)` over a `(kh*kw*I, O)`
    matrix, runs its power iteration in eval mode too and divides by that fresh sigma = ||W v||,
    which is >= 0. The original's eval uses the *stored* u and v, and at init they are
    independent random vectors, so sigma = u . (W v) is small and often negative (the golden
    data's `debug/sigma_initial` holds values from -0.22 to 0.2); a freshly initialised model's
    eval outputs therefore differ in sign and magnitude from anything `nn.SpectralNorm` gives. It
    also names its state `kernel/u` in `batch_stats`, which the checkpoint converter cannot map
    onto the original's `weight_u` / `weight_v` buffers.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: int = 0
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer | None = None  # None: PyTorch default init
    bias_init: nn.initializers.Initializer | None = None  # None: PyTorch default fan-in uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Compute a strided convolution as the stride-1 convolution's every `strides`-th output.
    # Same numbers at `strides`² the forward FLOPs; its second derivatives (the R1 penalty's
    # double backward) avoid the kernel-dilated convolutions that XLA CPU runs slowly.
    strided_via_subsample: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        in_features = x.shape[-1]
        groups = self.feature_group_count
        if in_features % groups or self.features % groups:
            raise ValueError(
                f"{self.name}: {in_features} input / {self.features} output channels are not "
                f"divisible into {groups} groups"
            )
        kh, kw = self.kernel_size
        fan_in = kh * kw * (in_features // groups)
        kernel_init = self.kernel_init or torch_uniform_init(fan_in)
        kernel = self.param(
            "kernel", kernel_init, (kh, kw, in_features // groups, self.features), self.param_dtype
        )
        u = self.variable(
            "spectral_norm",
            "u",
            lambda: _random_unit_vector(self.make_rng("params"), self.features),
        )
        v = self.variable(
            "spectral_norm", "v", lambda: _random_unit_vector(self.make_rng("params"), fan_in)
        )
        if train and not self.is_initializing():
            if not self.is_mutable_collection("spectral_norm"):
                raise ValueError(
                    f"{self.name}: a train=True discriminator call advances the spectral-norm "
                    "power iteration; pass mutable=['spectral_norm'] to apply()"
                )
            w_mat = lax.stop_gradient(kernel_matrix(kernel.astype(jnp.float32)))
            hi = lax.Precision.HIGHEST
            v_new = _l2_normalize(jnp.dot(u.value, w_mat, precision=hi), SPECTRAL_NORM_EPS)
            u_new = _l2_normalize(jnp.dot(w_mat, v_new, precision=hi), SPECTRAL_NORM_EPS)
            u.value, v.value = u_new, v_new
        sigma = spectral_sigma(kernel, u.value, v.value)
        weight = (kernel.astype(jnp.float32) / sigma).astype(self.dtype)

        x = x.astype(self.dtype)
        if (kh, kw) == (1, 1) and groups == 1 and self.strides == 1 and self.padding == 0:
            y = jnp.dot(x, weight[0, 0])
        elif (
            (kh, kw) == (3, 3)
            and groups == in_features == self.features
            and self.strides == 1
            and self.padding == 1
        ):
            # Nine shifted multiply-adds: XLA CPU's grouped convolution is far slower.
            y = _depthwise_conv3x3_recomputed(x, weight)
        else:
            stride = 1 if self.strided_via_subsample else self.strides
            y = lax.conv_general_dilated(
                x,
                weight,
                window_strides=(stride, stride),
                padding=((self.padding, self.padding), (self.padding, self.padding)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups,
            )
            if stride != self.strides:
                y = y[:, :: self.strides, :: self.strides, :]
        if self.use_bias:
            bias_init = self.bias_init or torch_uniform_init(fan_in)
            bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def spectral_norm_sigmas(variables: Mapping[str, Any]) -> dict[str, Array]:
    """sigma = u . (W v) of every SN conv from the stored state, keyed by module path.

    variables: `{'params': ..., 'spectral_norm': ...}` of a Discriminator. Keys are module paths
    joined with '/', e.g. 'encoder_stages_0/blocks_0/attn/qkv'. Useful for logging how far the
    power iteration has converged; after any train-mode call every sigma is >= 0.
    """
    params = traverse_util.flatten_dict(dict(variables["params"]))
    state = traverse_util.flatten_dict(dict(variables["spectral_norm"]))
    sigmas = {}
    for path, kernel in params.items():
        if path[-1] != "kernel":
            continue
        module = path[:-1]
        sigmas["/".join(module)] = spectral_sigma(
            kernel, state[(*module, "u")], state[(*module, "v")]
        )
    return sigmas
