"""Generator: parity with the original CSWIN v2 PyTorch code (golden data), init, shapes, remat.

Golden comparisons use rtol 1e-4, atol 1e-5 (float32 reimplementation of float32 reference
outputs of magnitude ~1-10; a correct port is at ~1e-6, while a wrong CSWin bias index shows
at only ~1e-3 and a wrong GroupNorm eps only in the full generator's outputs, so both fail). The
golden arrays are NCHW; the port is NHWC.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import complete, get_config
from cswin_jax.convert import torch_to_flax
from cswin_jax.models.generator import (
    DualTransformerBlock,
    DWConvBlock,
    Generator,
    Resample,
    build_generator,
    output_head,
)
from cswin_jax.models.layers import (
    DepthwiseConv3x3,
    Pointwise,
    adaptive_group_norm,
    checkpointed_call,
    gelu,
)
from tests import golden_parity

RTOL, ATOL = 1e-4, 1e-5

TINY = dict(base_channels=16, split_sizes=(2, 2, 2), num_heads=2, norm_groups=4)
# Smallest valid width (the spectral attention's GroupNorm(8, C) needs C % 8 == 0).
MICRO = dict(base_channels=8, split_sizes=(2, 3, 2), num_heads=2, norm_groups=4)


def _generator(**model) -> Generator:
    """The generator of configs/base.py's `config.model` with `model` set in it."""
    model_cfg = get_config().model
    model_cfg.update(model)
    return build_generator(model_cfg)


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _load_golden(golden_dir, stem):
    """(model built from the manifest config, arrays, manifest entry, converted variables)."""
    data = np.load(golden_dir / f"{stem}.npz")
    arrays = {k: data[k] for k in data.files}
    manifest = json.loads((golden_dir / "manifest.json").read_text())["files"][f"{stem}.npz"]
    model = _model_from_manifest(manifest["config"])
    state_dict = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    variables = torch_to_flax(state_dict, abstract)
    return model, arrays, manifest, variables


def _model_from_manifest(config, **overrides):
    """The manifest holds the original's generator keys only: the rest from configs/base.py."""
    cfg = {**config, **overrides}
    cfg["clamp_range"] = cfg.pop("generator_clamp_range")
    return build_generator(complete({"model": cfg}).model)


def _assert_close(actual, expected, what, rtol=RTOL, atol=ATOL, golden="generator_tiny"):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if golden is not None:  # None: a comparison within the port, not against golden data
        golden_parity.record(golden, what, actual, expected)
    err = np.max(np.abs(actual - expected))
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol, err_msg=f"{what}: max|d|={err:.3g}"
    )


@pytest.fixture(scope="module")
def tiny(golden_dir):
    model, arrays, manifest, variables = _load_golden(golden_dir, "generator_tiny")
    assert (model.base_channels, tuple(model.split_sizes)) == (16, (2, 2, 2))
    return model, arrays, manifest, variables


@pytest.fixture(scope="module")
def tiny_eval_with_activations(tiny):
    """One eval forward of input/rgb_1 (37x45) capturing every module's output."""
    model, arrays, _, variables = tiny
    fn = jax.jit(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=True)
    )
    out, state = fn(variables, _nhwc(arrays["input/rgb_1"]))
    return np.asarray(out), state["intermediates"]


def test_param_counts():
    def count(model):
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    assert count(build_generator(get_config().model)) == 13_580_732
    assert count(_generator(**TINY)) == 895_236


def test_init_matches_pytorch_default_distribution():
    """One C=256 block and a down module (initialising the whole generator compiles slowly)."""
    block = DualTransformerBlock(split_size=2, num_heads=4, norm_groups=4)
    params = jax.jit(block.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 256)))["params"]
    # 1x1 conv 1024->1024 (1M weights): kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)).
    kernel = np.asarray(params["ffn"]["net_2"]["pointwise"]["kernel"])
    bound = 1 / np.sqrt(1024)
    assert kernel.shape == (1024, 1024) and np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.01)
    # Depthwise 3x3: fan_in 9 (9,216 weights).
    dw = np.asarray(params["ffn"]["net_2"]["depthwise"]["kernel"])
    assert dw.shape == (3, 3, 1, 1024) and np.abs(dw).max() <= 1 / 3
    np.testing.assert_allclose(dw.std(), (1 / 3) / np.sqrt(3), rtol=0.03)
    norm = params["norm1"]
    assert np.all(np.asarray(norm["scale"]) == 1) and np.all(np.asarray(norm["bias"]) == 0)
    attn = params["spatial_attn"]["attention"]
    tables = np.concatenate(
        [np.asarray(attn[f"relative_position_bias_table_{a}"]).ravel() for a in "hv"]
    )
    np.testing.assert_allclose(tables.std(), 0.02, rtol=0.2)  # 72 samples
    # Full 3x3 conv bias: U(+-1/sqrt(3*3*in)), 256 samples.
    down = Resample(features=256, norm_groups=8, factor=0.5)
    bias = jax.jit(down.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 128)))["params"]
    bias = np.asarray(bias["conv"]["bias"])
    bound = 1 / np.sqrt(9 * 128)
    assert np.abs(bias).max() <= bound
    np.testing.assert_allclose(bias.std(), bound / np.sqrt(3), rtol=0.15)


@pytest.mark.parametrize("index", [0, 1])
def test_tiny_eval_outputs_match_golden(tiny, tiny_eval_with_activations, index):
    model, arrays, _, variables = tiny
    if index == 1:
        out = tiny_eval_with_activations[0]
    else:
        out = jax.jit(lambda v, x: model.apply(v, x))(variables, _nhwc(arrays["input/rgb_0"]))
    _assert_close(_nchw(out), arrays[f"output/eval_{index}"], f"output/eval_{index}")


def _torch_to_flax_name(name):
    parts = name.split(".")
    out = []
    for part in parts:
        if part.isdigit():
            out[-1] += f"_{part}"
        else:
            out.append(part)
    return tuple(out)


def _activation(captured, name):
    """The port's value for the golden hook `act/<name>` (NCHW), or None if not a module."""
    derived = {
        "denoising": lambda: _act(captured, "denoising.4"),
        "embedding": lambda: gelu(_act(captured, "embedding.1")),
        "encoder1": lambda: _act(captured, "encoder1.1"),
        "encoder2": lambda: _act(captured, "encoder2.1"),
        "bottleneck": lambda: _act(captured, "bottleneck.1"),
        "decoder1": lambda: _act(captured, "decoder1.1"),
        "decoder2": lambda: _act(captured, "decoder2.1"),
        "bottleneck.0.spectral_attn.attention.to_q": lambda: _act(
            captured, "bottleneck.0.spectral_attn.attention.to_q.1"
        ),
        "bottleneck.0.spectral_attn.attention.to_k": lambda: _act(
            captured, "bottleneck.0.spectral_attn.attention.to_k.1"
        ),
        "bottleneck.0.spectral_attn.attention.pos_embed": lambda: _act(
            captured, "bottleneck.0.spectral_attn.attention.pos_embed.2"
        ),
        "bottleneck.0.ffn.net.1": lambda: gelu(_act(captured, "bottleneck.0.ffn.net.0")),
        "bottleneck.0.noise_block.noise_est_conv.1": lambda: gelu(
            _act(captured, "bottleneck.0.noise_block.noise_est_conv.0")
        ),
        "bottleneck.0.noise_block.noise_est_conv": lambda: jax.nn.sigmoid(
            _act(captured, "bottleneck.0.noise_block.noise_est_conv.2")
        ),
        "bottleneck.0.noise_block.features_conv": lambda: _act(
            captured, "bottleneck.0.noise_block.features_conv.1"
        ),
        "bottleneck.0.noise_block.gate": lambda: jax.nn.sigmoid(
            _act(captured, "bottleneck.0.noise_block.gate.0")
        ),
    }
    for index in (1, 3):
        derived[f"denoising.{index}"] = lambda i=index: gelu(_act(captured, f"denoising.{i - 1}"))
    for branch in "hv":
        prefix = f"bottleneck.0.spatial_attn.attention.lepe_{branch}.pe_conv"
        derived[prefix] = lambda p=prefix: gelu(_act(captured, f"{p}.0"))
    for prefix in ("bottleneck.0.spectral_attn.attention.pos_embed.1",):
        derived[prefix] = lambda: gelu(
            _act(captured, "bottleneck.0.spectral_attn.attention.pos_embed.0")
        )
    if name in derived:
        return np.asarray(derived[name]())
    return _act(captured, name)


def _act(captured, name):
    node = captured
    for key in _torch_to_flax_name(name):
        node = node[key]
    return np.asarray(node["__call__"][0])


def test_tiny_activations_match_golden(tiny, tiny_eval_with_activations):
    """Every hooked module of the tiny config's eval forward on the 37x45 input (the hook
    layouts: qkv and LePE on the padded map, proj before the crop,
    up1/up2 before the size-fix resize, qkv_v in (B*Wp/s, 3C, Hp, s) slabs)."""
    _, arrays, _, _ = tiny
    captured = tiny_eval_with_activations[1]
    names = [k[len("act/") :] for k in arrays if k.startswith("act/")]
    assert len(names) == 77
    for name in names:
        expected = arrays[f"act/{name}"]
        actual = _activation(captured, name)  # NHWC
        if name.endswith("spatial_attn.attention.qkv_v"):
            batch, hp, wp, c3 = actual.shape
            s = expected.shape[-1]
            actual = actual.reshape(batch, hp, wp // s, s, c3).transpose(0, 2, 4, 1, 3)
            actual = actual.reshape(batch * wp // s, c3, hp, s)
        else:
            actual = _nchw(actual)
        # Intermediate tensors reach |x| ~ 10 after a dozen float32 layers; the absolute
        # rounding error scales with the tensor, so atol is relative to max|ref| (element-wise
        # |d|/|ref| is meaningless near zero), never looser than 1e-5 absolute.
        scale = max(1.0, float(np.abs(expected).max()))
        _assert_close(actual, expected, f"act/{name}", atol=ATOL * scale)


def test_tiny_train_mode_and_clamp_match_golden(tiny):
    """Train-mode forwards (autograd on in the original, so its attention took the math path:
    ~1e-6 from eval, inside tolerance). The original saw its counter at set_iteration(k) + 1."""
    model, arrays, manifest, variables = tiny
    step = manifest["iteration_seen_by_train_forward"]
    assert step == manifest["train_iteration_set"] + 1 == 124
    out = jax.jit(lambda v, x, k: model.apply(v, x, train=True, step=k))(
        variables, _nhwc(arrays["input/rgb_1"]), step
    )
    _assert_close(_nchw(out), arrays["output/train_1"], "output/train_1")
    clamp2 = _model_from_manifest(manifest["config"], generator_clamp_range=2.0)
    out = jax.jit(lambda v, x, k: clamp2.apply(v, x, train=True, step=k))(
        variables, _nhwc(arrays["input/rgb_0"]), 123 + 1
    )
    expected = arrays["output/variant/clamp2/train_k123_0"]
    assert np.abs(expected).max() == 2.0  # the clamp is active in this case
    _assert_close(_nchw(out), expected, "clamp2/train_k123_0")


def test_output_activation_variants_match_golden(tiny, tiny_eval_with_activations):
    """The variants share the body: apply `output_head` to the linear eval output of rgb_0.

    Original eval after set_iteration(k) <-> step=k; train after set_iteration(k) <-> k + 1.
    """
    model, arrays, manifest, variables = tiny
    raw = jax.jit(lambda v, x: model.apply(v, x))(variables, _nhwc(arrays["input/rgb_0"]))
    _assert_close(_nchw(raw), arrays["output/train_0"], "output/train_0 (clamp inactive)")
    config = manifest["config"]
    head = dict(
        activation_delay_iters=config["activation_delay_iters"],
        clamp_range=config["generator_clamp_range"],
        clamp_after_iters=config["clamp_after_iters"],
    )
    variants = {v["name"]: v for v in manifest["variants"]}
    checked = 0
    for name, variant in variants.items():
        if name == "clamp2":
            continue  # full model call in test_tiny_train_mode_and_clamp_match_golden
        activation = variant["overrides"]["output_activation"]
        for mode, k in variant["calls"]:
            suffix = f"{mode}_0" if k is None else f"{mode}_k{k}_0"
            step = None if k is None else (k + 1 if mode == "train" else k)
            out = output_head(raw, activation=activation, train=mode == "train", step=step, **head)
            _assert_close(_nchw(out), arrays[f"output/variant/{name}/{suffix}"], f"{name}/{suffix}")
            checked += 1
    assert checked == 6
    # The delayed sigmoid switches strictly after activation_delay_iters.
    linear = arrays["output/variant/delayed_sigmoid/train_k19999_0"]
    assert linear.min() < 0 and linear.max() > 1


def test_iteration_step_can_be_traced(tiny):
    model, arrays, _, variables = tiny
    del arrays
    fn = jax.jit(
        lambda x, k: output_head(
            x,
            activation="delayed_sigmoid",
            train=True,
            step=k,
            activation_delay_iters=5,
            clamp_range=1.0,
            clamp_after_iters=3,
        )
    )
    x = jnp.array([-4.0, 0.5, 4.0])
    np.testing.assert_allclose(fn(x, 2), [-1.0, 0.5, 1.0])  # linear, clamp window open
    np.testing.assert_allclose(fn(x, 4), x)  # linear, clamp window closed
    np.testing.assert_allclose(fn(x, 6), jax.nn.sigmoid(x), rtol=1e-6)


DEFAULT = "generator_default"


@pytest.fixture(scope="module")
def default_golden(golden_dir):
    model, arrays, manifest, variables = _load_golden(golden_dir, DEFAULT)
    assert manifest["param_count"] == 13_580_732
    return model, arrays, variables


def test_default_outputs_match_golden(default_golden):
    """Default width (13.6 M params): eval on 64x64 and train mode (step 5000) on 64x64."""
    model, arrays, variables = default_golden
    rgb = _nhwc(arrays["input/rgb_0"])
    fn = jax.jit(lambda v, x, k: model.apply(v, x, train=True, step=k))
    out = fn(variables, rgb, 5000)
    _assert_close(_nchw(out), arrays["output/train_0"], "output/train_0", golden=DEFAULT)
    _assert_close(
        _nchw(out), arrays["output/eval_0"], "output/eval_0 (clamp inactive)", golden=DEFAULT
    )


def test_odd_sizes_and_full_frame_are_finite(tiny):
    model, _, _, variables = tiny
    fn = jax.jit(lambda v, x: model.apply(v, x))
    rng = np.random.default_rng(0)
    for height, width in ((97, 131), (482, 512)):
        rgb = rng.uniform(size=(1, height, width, 3)).astype(np.float32)
        out = np.asarray(fn(variables, rgb))
        assert out.shape == (1, height, width, 31)
        assert np.isfinite(out).all()


def _random_params(model, rgb, seed=0):
    """Random parameters of the right shapes (GroupNorm scales near 1): cheaper than `init`,
    whose compile is slow on CPU, and less symmetric than a fresh init."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), rgb)["params"]
    rng = np.random.default_rng(seed)
    flat = {
        path: (1.0 if path[-1].key == "scale" else 0.0)
        + rng.normal(scale=0.2, size=leaf.shape).astype(np.float32)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[path], abstract)


@pytest.fixture(scope="module")
def micro():
    model = _generator(**MICRO)
    rgb = np.random.default_rng(1).uniform(size=(2, 11, 13, 3)).astype(np.float32)
    return model, _random_params(model, rgb), rgb


def test_jit_matches_plain_forward(micro):
    model, params, rgb = micro
    plain = model.apply({"params": params}, rgb)
    jitted = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, rgb)
    # Same float32 ops; XLA fuses/reorders under jit, so rounding-level differences relative
    # to the output scale (the random weights give outputs of ~10).
    scale = float(np.abs(np.asarray(plain)).max())
    _assert_close(jitted, plain, "jit vs plain", rtol=1e-4, atol=1e-5 * scale, golden=None)


def test_remat_policies_give_identical_values_and_gradients():
    """Remat recomputes the same ops in the backward pass: values and gradients must agree.

    Checked on one block (a whole-generator gradient compiles slowly on CPU); the generator's
    wiring of each policy is checked on its jaxpr below.
    """
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 7, 16)).astype(np.float32)
    block = DualTransformerBlock(split_size=3, num_heads=2, norm_groups=4)
    params = _random_params(block, x)

    class OneBlock(nn.Module):
        """The block as `Generator._stage` calls it: whole-block recomputation under 'block'."""

        policy: str

        @nn.compact
        def __call__(self, x):
            block = DualTransformerBlock(3, 2, 4, remat=self.policy, name="block")
            return checkpointed_call(self, block, x) if self.policy == "block" else block(x)

    results = {}
    for policy in ("none", "attention", "block"):
        module = OneBlock(policy)

        def loss(p, x, module=module):
            return jnp.mean(jnp.square(module.apply({"params": {"block": p}}, x)))

        results[policy] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    base_value, base_grads = results["none"]
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(base_grads))
    assert float(global_norm(base_grads)) > 0
    for policy in ("attention", "block"):
        value, grads = results[policy]
        what = f"remat={policy} grad"
        # Same ops; XLA may fuse the recomputation differently: float32 rounding only.
        np.testing.assert_allclose(float(value), float(base_value), rtol=1e-6)
        jax.tree.map(
            lambda a, b, what=what: _assert_close(a, b, what, rtol=1e-4, atol=1e-6, golden=None),
            grads,
            base_grads,
        )


def test_dwconv_block_recomputation_keeps_values_and_gradients():
    """`DWConvBlock` recomputes its depthwise -> pointwise pair in the backward pass with the
    pointwise layer's written-out backward: its output and its gradients (parameters and
    input) equal those of the plain chain of the same layers under autodiff (rtol 1e-4 /
    atol 1e-6: float32 rounding of a differently fused graph)."""

    class PlainChain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = DepthwiseConv3x3(name="depthwise")(x)
            x = Pointwise(12, name="pointwise")(x)
            return gelu(adaptive_group_norm(12, 4, name="norm")(x))

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 7, 8)).astype(np.float32)
    block = DWConvBlock(12, 4)
    params = _random_params(block, x)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(PlainChain().init, jax.random.PRNGKey(0), x)["params"]
    )
    weights = rng.normal(size=(2, 5, 7, 12)).astype(np.float32)

    def value_and_grads(module):
        def loss(p, x):
            return jnp.sum(module.apply({"params": p}, x) * weights)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    ours, plain = value_and_grads(block), value_and_grads(PlainChain())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        _assert_close(a, b, "DWConvBlock", rtol=1e-4, atol=1e-6, golden=None)


def test_generator_applies_remat_policy(micro):
    model, params, rgb = micro

    def jaxpr_text(policy):
        m = model.clone(remat=policy)
        return str(jax.make_jaxpr(lambda p: m.apply({"params": p}, rgb))(params))

    # `layers.ordered_checkpoint` is a custom VJP named `call`: one `custom_vjp_call` of it per
    # recomputed call (the depthwise convolutions and the window bias are custom VJPs too).
    counts = {
        p: len(re.findall(r"\bcustom_vjp_call\[\s*name=call\b", jaxpr_text(p)))
        for p in ("none", "attention", "block")
    }
    # 10 blocks, each with 3 `DWConvBlock`s (feed-forward 1, noise-aware block 2) that always
    # recompute their depthwise -> pointwise pair: 30 under every policy. On top of them, 2
    # attention branches per block under 'attention'; under 'block' the whole block and,
    # nested in it, its 2 attention branches, feed-forward and noise-aware block.
    assert counts == {"none": 30, "attention": 30 + 20, "block": 30 + 50}, counts


class _BlockStack(nn.Module):
    """Blocks chained as `Generator._stage` chains them (whole-block recomputation on 'block')."""

    policy: str
    depth: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            block = DualTransformerBlock(3, 2, 8, remat=self.policy, name=f"block_{i}")
            x = checkpointed_call(self, block, x) if self.policy == "block" else block(x)
        return x


def test_block_remat_lowers_compiled_memory():
    """What remat is for, measured where it is decided: XLA's buffer assignment.

    XLA CPU drops `jax.checkpoint`'s optimisation barriers and defers parameter gradients to
    the end of the backward pass, which once made every remat policy save nothing;
    `layers.ordered_checkpoint` keeps this from regressing. Three chained blocks, forward +
    backward, batch 4, 32x32, 16 channels: the temporaries with 'block' must be well under
    those without remat (the whole default generator at batch 2, 128x128: 1.02 vs 7.08 GiB).
    """
    x = jax.ShapeDtypeStruct((4, 32, 32, 16), jnp.float32)

    def temp_bytes(policy):
        module = _BlockStack(policy)
        params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape)))

        def loss(p, h):
            return jnp.mean(jnp.square(module.apply(p, h)))

        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, block = temp_bytes("none"), temp_bytes("block")
    # Measured 29 vs 81 MiB (0.36); plain `nn.remat` blocks gave 50 MiB (0.62).
    assert block < 0.5 * none, (block, none)


def test_generator_gradients_are_finite(micro):
    model, params, rgb = micro

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, rgb, train=True, step=1)))

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(global_norm(grads)) > 0


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_bfloat16_compute_gives_float32_output_close_to_float32(micro):
    model, params, rgb = micro
    ref = model.apply({"params": params}, rgb)
    out = jax.jit(lambda p, x: model.clone(dtype=jnp.bfloat16).apply({"params": p}, x))(params, rgb)
    assert out.dtype == jnp.float32
    # bf16 has an 8-bit mantissa; errors accumulate through 10 blocks.
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 0.1, err


def test_cswin_attention_mode_forward(micro):
    model, _, rgb = micro
    m = model.clone(attention_mode="cswin")
    params = _random_params(m, rgb)
    attn = params["encoder1_0"]["spatial_attn"]["attention"]
    assert set(attn) == {"qkv", "proj", "get_v_h", "get_v_v"}
    out = jax.jit(m.apply)({"params": params}, rgb)
    assert out.shape == (2, 11, 13, 31) and np.isfinite(np.asarray(out)).all()


def test_bad_inputs_raise_clear_errors():
    model = _generator(**MICRO)
    key = jax.random.PRNGKey(0)
    with pytest.raises(
        ValueError, match=r"expected rgb of shape \[B, H, W, 3\].*found shape \(1, 8, 8, 4\)"
    ):
        model.init(key, jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"found shape \(8, 8, 3\)"):
        model.init(key, jnp.zeros((8, 8, 3)))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attention_mode", "swin", "attention_mode: unknown value 'swin'; use one of v2, cswin"),
        (
            "output_activation",
            "relu",
            "output_activation: unknown value 'relu'; use one of none, sigmoid, tanh, "
            "delayed_sigmoid",
        ),
        ("remat", "all", "remat: unknown value 'all'; use one of none, attention, block"),
        ("blocks_per_stage", 0, "blocks_per_stage: must be >= 1, got 0"),
        ("split_sizes", (), "split_sizes: must hold at least one split size, got []"),
    ],
)
def test_bad_model_config_names_the_key_and_the_fix(key, value, message):
    """`config_checks.check_model`, run by the builder: one line, `config.model.<key>: ...`."""
    cfg = get_config().model
    cfg[key] = value
    with pytest.raises(ValueError, match=re.escape(f"config.model.{message}")):
        build_generator(cfg)


def test_builder_reads_every_key_without_fallback():
    """A config.model without a key is a KeyError (configs/base.py holds the defaults, and a
    saved config is completed with `configs.base.complete` where it is loaded)."""
    cfg = get_config().model.to_dict()
    del cfg["blocks_per_stage"]
    with pytest.raises(KeyError, match="blocks_per_stage"):
        build_generator(cfg)
    assert build_generator(complete({"model": cfg}).model).blocks_per_stage == 2
