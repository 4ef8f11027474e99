"""Attention modules and shared layers against direct (loop-based) numpy references.

The golden generator activations (tests/test_generator.py) pin the 'v2' attention on real
weights; these tests pin the pieces independently, including the 'cswin' paper mode, which
has no golden data. Float32 vs float64 references: rtol 1e-4, atol 1e-5 (values are O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cswin_jax.models import attention
from cswin_jax.models.attention import (
    CSWinAttention,
    CSWinStripeAttention,
    EfficientSpectralAttention,
    window_cyclic_bias,
)
from cswin_jax.models.layers import (
    GroupNorm,
    adaptive_groups,
    channel_matmul,
    depthwise_conv3x3,
    group_norm,
    resize_bilinear,
)

RTOL, ATOL = 1e-4, 1e-5


def _random_params(module, x, seed=0):
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(scale=0.3, size=a.shape).astype(np.float32), abstract)


def _erf_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _dwconv_ref(x, kernel, bias):
    """x [H, W, C] zero padded; kernel [3, 3, 1, C]."""
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros_like(x, dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            out += xp[dy : dy + h, dx : dx + w] * kernel[dy, dx, 0]
    return out + bias


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_adaptive_groups_rule():
    assert adaptive_groups(64, 8) == 8
    assert adaptive_groups(256, 4) == 4
    assert adaptive_groups(12, 8) == 4  # largest g dividing both 12 and 8
    assert adaptive_groups(7, 8) == 1
    assert adaptive_groups(3, 8) == 1


def test_depthwise_shifted_macs_equal_grouped_conv():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
    ours = depthwise_conv3x3(jnp.asarray(x), jnp.asarray(kernel))
    ref = lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5,
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=RTOL, atol=ATOL)


def test_depthwise_hand_written_gradient_equals_grouped_conv_gradient():
    """Gradients through the nine shifted multiply-adds (input, kernel, bias, and the second
    derivative that R1 needs) equal autodiff through XLA's grouped convolution."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 7, 9, 5)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 5)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(5,)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(2, 7, 9, 5)).astype(np.float32))

    def grouped(x, k, b):
        return b + lax.conv_general_dilated(
            x,
            k,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=5,
            precision=lax.Precision.HIGHEST,
        )

    def grads(conv):
        def loss(x, k, b):
            return jnp.sum(jnp.tanh(conv(x, k, b)) * weights)

        first = jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)
        # Gradient of a gradient norm (as in R1), differentiated through the custom VJP.
        second = jax.grad(lambda k: jnp.sum(jax.grad(loss)(x, k, bias) ** 2))(kernel)
        return (*first, second)

    for ours, ref in zip(grads(depthwise_conv3x3), grads(grouped), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_group_norm_matches_pytorch_definition():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 4, 5, 12)) * 3 + 2).astype(np.float32)
    norm = GroupNorm(4)
    params = {"scale": rng.normal(size=12).astype(np.float32), "bias": rng.normal(size=12)}
    out = np.asarray(norm.apply({"params": params}, x))
    g = x.astype(np.float64).reshape(2, 20, 4, 3)
    ref = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)
    ref = ref.reshape(x.shape) * params["scale"] + params["bias"]
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    assert norm.clone(dtype=jnp.bfloat16).apply({"params": params}, x).dtype == jnp.bfloat16


def test_group_norm_hand_written_gradient_equals_autodiff():
    """The written-out normalisation backward (x, scale and bias gradients, and the second
    derivative that R1-style penalties take) equals autodiff of the plain formula, in float32
    and for a bfloat16 input."""
    rng = np.random.default_rng(2)
    x = jnp.asarray((rng.normal(size=(2, 4, 5, 12)) * 3 + 2).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=12).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=12).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(2, 4, 5, 12)).astype(np.float32))

    def plain(x, scale, bias, groups, eps):
        g = x.astype(jnp.float32).reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
        centred = g - jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
        return (centred * lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias

    def grads(norm, x):
        def loss(x, s, b):
            return jnp.sum(jnp.tanh(norm(x, s, b, 4, 1e-5)) * weights)

        first = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
        second = jax.grad(lambda s: jnp.sum(jax.grad(loss)(x, s, bias).astype(jnp.float32) ** 2))(
            scale
        )
        return (*first, second)

    for ours, ref in zip(grads(group_norm, x), grads(plain, x), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # bfloat16 input: the gradient comes back in bfloat16, the statistics stay float32.
    x16 = x.astype(jnp.bfloat16)
    for ours, ref in zip(grads(group_norm, x16), grads(plain, x16), strict=True):
        assert ours.dtype == ref.dtype
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2
        )


def test_channel_matmul_hand_written_gradient_equals_autodiff():
    """`channel_matmul`'s written-out backward (x and kernel gradients, and a second
    derivative) equals autodiff of `jnp.dot`, in float32 (rtol 1e-5: the same two matmuls, so
    only summation order may differ) and for bfloat16 operands (2e-2: bf16 rounding)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 6)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(2, 3, 5, 4)).astype(np.float32))

    def grads(matmul, x, kernel):
        def loss(x, k):
            return jnp.sum(jnp.tanh(matmul(x, k)).astype(jnp.float32) * weights)

        first = jax.grad(loss, argnums=(0, 1))(x, kernel)
        second = jax.grad(lambda k: jnp.sum(jax.grad(loss)(x, k).astype(jnp.float32) ** 2))(kernel)
        return (matmul(x, kernel), *first, second)

    for ours, ref in zip(grads(channel_matmul, x, kernel), grads(jnp.dot, x, kernel), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    x16, k16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    for ours, ref in zip(grads(channel_matmul, x16, k16), grads(jnp.dot, x16, k16), strict=True):
        assert ours.dtype == ref.dtype
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2
        )


def _resize_ref(x, out_h, out_w):
    """PyTorch bilinear, align_corners=False, with float32 source coordinates as PyTorch's."""

    def coords(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        src = np.maximum(src, np.float32(0))
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float64)

    y0, y1, ly = coords(x.shape[1], out_h)
    x0, x1, lx = coords(x.shape[2], out_w)
    rows = x[:, y0] * (1 - ly)[None, :, None, None] + x[:, y1] * ly[None, :, None, None]
    return rows[:, :, x0] * (1 - lx)[None, None, :, None] + rows[:, :, x1] * lx[None, None, :, None]


@pytest.mark.parametrize(
    "size_in,size_out",
    [((241, 256), (120, 128)), ((9, 11), (18, 22)), ((36, 44), (37, 45)), ((37, 45), (18, 22))],
)
def test_resize_matches_pytorch_bilinear(size_in, size_out):
    x = np.random.default_rng(2).normal(size=(1, *size_in, 3)).astype(np.float32)
    out = np.asarray(resize_bilinear(jnp.asarray(x), *size_out))
    np.testing.assert_allclose(out, _resize_ref(x, *size_out), rtol=RTOL, atol=ATOL)


def test_window_cyclic_bias_indexing_and_period():
    s, heads = 3, 2
    line = np.arange((2 * s - 1) * heads, dtype=np.float32).reshape(2 * s - 1, heads)
    bias = np.asarray(window_cyclic_bias(jnp.asarray(line), 9, s))
    assert bias.shape == (heads, 9, 9)
    for i in range(9):
        for j in range(9):
            np.testing.assert_array_equal(bias[:, i, j], line[(i % s) - (j % s) + s - 1])
    np.testing.assert_array_equal(bias[:, :3, :3], bias[:, 3:6, 3:6])  # periodic in both axes


def test_efficient_spectral_attention_matches_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 6, 16)).astype(np.float32)
    module = EfficientSpectralAttention(num_heads=2)
    params = _random_params(module, x)
    out = np.asarray(jax.jit(module.apply)({"params": params}, x))

    def gn(t, p):
        g = t.reshape(t.shape[0], -1, 8, t.shape[-1] // 8)
        n = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)
        return n.reshape(t.shape) * p["scale"] + p["bias"]

    xd = x.astype(np.float64)
    q = gn(xd @ params["to_q_0"]["kernel"], params["to_q_1"])
    k = gn(xd @ params["to_k_0"]["kernel"], params["to_k_1"])
    v = xd @ params["to_v"]["kernel"]
    ref = np.zeros_like(v)
    for b in range(2):
        for head in range(2):
            sl = slice(8 * head, 8 * head + 8)
            qm, km = q[b, ..., sl].mean((0, 1)), k[b, ..., sl].mean((0, 1))
            qm, km = qm / np.linalg.norm(qm), km / np.linalg.norm(km)
            attn = _softmax(np.outer(qm, km) / np.sqrt(8))
            ref[b, ..., sl] = v[b, ..., sl] @ attn.T
    pe = params
    pos = np.stack(
        [
            _dwconv_ref(
                _erf_gelu(
                    _dwconv_ref(xd[b], pe["pos_embed_0"]["kernel"], pe["pos_embed_0"]["bias"])
                ),
                pe["pos_embed_2"]["kernel"],
                pe["pos_embed_2"]["bias"],
            )
            for b in range(2)
        ]
    )
    ref = gn((ref + pos) @ params["proj_0"]["kernel"] + params["proj_0"]["bias"], params["proj_1"])
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def _cswin_v2_reference(x, p, heads, s):
    """The original's algorithm written with explicit loops over rows and columns."""
    b_, h, w, c = x.shape
    d = c // heads
    hp, wp = -(-h // s) * s, -(-w // s) * s
    xp = np.zeros((b_, hp, wp, c))
    xp[:, :h, :w] = x

    def lepe(t, q):
        return t + _erf_gelu(_dwconv_ref(t, q["pe_conv_0"]["kernel"], q["pe_conv_0"]["bias"]))

    table_h = p["relative_position_bias_table_h"]
    table_v = p["relative_position_bias_table_v"]
    out = np.zeros((b_, hp, wp, c))
    for b in range(b_):
        qkv_h = xp[b] @ p["qkv_h"]["kernel"] + p["qkv_h"]["bias"]
        qkv_v = xp[b] @ p["qkv_v"]["kernel"] + p["qkv_v"]["bias"]
        out_h, out_v = np.zeros((hp, wp, c)), np.zeros((hp, wp, c))
        for head in range(heads):
            qs, ks, vs = (slice(o * c + head * d, o * c + head * d + d) for o in range(3))
            for row in range(hp):
                q, k, v = qkv_h[row, :, qs], qkv_h[row, :, ks], qkv_h[row, :, vs]
                bias = np.array(
                    [
                        [table_h[s - 1, i % s - j % s + s - 1, head] for j in range(wp)]
                        for i in range(wp)
                    ]
                )
                out_h[row, :, head * d : head * d + d] = _softmax(q @ k.T / np.sqrt(d) + bias) @ v
            for col in range(wp):
                q, k, v = qkv_v[:, col, qs], qkv_v[:, col, ks], qkv_v[:, col, vs]
                bias = np.array(
                    [
                        [table_v[i % s - j % s + s - 1, s - 1, head] for j in range(hp)]
                        for i in range(hp)
                    ]
                )
                out_v[:, col, head * d : head * d + d] = _softmax(q @ k.T / np.sqrt(d) + bias) @ v
        mixed = (lepe(out_h, p["lepe_h"]) + lepe(out_v, p["lepe_v"])) / 2
        out[b] = mixed @ p["proj"]["kernel"] + p["proj"]["bias"]
    return out[:, :h, :w]


@pytest.fixture(scope="module")
def v2_case():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 7, 8)).astype(np.float32)
    module = CSWinAttention(num_heads=2, split_size=3)
    params = _random_params(module, x)
    return module, params, x


def test_cswin_v2_matches_loop_reference(v2_case):
    module, params, x = v2_case
    out = np.asarray(jax.jit(module.apply)({"params": params}, x))
    ref = _cswin_v2_reference(x.astype(np.float64), params, heads=2, s=3)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("max_unrolled", [0, 1000], ids=["loop", "unrolled"])
def test_chunked_attention_is_identical(v2_case, monkeypatch, max_unrolled):
    """Chunked (and, in the backward pass, per-chunk recomputed) attention, in a loop or
    unrolled: same values and gradients as the single-shot computation."""
    module, params, x = v2_case

    def value_and_grads():
        def loss(p, x):
            return jnp.sum(jnp.sin(module.apply({"params": p}, x)))

        out = module.apply({"params": params}, x)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        return [np.asarray(t) for t in jax.tree.leaves((out, grads))]

    whole = value_and_grads()
    monkeypatch.setattr(attention, "_CHUNK_ABOVE_LOGITS", 0)
    monkeypatch.setattr(attention, "_MAX_LOGITS_PER_CHUNK", 2 * 9 * 9 * 3)  # a few rows/chunk
    monkeypatch.setattr(attention, "_MAX_UNROLLED_CHUNKS", max_unrolled)
    chunked = value_and_grads()
    # Float32 rounding only: the parameter gradients sum over chunks in a different order.
    for got, want in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_shared_bias_gradient_equals_autodiff_of_the_broadcast_add():
    """The window bias's gradient (summed over sequences as a matrix-vector product) and the
    logits' gradient equal autodiff of the plain broadcast add, first and second order."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(5, 2, 6, 6)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(2, 6, 6)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(5, 2, 6, 6)).astype(np.float32))

    def grads(add):
        def loss(z, b):
            return jnp.sum(jnp.tanh(add(z, b)) * weights)

        first = jax.grad(loss, argnums=(0, 1))(logits, bias)
        second = jax.grad(lambda b: jnp.sum(jax.grad(loss)(logits, b) ** 2))(bias)
        return (*first, second)

    ours = grads(attention._add_shared_bias)
    ref = grads(lambda z, b: z + b)
    assert not np.allclose(np.asarray(ref[1]), 0.0)
    for got, want in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _cswin_stripe_reference(x, p, heads, s):
    """Paper CSWin: half the heads in vertical stripes (H x s), half in horizontal (s x W)."""
    b_, h, w, c = x.shape
    half, d = c // 2, c // heads
    hp, wp = -(-h // s) * s, -(-w // s) * s
    qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    out = np.zeros((b_, h, w, c))
    for b in range(b_):
        q, k, v = qkv[b, ..., :c], qkv[b, ..., c : 2 * c], qkv[b, ..., 2 * c :]
        for branch, name in ((0, "get_v_v"), (1, "get_v_h")):
            ch = slice(branch * half, branch * half + half)
            if branch == 0:
                windows = [(slice(0, hp), slice(n * s, n * s + s)) for n in range(wp // s)]
            else:
                windows = [(slice(n * s, n * s + s), slice(0, wp)) for n in range(hp // s)]
            for rows, cols in windows:
                # Window on the zero-padded map; V is zero outside the image for LePE.
                vw = np.zeros((hp, wp, half))
                vw[:h, :w] = v[..., ch]
                vw = vw[rows, cols]
                lepe = _dwconv_ref(vw, p[name]["kernel"], p[name]["bias"])
                r0, c0 = rows.start, cols.start
                tokens = [(i, j) for i in range(r0, rows.stop) for j in range(c0, cols.stop)]
                valid = [(i, j) for (i, j) in tokens if i < h and j < w]
                for head in range(heads // 2):
                    hs = slice(branch * half + head * d, branch * half + head * d + d)
                    kk = np.array([k[i, j, hs] for i, j in valid])
                    vv = np.array([v[i, j, hs] for i, j in valid])
                    for i, j in valid:
                        attn = _softmax(kk @ q[i, j, hs] / np.sqrt(d))
                        lo = head * d
                        out[b, i, j, hs] = attn @ vv + lepe[i - r0, j - c0, lo : lo + d]
    return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_cswin_stripe_mode_matches_loop_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 7, 8)).astype(np.float32)
    module = CSWinStripeAttention(num_heads=4, split_size=2)
    params = _random_params(module, x)
    out = np.asarray(jax.jit(module.apply)({"params": params}, x))
    ref = _cswin_stripe_reference(x.astype(np.float64), params, heads=4, s=2)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_cswin_stripe_mode_rejects_odd_heads():
    x = jnp.zeros((1, 4, 4, 6))
    with pytest.raises(ValueError, match="even num_heads.*num_heads=3"):
        CSWinStripeAttention(num_heads=3, split_size=2).init(jax.random.PRNGKey(0), x)
