"""Checkpoint converter: original state_dicts -> Orbax -> restored models reproduce the original.

Parity tolerance: allclose(rtol=1e-4, atol=1e-5) on model outputs (float32 everywhere, only
summation order differs); restored weights must equal a direct conversion exactly.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from cswin_jax import checkpoint, convert
from cswin_jax.models import discriminator as disc_lib
from cswin_jax.models import generator as gen_lib
from tests import golden_parity
from tests.test_mst_plus_plus import assert_names_mst_weights_and_cswin_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5
TINY_MODEL = {"base_channels": 16, "split_sizes": [2, 2, 2], "num_heads": 2, "norm_groups": 4}
TINY_DISC = {"base_dim": 16, "num_heads": 2, "num_blocks": [1, 1, 1]}


def _config(model=None, disc=None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.update(model or {})
    config.discriminator.update(disc or {})
    return config


def _state_dict(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def _assert_trees_equal(actual, expected):
    flat_a = traverse_util.flatten_dict(dict(actual))
    flat_e = traverse_util.flatten_dict(dict(expected))
    assert flat_a.keys() == flat_e.keys()
    for path, value in flat_e.items():
        np.testing.assert_array_equal(np.asarray(flat_a[path]), value, err_msg=str(path))


@pytest.fixture(scope="module")
def tiny_converted(golden_dir, tmp_path_factory):
    """The tiny golden generator + discriminator converted through `convert_checkpoint`."""
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    config = _config(TINY_MODEL, TINY_DISC)
    counts = convert.convert_checkpoint(
        golden_dir / "generator_tiny.npz",
        out,
        config,
        discriminator_path=golden_dir / "discriminator_tiny.npz",
    )
    return out, config, counts


def test_round_trip_tiny_reproduces_golden_outputs(tiny_converted, golden_dir):
    out, config, counts = tiny_converted
    assert counts == {"generator": 895_236, "discriminator": 115_127}
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(out)
    restored = ml_collections.ConfigDict(config_dict)

    # The checkpoint's config is JSON: tuples come back as lists.
    def as_json(d):
        return json.loads(json.dumps(d))

    assert as_json(restored.model.to_dict()) == as_json(config.model.to_dict())
    assert as_json(restored.discriminator.to_dict()) == as_json(config.discriminator.to_dict())

    gen = gen_lib.build_generator(restored.model)
    zg = np.load(golden_dir / "generator_tiny.npz")
    forward = jax.jit(lambda p, rgb: gen.apply({"params": p}, rgb, train=False))
    # input 0 (32x32) only: the 37x45 case costs another compile and only re-tests the model
    hsi = np.asarray(forward(gen_params, _nhwc(zg["input/rgb_0"])))
    hsi = hsi.transpose(0, 3, 1, 2)
    golden_parity.record("generator_tiny", "converted: output/eval_0", hsi, zg["output/eval_0"])
    np.testing.assert_allclose(hsi, zg["output/eval_0"], rtol=RTOL, atol=ATOL)

    disc = disc_lib.build_discriminator(restored.discriminator)
    zd = np.load(golden_dir / "discriminator_tiny.npz")
    rgb, hsi = _nhwc(zd["input/rgb"]), _nhwc(zd["input/hsi"])
    logits, updates = disc.apply(disc_vars, rgb, hsi, train=True, mutable=["spectral_norm"])
    logits = np.asarray(logits).transpose(0, 3, 1, 2)
    expected = zd["output/train_0"]
    golden_parity.record("discriminator_tiny", "converted: output/train_0", logits, expected)
    np.testing.assert_allclose(logits, zd["output/train_0"], rtol=RTOL, atol=ATOL)
    u = updates["spectral_norm"]["output_proj_0"]["u"]
    np.testing.assert_allclose(
        u, zd["param_after_train_forward/output_proj.0.weight_u"], rtol=RTOL, atol=ATOL
    )
    # the stored start state (u, v) is the original's, not a fresh one
    np.testing.assert_array_equal(
        disc_vars["spectral_norm"]["input_proj"]["conv"]["v"], zd["param/input_proj.conv.weight_v"]
    )


def test_default_round_trip_weights_exact(golden_dir, tmp_path):
    """Default width: restored weights equal the direct conversion bit for bit, and the
    discriminator reproduces output/train_0. (The default generator's forward is checked
    against the same golden file by the generator tests; equal weights make that carry over.)"""
    config = _config()
    gen_state = _state_dict(golden_dir / "generator_default.npz")
    disc_state = _state_dict(golden_dir / "discriminator_default.npz")
    combined = {f"generator.{k}": v for k, v in gen_state.items()}
    combined.update({f"discriminator.{k}": v for k, v in disc_state.items()})
    np.savez(tmp_path / "trainer_state_dict.npz", **combined)  # a trainer checkpoint's names

    counts = convert.convert_checkpoint(
        tmp_path / "trainer_state_dict.npz", tmp_path / "ck", config
    )
    assert counts == {"generator": 13_580_732, "discriminator": 2_177_649}
    gen_params, disc_vars, _ = checkpoint.restore_model_variables(tmp_path / "ck")
    expected_gen, expected_disc = convert.convert_state_dicts(gen_state, disc_state, config)
    _assert_trees_equal(gen_params, expected_gen)
    _assert_trees_equal(disc_vars, expected_disc)

    zd = np.load(golden_dir / "discriminator_default.npz")
    disc = disc_lib.build_discriminator(config.discriminator)
    logits, _ = disc.apply(
        disc_vars,
        _nhwc(zd["input/rgb"]),
        _nhwc(zd["input/hsi"]),
        train=True,
        mutable=["spectral_norm"],
    )
    np.testing.assert_allclose(
        np.asarray(logits).transpose(0, 3, 1, 2), zd["output/train_0"], rtol=RTOL, atol=ATOL
    )


def test_cli_generator_only_trainer_checkpoint(golden_dir, tmp_path):
    """`python -m cswin_jax.convert` on a generator-only trainer-style npz with a config file."""
    gen_state = _state_dict(golden_dir / "generator_tiny.npz")
    np.savez(tmp_path / "g.npz", **{f"generator.{k}": v for k, v in gen_state.items()})
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            from configs import base

            def get_config():
                config = base.get_config()
                config.model.update({TINY_MODEL!r})
                return config
            """
        )
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "cswin_jax.convert", "--torch", str(tmp_path / "g.npz"),
         "--out", str(tmp_path / "ck"), f"--config={config_file}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "895,236" in result.stdout
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert disc_vars is None
    assert config_dict["model"]["base_channels"] == 16
    expected, _ = convert.convert_state_dicts(gen_state, None, _config(TINY_MODEL))
    _assert_trees_equal(gen_params, expected)


def test_other_architecture_lists_mismatched_keys(golden_dir, tmp_path):
    """Tiny golden weights against the default config: the error names the misfit tensors."""
    with pytest.raises(ValueError) as info:
        convert.convert_checkpoint(
            golden_dir / "generator_tiny.npz",
            tmp_path / "ck",
            _config(),
            discriminator_path=golden_dir / "discriminator_tiny.npz",
        )
    message = str(info.value)
    assert (
        "generator (config.model)" in message and "discriminator (config.discriminator)" in message
    )
    assert "denoising.0.weight: torch (8, 3, 3, 3) vs flax (3, 3, 3, 32)" in message
    assert "input_proj.conv.weight_orig: torch (16, 34, 7, 7)" in message
    assert "PyTorch tensors are unused" in message  # default disc has 2 blocks per stage, tiny 1
    assert not (tmp_path / "ck").exists()


def test_discriminator_weights_as_generator_rejected(golden_dir):
    with pytest.raises(ValueError, match=r"Flax variables have no PyTorch tensor.*denoising"):
        convert.convert_state_dicts(
            _state_dict(golden_dir / "discriminator_tiny.npz"), None, _config()
        )


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "model.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"needs torch, which is an optional extra"):
        convert.load_state_dict(tmp_path / "model.pth")


def test_input_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_state_dict(tmp_path / "missing.npz")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown checkpoint type '\.h5'"):
        convert.load_state_dict(tmp_path / "weights.h5")
    np.savez(tmp_path / "a.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="no arrays under prefix 'param/'"):
        convert.load_state_dict(tmp_path / "a.npz", npz_prefix="param/")
    np.savez(tmp_path / "mixed.npz", **{"generator.a": np.zeros(1), "optimizer.b": np.zeros(1)})
    with pytest.raises(ValueError, match=r"optimizer\.b"):
        convert.split_generator_discriminator(convert.load_state_dict(tmp_path / "mixed.npz"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.convert_checkpoint(tmp_path / "a.npz", tmp_path / "full", _config())


def test_npz_names_under_ddp_module_prefix(tmp_path):
    np.savez(tmp_path / "ddp.npz", **{"module.generator.a": np.ones(2)})
    state = convert.load_state_dict(tmp_path / "ddp.npz")
    assert list(state) == ["generator.a"]


def test_pth_trainer_checkpoint_round_trip(golden_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="torch (optional extra) is not installed")
    gen_state = _state_dict(golden_dir / "generator_tiny.npz")
    disc_state = _state_dict(golden_dir / "discriminator_tiny.npz")
    state_dict = {f"generator.{k}": torch.from_numpy(v) for k, v in gen_state.items()}
    state_dict.update({f"discriminator.{k}": torch.from_numpy(v) for k, v in disc_state.items()})
    torch.save({"epoch": 3, "iter": 5000, "state_dict": state_dict}, tmp_path / "net.pth")
    config = _config(TINY_MODEL, TINY_DISC)
    convert.convert_checkpoint(tmp_path / "net.pth", tmp_path / "ck", config)
    gen_params, disc_vars, _ = checkpoint.restore_model_variables(tmp_path / "ck")
    expected_gen, expected_disc = convert.convert_state_dicts(gen_state, disc_state, config)
    _assert_trees_equal(gen_params, expected_gen)
    _assert_trees_equal(disc_vars, expected_disc)


# ---------------------------------------------------------------------------------------------
# MST++ (official checkpoints: {'state_dict': ...}, names possibly under 'module.')
# ---------------------------------------------------------------------------------------------

MST_PARAMS = 1_619_625


def test_mst_plus_plus_npz_converts_by_its_names(golden_dir, tmp_path):
    """The golden MST++ state_dict (.npz, `param/` names), no config: recognised as MST++,
    written with configs/mst_plus_plus.py's config, and the restored model (through
    `inference.load_generator`, as predict/evaluate read it) reproduces output/eval_0."""
    from cswin_jax import inference

    golden = golden_dir / "mst_plus_plus.npz"
    assert convert.detect_architecture(_state_dict(golden)) == "mst_plus_plus"
    counts = convert.convert_checkpoint(golden, tmp_path / "ck")
    assert counts == {"generator": MST_PARAMS}
    apply_fn, config_dict = inference.load_generator(str(tmp_path / "ck"))
    assert config_dict["model"]["arch"] == "mst_plus_plus" and config_dict["recipe"] == (
        "mst_plus_plus"
    )
    with np.load(golden) as z:
        rgb, expected = z["input/rgb_0"], z["output/eval_0"]
    hsi = np.asarray(apply_fn(_nhwc(rgb))).transpose(0, 3, 1, 2)
    error = golden_parity.record("mst_plus_plus", "converted: output/eval_0", hsi, expected)
    assert error <= 1e-5


def test_mst_plus_plus_release_pth(golden_dir, tmp_path):
    """The MST++ release format: torch.save({'epoch', 'iter', 'state_dict' (DataParallel
    `module.` names), 'optimizer'}) converts to the same weights as the state_dict itself."""
    torch = pytest.importorskip("torch", reason="torch (optional extra) is not installed")
    state = _state_dict(golden_dir / "mst_plus_plus.npz")
    release = {
        "epoch": 300,
        "iter": 300_000,
        "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999)}]},
    }
    torch.save(release, tmp_path / "mst_plus_plus.pth")
    counts = convert.convert_checkpoint(tmp_path / "mst_plus_plus.pth", tmp_path / "ck")
    assert counts == {"generator": MST_PARAMS}
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert disc_vars is None and config_dict["model"]["arch"] == "mst_plus_plus"
    from configs import mst_plus_plus

    expected, _ = convert.convert_state_dicts(state, None, mst_plus_plus.get_config())
    _assert_trees_equal(gen_params, expected)


def test_architecture_mismatch_is_one_line_naming_both(golden_dir, tmp_path):
    from configs import mst_plus_plus

    with pytest.raises(ValueError) as info:
        convert.convert_checkpoint(golden_dir / "mst_plus_plus.npz", tmp_path / "a", _config())
    assert_names_mst_weights_and_cswin_config(str(info.value))
    with pytest.raises(ValueError, match=r"CSWin generator weights .* builds MST\+\+"):
        convert.convert_checkpoint(
            golden_dir / "generator_tiny.npz", tmp_path / "b", mst_plus_plus.get_config()
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_mst_plus_plus_without_config_and_mismatch_exit_2(golden_dir, tmp_path):
    """`python -m cswin_jax.convert --torch mst_plus_plus.npz --out DIR` needs no flag; with a
    CSWin --config it prints one line and exits with status 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    golden = str(golden_dir / "mst_plus_plus.npz")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "cswin_jax.convert", "--torch", golden, *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    result = run("--out", str(tmp_path / "ck"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1,619,625" in result.stdout
    _, _, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert config_dict["model"]["arch"] == "mst_plus_plus"
    result = run("--out", str(tmp_path / "other"), "--config=configs/base.py")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.arch='mst_plus_plus'" in errors[0], result.stderr[-2000:]
