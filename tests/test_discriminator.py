"""Discriminator parity with the original CSWIN v2 PyTorch code (golden data), plus invariants.

Golden sequence per file (manifest `calls`): eval at init -> train (u/v advance) -> eval after
train -> second train. Unless a test says otherwise, outputs are compared with
allclose(rtol=1e-4, atol=1e-5): float32 end to end, so only summation-order rounding differs.
"""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from cswin_jax.convert import torch_to_flax
from cswin_jax.models import discriminator as disc_lib
from cswin_jax.models import spectral_norm
from tests import golden_parity

RTOL, ATOL = 1e-4, 1e-5
TINY_CONFIG = {
    "base_dim": 16,
    "num_heads": 2,
    "num_blocks": (1, 1, 1),
    "mlp_ratio": 2.0,
    "dropout": 0.0,
    "remat": False,
}
TINY_PARAM_COUNT = 115_127
DEFAULT_PARAM_COUNT = 2_177_649


def _flax_module(torch_module: str) -> tuple[str, ...]:
    """'encoder_stages.0.blocks.0.mlp.3' -> ('encoder_stages_0', 'blocks_0', 'mlp_3')."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", torch_module).split("."))


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x) -> jnp.ndarray:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _assert_close(actual, expected, what, rtol=RTOL, atol=ATOL, golden=None):
    """`golden`: the GoldenRun `expected` comes from (its error is then recorded)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if golden is not None:
        golden_parity.record(golden.file, what, actual, expected)
    worst = np.abs(actual - expected).max()
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol, err_msg=f"{what}: max|d|={worst:.3g}"
    )


def _param_count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


class GoldenRun:
    """Runs the golden call sequence once per file; tests read the results."""

    def __init__(self, golden_dir, name):
        self.file = f"discriminator_{name}"
        self.z = np.load(golden_dir / f"discriminator_{name}.npz")
        manifest = json.loads((golden_dir / "manifest.json").read_text())
        cfg = manifest["files"][f"discriminator_{name}.npz"]["config"]
        self.manifest_param_count = manifest["files"][f"discriminator_{name}.npz"]["param_count"]
        # The manifest holds the original's discriminator keys: the rest from configs/base.py.
        disc_cfg = {k[len("discriminator_") :]: v for k, v in cfg.items()}
        self.model = disc_lib.build_discriminator(
            base.complete({"discriminator": disc_cfg}).discriminator
        )
        self.rgb, self.hsi = _nhwc(self.z["input/rgb"]), _nhwc(self.z["input/hsi"])
        abstract = jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), self.rgb, self.hsi, train=False)
        )
        state_dict = {k: self.z[k] for k in self.z.files if k.startswith("param/")}
        self.variables = torch_to_flax(state_dict, abstract, prefix="param/")

        apply = self.model.apply
        self.eval_0, inter = apply(
            self.variables, self.rgb, self.hsi, train=False, capture_intermediates=True
        )
        self.intermediates = traverse_util.flatten_dict(inter["intermediates"])
        self.train_0, upd = apply(
            self.variables, self.rgb, self.hsi, train=True, mutable=["spectral_norm"]
        )
        self.vars_1 = {"params": self.variables["params"], **upd}
        self.eval_after_train_0 = apply(self.vars_1, self.rgb, self.hsi, train=False)
        self.train_second_0, upd = apply(
            self.vars_1, self.rgb, self.hsi, train=True, mutable=["spectral_norm"]
        )
        self.vars_2 = {"params": self.variables["params"], **upd}

    def torch_keys(self, group: str) -> list[str]:
        return [k[len(group) + 1 :] for k in self.z.files if k.startswith(group + "/")]


@pytest.fixture(scope="module", params=["tiny", "default"])
def golden(request, golden_dir):
    return GoldenRun(golden_dir, request.param)


@pytest.fixture(scope="module")
def golden_tiny(golden_dir):
    return GoldenRun(golden_dir, "tiny")


# --- golden parity ----------------------------------------------------------------------------


def test_param_count_matches_golden_file(golden):
    assert _param_count(golden.variables["params"]) == golden.manifest_param_count


@pytest.mark.parametrize(
    "key", ["output/train_0", "output/eval_after_train_0", "output/train_second_0"]
)
def test_outputs_after_power_iteration_match(golden, key):
    # These are the real end-to-end checks: the eval output at init sits at the +-10 clamp, and
    # tanh-GELU or a wrong LN eps pass the pre-clamp activations at init; these catch both.
    _assert_close(_nchw(getattr(golden, key.split("/")[1])), golden.z[key], key, golden=golden)


def test_eval_at_init_matches(golden):
    # Every element sits at the +-10 clamp (stored u, v give a tiny signed sigma), so this only
    # checks the sign pattern and the clamp; act/* below checks the pre-clamp values.
    _assert_close(_nchw(golden.eval_0), golden.z["output/eval_0"], "output/eval_0", golden=golden)
    assert golden.eval_0.dtype == jnp.float32


@pytest.mark.parametrize(
    "group, which",
    [("param_after_train_forward", "vars_1"), ("param_after_second_train_forward", "vars_2")],
)
def test_power_iteration_state_matches(golden, group, which):
    state = traverse_util.flatten_dict(getattr(golden, which)["spectral_norm"])
    names = golden.torch_keys(group)
    assert len(names) == len(state), f"{group}: {len(names)} golden u/v vs {len(state)} flax"
    for name in names:
        module, leaf = name.rsplit(".weight_", 1)
        _assert_close(
            state[(*_flax_module(module), leaf)], golden.z[f"{group}/{name}"], name, golden=golden
        )


@pytest.mark.parametrize(
    "group, which", [("sigma_initial", "variables"), ("sigma_after_train_forward", "vars_1")]
)
def test_sigmas_match(golden, group, which):
    # sigma_initial is a small signed sum that cancels (values -0.22..0.2), which is why its
    # relative error can be large; atol 1e-5 is still 1e-4 of the typical |sigma|.
    sigmas = spectral_norm.spectral_norm_sigmas(getattr(golden, which))
    names = golden.torch_keys(f"debug/{group}")
    assert len(names) == len(sigmas)
    actual = np.array([sigmas["/".join(_flax_module(n))] for n in names])
    expected = np.array([golden.z[f"debug/{group}/{n}"] for n in names])
    _assert_close(actual, expected, f"sigmas {group}", golden=golden)
    if group == "sigma_initial":
        assert (expected < 0).any(), "golden start state should include negative sigmas"
    else:
        assert (actual > 0).all()


def test_activations_tiny(golden_tiny):
    """Every act/* of the tiny file, including act/output_proj before the +-10 clamp.

    At init sigma is tiny and signed, so activations reach |x| ~ 1e7: rounding is amplified by
    1/sigma. Tolerance rtol 1e-4 with atol = 1e-5 * max|ref| of each tensor (the golden README's
    "looser for eval() discriminator outputs at init"); observed max|d|/max|ref| <= 2.4e-6.
    """
    g = golden_tiny
    acts = {k[len("act/") :] for k in g.z.files if k.startswith("act/")}
    assert {"output_proj", "output_proj.0", "output_proj.1", "input_proj"} <= acts
    for name in sorted(acts):
        ref = g.z[f"act/{name}"]
        if name == "output_proj.1":  # GELU of output_proj.0, not a module of its own here
            actual = jax.nn.gelu(g.intermediates[("output_proj_0", "__call__")][0], False)
        elif name == "output_proj":  # aliased to output_proj.2 (pre-clamp)
            actual = g.intermediates[("output_proj_2", "__call__")][0]
        else:
            actual = g.intermediates[(*_flax_module(name), "__call__")][0]
        _assert_close(_nchw(actual), ref, f"act/{name}", atol=1e-5 * np.abs(ref).max(), golden=g)
    assert np.abs(g.z["act/output_proj"]).max() > 10  # pre-clamp really is pre-clamp


# --- parameter counts and initialisation --------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (base.get_config().discriminator.to_dict(), DEFAULT_PARAM_COUNT),
        (TINY_CONFIG, TINY_PARAM_COUNT),
    ],
)
def test_param_count(cfg, expected):
    model = disc_lib.build_discriminator({**TINY_CONFIG, **cfg})
    x = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 31))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *x))
    assert _param_count(shapes["params"]) == expected


@pytest.fixture(scope="module")
def fresh_tiny():
    model = disc_lib.build_discriminator(TINY_CONFIG)
    rgb, hsi = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 31))
    return model, jax.jit(model.init)(jax.random.key(1), rgb, hsi)  # jit: eager init is slower


def _xavier_bound(kernel, gain):
    kh, kw, cin, cout = kernel.shape
    return gain * math.sqrt(6.0 / (kh * kw * (cin + cout)))


def test_initialisation_matches_pytorch_distributions(fresh_tiny):
    """Bounds of each uniform init, and that samples fill them (max > 0.95 bound, std ~ b/sqrt3).

    Tolerance: std within 10 % of bound/sqrt(3) (>= 1,000 samples per checked kernel).
    """
    _, variables = fresh_tiny
    params = traverse_util.flatten_dict(variables["params"])

    def check_uniform(x, bound, what):
        x = np.asarray(x)
        assert np.abs(x).max() <= bound * (1 + 1e-6), what
        assert np.abs(x).max() > 0.95 * bound, what
        if x.size >= 1000:
            assert abs(x.std() / (bound / math.sqrt(3)) - 1) < 0.1, what

    gains = {
        ("input_proj", "conv"): math.sqrt(2),
        ("encoder_stages_1", "downsample", "conv"): math.sqrt(2),
        ("encoder_stages_0", "blocks_0", "attn", "qkv"): 1.0,
        ("encoder_stages_2", "blocks_0", "attn", "qkv_dwconv"): 1.0,
        ("encoder_stages_2", "blocks_0", "attn", "project_out"): 1.0,
        ("output_proj_0",): 0.1,
        ("output_proj_2",): 0.1,
    }
    for module, gain in gains.items():
        kernel = params[(*module, "kernel")]
        check_uniform(kernel, _xavier_bound(kernel, gain), module)
    for module in [("input_proj", "conv"), ("encoder_stages_2", "downsample", "conv")]:
        assert not np.any(params[(*module, "bias")]), f"{module}: SNConvBlock bias must be 0"
    for layer in ("mlp_0", "mlp_3"):  # PyTorch default init, weight and bias
        module = ("encoder_stages_2", "blocks_0", layer)
        kernel = params[(*module, "kernel")]
        bound = 1 / math.sqrt(kernel.shape[2])
        check_uniform(kernel, bound, module)
        assert np.abs(params[(*module, "bias")]).max() <= bound
    # output_proj biases: PyTorch default init over fan_in = 9 * 64
    assert 0 < np.abs(params[("output_proj_0", "bias")]).max() <= 1 / math.sqrt(9 * 64)
    np.testing.assert_array_equal(
        params[("encoder_stages_0", "blocks_0", "attn", "temperature")], 1
    )
    np.testing.assert_array_equal(params[("encoder_stages_0", "blocks_0", "norm1", "scale")], 1)
    for path, vec in traverse_util.flatten_dict(variables["spectral_norm"]).items():
        np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-5, err_msg=str(path))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


# --- behaviour ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [((30, 37), (8, 10)), ((128, 128), (32, 32))])
def test_output_shape_odd_sizes(fresh_tiny, size, expected):
    # PyTorch stride-2 pad-1 convs: out = floor((H - 1) / 2) + 1, twice (H = 30: 8, not 30 // 4).
    model, variables = fresh_tiny
    rgb = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    hsi = jax.ShapeDtypeStruct((2, *size, 31), jnp.float32)
    out = jax.eval_shape(lambda r, h: model.apply(variables, r, h), rgb, hsi)
    assert out.shape == (2, *expected, 1) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "rgb_shape, hsi_shape, fragment",
    [
        ((1, 16, 16, 4), (1, 16, 16, 31), "rgb of shape [B, H, W, 3]"),
        ((1, 16, 16, 3), (1, 16, 16, 30), "found (1, 16, 16, 30)"),
        ((16, 16, 3), (1, 16, 16, 31), "found (16, 16, 3)"),
        ((1, 3, 16, 16), (1, 31, 16, 16), "(NHWC), found (1, 3, 16, 16)"),
        ((1, 16, 16, 3), (1, 8, 16, 31), "must share batch, height and width"),
    ],
)
def test_bad_input_shapes(fresh_tiny, rgb_shape, hsi_shape, fragment):
    model, variables = fresh_tiny
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.apply(variables, jnp.zeros(rgb_shape), jnp.zeros(hsi_shape))


def test_train_call_needs_mutable_spectral_norm(fresh_tiny):
    model, variables = fresh_tiny
    x = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 31))
    with pytest.raises(ValueError, match=r"mutable=\['spectral_norm'\]"):
        model.apply(variables, *x, train=True)


def test_gradient_flows_through_kernel_not_u_v(golden_tiny):
    """sigma = u.(Wv) with stop_gradient on u, v: zero gradient for u, v; and because W/sigma(W)
    is invariant to scaling W, every kernel's gradient is orthogonal to the kernel
    (<dL/dW, W> = 0 up to rounding: |<g, W>| <= 1e-3 |g| |W|). Without the gradient through
    sigma the inner product is ~|g||W|."""
    g = golden_tiny
    model = g.model

    def loss(params, state):
        out = model.apply({"params": params, "spectral_norm": state}, g.rgb, g.hsi, train=False)
        return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))

    out = g.eval_after_train_0
    assert np.abs(out).max() < 10, "pick a state whose outputs are not clamped"
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))  # eager grad is ~50 s on CPU
    grad_p, grad_s = grad_fn(g.vars_1["params"], g.vars_1["spectral_norm"])
    assert all(not np.any(x) for x in jax.tree.leaves(grad_s))
    flat_g = traverse_util.flatten_dict(grad_p)
    flat_w = traverse_util.flatten_dict(g.vars_1["params"])
    checked = 0
    for path, grad in flat_g.items():
        if path[-1] != "kernel":
            continue
        w, grad = np.asarray(flat_w[path], np.float64), np.asarray(grad, np.float64)
        scale = np.linalg.norm(grad) * np.linalg.norm(w)
        assert scale > 0, path
        assert abs(np.sum(grad * w)) <= 1e-3 * scale, path
        checked += 1
    assert checked == 20


def test_jit_train_call_matches_eager(golden_tiny):
    g = golden_tiny

    @jax.jit
    def train_call(variables, rgb, hsi):
        return g.model.apply(variables, rgb, hsi, train=True, mutable=["spectral_norm"])

    out, upd = train_call(g.variables, g.rgb, g.hsi)
    _assert_close(out, g.train_0, "jit train output")
    for a, b in zip(
        jax.tree.leaves(upd["spectral_norm"]),
        jax.tree.leaves(g.vars_1["spectral_norm"]),
        strict=True,
    ):
        _assert_close(a, b, "jit u/v")


def test_bfloat16_compute(golden_tiny):
    """bf16 compute with float32 params: float32 output within bf16 rounding of float32.

    Tolerance: max|d| <= 0.05 * max|ref| (bf16 has an 8-bit mantissa, ~0.4 % per op, through
    ~25 layers); the u/v update stays float32 and matches to 1e-2 absolute.
    """
    g = golden_tiny
    model = g.model.clone(dtype=jnp.bfloat16)
    train_call = jax.jit(
        lambda v, r, h: model.apply(v, r, h, train=True, mutable=["spectral_norm"])
    )
    out, upd = train_call(g.vars_1, g.rgb, g.hsi)
    assert out.dtype == jnp.float32
    ref = g.train_second_0
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 0.05 * np.abs(ref).max()
    for a, b in zip(
        jax.tree.leaves(upd["spectral_norm"]),
        jax.tree.leaves(g.vars_2["spectral_norm"]),
        strict=True,
    ):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=1e-2)


def test_eval_non_finite_fallbacks(golden_tiny):
    """The original's eval fallbacks: non-finite input -> zero map; training mode propagates."""
    g = golden_tiny
    hsi = g.hsi.at[0, 3, 3, 3].set(jnp.nan)
    out = g.model.apply(g.vars_1, g.rgb, hsi, train=False)
    assert out.shape == g.eval_after_train_0.shape and not np.any(out)
    out, _ = g.model.apply(g.vars_1, g.rgb, hsi, train=True, mutable=["spectral_norm"])
    assert not np.all(np.isfinite(out))


def test_remat_matches_plain(golden_tiny):
    """`remat=True` (blocks recomputed in the backward pass) changes memory, not numbers:
    same parameter paths, outputs, u/v updates and gradients (rtol 1e-5 / atol 1e-6: XLA may
    fuse the recomputed graph differently, so allow float32 rounding)."""
    g = golden_tiny
    remat_model = g.model.clone(remat=True)
    shapes = jax.eval_shape(lambda: remat_model.init(jax.random.key(0), g.rgb, g.hsi))
    assert jax.tree.structure(shapes) == jax.tree.structure(g.variables)

    def make_grad(model):
        def loss(params, state):
            out, upd = model.apply(
                {"params": params, "spectral_norm": state},
                g.rgb,
                g.hsi,
                train=True,
                mutable=["spectral_norm"],
            )
            return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape)), (out, upd)

        return jax.jit(jax.grad(loss, has_aux=True))

    plain = make_grad(g.model)(g.vars_1["params"], g.vars_1["spectral_norm"])
    remat = make_grad(remat_model)(g.vars_1["params"], g.vars_1["spectral_norm"])
    _assert_close(remat[1][0], g.train_second_0, "remat output")
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (29, 31)])
def test_strided_via_subsample_matches_strided(golden_tiny, size):
    """`strided_via_subsample` (the R1 penalty's discriminator call) changes speed, not numbers:
    same logits, spectral-norm updates, R1 penalty and R1 parameter gradient (the double
    backward this layout exists for), also at odd sizes where the stride-2 output is
    ceil(H / 2). Tolerance rtol 1e-5 / atol 1e-6: the stride-1 convolution sums the same
    products, so only float32 rounding may differ."""
    from cswin_jax import losses

    g = golden_tiny
    rgb, hsi = g.rgb[:, : size[0], : size[1]], g.hsi[:, : size[0], : size[1]]
    subsampled = g.model.clone(strided_via_subsample=True)

    def r1(model):
        def penalty(params):
            def logits_fn(h):
                return model.apply(
                    {"params": params, "spectral_norm": g.vars_1["spectral_norm"]},
                    rgb,
                    h,
                    train=True,
                    mutable=["spectral_norm"],
                )

            logits, upd = logits_fn(hsi)
            value, _ = losses.r1_penalty(logits_fn, hsi, 10.0)
            return value, (logits, upd)

        return jax.jit(jax.value_and_grad(penalty, has_aux=True))(g.vars_1["params"])

    plain, fast = r1(g.model), r1(subsampled)
    assert fast[0][1][0].shape == plain[0][1][0].shape
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if size == (32, 32):
        _assert_close(fast[0][1][0], g.train_second_0, "subsampled output")
