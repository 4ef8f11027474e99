"""MST++ (`cswin_jax/models/mst_plus_plus.py`): golden parity, size, initialisation, the
`model.arch` switch, and a tiny MST++ through the real training loop, predict and evaluate.

Parity: max|d|/max|ref| <= 1e-5 against the official PyTorch model's eval outputs
(`mst_plus_plus.npz`, float32, only summation order differs).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import base, mst_plus_plus
from cswin_jax import config_checks, convert, inference, loop, models, programs, train
from cswin_jax.models.mst_plus_plus import build_mst_plus_plus
from tests import golden_parity, train_setup

PARAM_COUNT = 1_619_625
RELATIVE_TOLERANCE = 1e-5


def assert_names_mst_weights_and_cswin_config(message: str) -> None:
    """The one-line refusal of MST++ weights for a CSWin config: both named, and the fix."""
    assert "\n" not in message
    assert "MST++ generator weights (model.arch='mst_plus_plus')" in message
    assert "this config builds CSWin (model.arch='cswin')" in message
    assert "configs/mst_plus_plus.py" in message


def _mst_model_config(**mst):
    """configs/mst_plus_plus.py's `config.model` (the official MST_Plus_Plus() defaults), with
    `mst` set in its model.mst_plus_plus section."""
    model_cfg = mst_plus_plus.get_config().model
    model_cfg.mst_plus_plus.update(mst)
    return model_cfg


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _abstract_params(model, size=16):
    rgb = jnp.zeros((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), rgb)["params"]


def _golden_state(golden_dir) -> tuple[dict, np.lib.npyio.NpzFile]:
    archive = np.load(golden_dir / "mst_plus_plus.npz")
    state = {k[len("param/") :]: archive[k] for k in archive.files if k.startswith("param/")}
    return state, archive


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    """(jitted forward, converted golden params, the golden archive)."""
    state, archive = _golden_state(golden_dir)
    model = build_mst_plus_plus(_mst_model_config())
    params = convert.torch_to_flax(state, {"params": _abstract_params(model)})["params"]
    forward = jax.jit(lambda p, rgb: model.apply({"params": p}, rgb, train=False))
    return forward, params, archive


def test_parameter_count():
    assert _count(_abstract_params(models.build_generator(_mst_model_config()))) == PARAM_COUNT


@pytest.mark.parametrize("index", [0, 1, 2])  # 64x64, 37x45 (padded to 40x48), 2x32x48
def test_golden_parity(golden_model, index):
    forward, params, archive = golden_model
    rgb = archive[f"input/rgb_{index}"].transpose(0, 2, 3, 1)
    expected = archive[f"output/eval_{index}"]
    hsi = np.asarray(forward(params, rgb)).transpose(0, 3, 1, 2)
    assert hsi.shape == expected.shape
    error = golden_parity.record("mst_plus_plus", f"output/eval_{index}", hsi, expected)
    assert error <= RELATIVE_TOLERANCE, f"input {index} {rgb.shape}: {error:.2e}"
    assert int(archive["meta/param_count"]) == PARAM_COUNT


def test_initialisation_matches_pytorch_defaults(golden_dir):
    """Our init against the golden state_dict (`torch.manual_seed(0); MST_Plus_Plus()`), leaf
    by leaf: the same spread (trunc_normal 0.02 on linears, kaiming-uniform on convs with the
    transposed convs' fan-in), the same constants (LayerNorm, rescale, linear biases)."""
    state, _ = _golden_state(golden_dir)
    model = build_mst_plus_plus(_mst_model_config())
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)))["params"])
    ours = traverse_util.flatten_dict(jax.device_get(init(train._init_key(jax.random.key(1)))))
    torch_init = traverse_util.flatten_dict(
        convert.torch_to_flax(state, {"params": _abstract_params(model)})["params"]
    )
    checked = 0
    for path, reference in torch_init.items():
        value = np.asarray(ours[path])
        name = "/".join(path)
        if np.all(reference == reference.flat[0]):  # a constant: ones / zeros
            np.testing.assert_array_equal(value, reference, err_msg=name)
            continue
        if reference.size < 256:
            continue
        ratio = np.std(value) / np.std(reference)
        assert 0.85 < ratio < 1.15, (
            f"{name}: std {np.std(value):.4g}, torch {np.std(reference):.4g}"
        )
        if path[-2] not in ("to_q", "to_k", "to_v", "proj"):  # uniform: the same bound
            ratio = np.max(np.abs(value)) / np.max(np.abs(reference))
            assert 0.95 < ratio < 1.05, f"{name}: max|w| {ratio:.3f} x torch's"
        checked += 1
    assert checked > 100
    linear = ours[("body_0", "bottleneck", "blocks_0_0", "to_q", "kernel")]
    assert abs(np.std(linear) - 0.02) < 0.002


def test_odd_and_tiny_sizes():
    """Any H, W: reflect-padded to a multiple of 8 and cropped back, also below 8 pixels; the
    CSWin generator's `train=` / `step=` are accepted and change nothing."""
    model = build_mst_plus_plus(_mst_model_config(stage=1, sst_stage=1, num_blocks=(1, 1)))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    forward = jax.jit(model.apply, static_argnames="train")
    rgb = np.random.default_rng(0).uniform(0, 1, (2, 5, 11, 3)).astype(np.float32)
    hsi = np.asarray(forward(params, rgb))
    assert hsi.shape == (2, 5, 11, 31) and np.all(np.isfinite(hsi))
    np.testing.assert_array_equal(hsi, np.asarray(forward(params, rgb, train=True, step=7)))
    # The crop keeps the padded input's top-left block (reflect padding, as PyTorch's).
    padded = np.pad(rgb, ((0, 0), (0, 3), (0, 5), (0, 0)), mode="reflect")
    np.testing.assert_allclose(
        hsi, np.asarray(forward(params, padded))[:, :5, :11], rtol=1e-6, atol=1e-6
    )


def test_remat_keeps_the_gradients():
    """`model.remat='block'` recomputes each S-MSA and FFN in the backward pass: memory only."""
    tiny = _mst_model_config(stage=1, sst_stage=1, num_blocks=(1, 1))
    rgb = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    plain = build_mst_plus_plus(tiny)
    params = jax.jit(plain.init)(jax.random.key(0), rgb)

    def gradients(model):
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, rgb) ** 2)))(params)

    expected = jax.tree.leaves(gradients(plain))
    tiny.remat = "block"
    actual = jax.tree.leaves(gradients(build_mst_plus_plus(tiny)))
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-7)


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match=r"model\.arch: unknown architecture 'mst'; valid names: "
                       r"cswin, mst_plus_plus"):  # fmt: skip
        models.build_generator({"arch": "mst"})
    config = base.get_config()
    config.model.arch = "MST++"
    with pytest.raises(ValueError, match="valid names: cswin, mst_plus_plus"):
        config_checks.validate_config(config, num_devices=1)
    config = mst_plus_plus.get_config()
    config.train_discriminator = True
    with pytest.raises(ValueError, match=r"train_discriminator: MST\+\+ .* generator-only"):
        config_checks.validate_config(config, num_devices=1)
    with pytest.raises(ValueError, match="train_discriminator"):
        train.make_setup(config)
    config = mst_plus_plus.get_config()
    config.loss.lambda_mrae = 0.0
    with pytest.raises(ValueError, match="lambda_rec.*lambda_mrae"):
        config_checks.validate_config(config, num_devices=1)
    with pytest.raises(ValueError, match=r"mst_plus_plus\.num_blocks: expected 3 counts"):
        build_mst_plus_plus(_mst_model_config(num_blocks=(1, 1)))
    with pytest.raises(ValueError, match="n_feat must equal model.out_channels"):
        models.build_generator(_mst_model_config(n_feat=16))
    config = mst_plus_plus.get_config()
    config.model.remat = "all"
    with pytest.raises(ValueError, match=r"config\.model\.remat: unknown value 'all'"):
        config_checks.validate_config(config)


def test_architecture_signature_keeps_older_cswin_workdirs():
    """A CSWin config written before model.arch existed is the same architecture as today's
    CSWin config (resumable); an MST++ config is another."""
    today = base.get_config().to_dict()
    older = json.loads(json.dumps(today))
    del older["model"]["arch"], older["model"]["mst_plus_plus"]
    assert loop._architecture(older) == loop._architecture(today)
    assert loop._architecture(mst_plus_plus.get_config().to_dict()) != loop._architecture(today)


def _tiny_mst_config():
    """configs/mst_plus_plus.py at test size: one 1-level SST, 16x16 patches, 3 steps."""
    config = mst_plus_plus.get_config()
    tiny = train_setup.tiny_config()
    config.data.source = "synthetic"
    config.data.synthetic = tiny.data.synthetic
    config.data.patch_size = 16
    config.data.num_workers = 0
    config.batch_size = 8  # one patch per test device
    config.model.mst_plus_plus.stage = 1
    config.model.mst_plus_plus.sst_stage = 1
    config.model.mst_plus_plus.num_blocks = (1, 1)
    config.epochs = 1
    config.iterations_per_epoch = 3
    config.checkpoint_every = 3
    config.log_every = 1
    config.ema_decay = 0.5
    config.eval.tile_size = 16
    config.eval.tile_overlap = 4
    return config


@pytest.mark.slow
def test_tiny_mst_plus_plus_trains_through_the_loop(tmp_path):
    """Three MRAE steps of a tiny MST++ in `loop.train_and_evaluate`; the workdir then serves
    predict (whole, tiled, self-ensemble), refuses a CSWin config, and init_from of it into a
    CSWin config fails with one line naming both architectures."""
    config = _tiny_mst_config()
    workdir = tmp_path / "run"
    try:
        state = loop.train_and_evaluate(config, str(workdir))
    finally:
        programs.clear_compiled_programs()
    assert int(state.gen_updates) == 3 and state.disc_params is None
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.gen_params)))

    apply_fn, config_dict = inference.load_generator(str(workdir))
    assert config_dict["model"]["arch"] == "mst_plus_plus"
    rgb = np.random.default_rng(1).uniform(0, 1, (20, 27, 3)).astype(np.float32)
    whole = inference.predict_whole(apply_fn, rgb)
    assert whole.shape == (20, 27, 31) and np.all(np.isfinite(whole))
    # bfloat16 compute (float32 weights and output): bfloat16 keeps 8 significand bits, a
    # relative rounding of 2^-9 per operation; through the network's ~50 layers the output
    # drifts by about 1 % of its range, far above float32's 1e-6 and far below 10 %.
    half_fn, _ = inference.load_generator(str(workdir), dtype="bfloat16")
    half = inference.predict_whole(half_fn, rgb)
    assert half.dtype == np.float32
    drift = np.abs(half - whole).max() / np.abs(whole).max()
    assert 1e-5 < drift < 5e-2, drift
    with pytest.raises(ValueError, match="dtype 'float16': use one of float32, bfloat16"):
        inference.load_generator(str(workdir), dtype="float16")
    tiled = inference.predict_tiled(apply_fn, rgb, tile=16, overlap=4, batch_size=2)
    assert tiled.shape == whole.shape and np.all(np.isfinite(tiled))
    ensembled = inference.predict_whole(apply_fn, rgb, ensemble=True)
    assert ensembled.shape == whole.shape and not np.allclose(ensembled, whole)

    cswin = train_setup.tiny_config()
    with pytest.raises(ValueError) as info:
        loop.train_and_evaluate(cswin, str(workdir))
    assert_names_mst_weights_and_cswin_config(str(info.value))
    with pytest.raises(ValueError, match=r"MST\+\+ generator weights.*builds CSWin"):
        loop._load_initial_weights(None, str(workdir), None, cswin.model)


def test_reconstruction_loss_is_mrae_only():
    """lambda_rec = 0: no Charbonnier term is computed or logged."""
    loss_cfg = _tiny_mst_config().loss
    rng = np.random.default_rng(0)
    pred, true = (rng.uniform(0.1, 1, (2, 4, 4, 31)).astype(np.float32) for _ in range(2))
    total, terms = train.reconstruction_loss(loss_cfg, jnp.asarray(pred), jnp.asarray(true))
    assert set(terms) == {"mrae"}
    np.testing.assert_allclose(float(total), np.mean(np.abs(pred - true) / true), rtol=1e-5)
