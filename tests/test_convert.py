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

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from cswin_jax import checkpoint, cli, convert, torch_architecture
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


def _original_config(golden_dir) -> dict:
    """The original trainer's flat config of the tiny golden generator and discriminator."""
    files = json.loads((golden_dir / "manifest.json").read_text())["files"]
    return {**files["generator_tiny.npz"]["config"], **files["discriminator_tiny.npz"]["config"]}


def _save_trainer_npz(path, gen_state, disc_state=None, config=None) -> pathlib.Path:
    """A trainer checkpoint as the converter reads it without torch: `generator.*` /
    `discriminator.*` names and the run's config as a JSON string."""
    arrays = {f"generator.{k}": v for k, v in gen_state.items()}
    arrays.update({f"discriminator.{k}": v for k, v in (disc_state or {}).items()})
    if config is not None:
        arrays["config"] = np.asarray(json.dumps(config))
    np.savez(path, **arrays)
    return path


def _json(d):  # the checkpoint's config is JSON: tuples come back as lists
    return json.loads(json.dumps(d))


@pytest.fixture(scope="module")
def tiny_converted(golden_dir, tmp_path_factory):
    """The tiny golden networks as an original trainer checkpoint (weights and config),
    converted with no config at all."""
    tmp = tmp_path_factory.mktemp("tiny")
    trainer = _save_trainer_npz(
        tmp / "net_1epoch.npz",
        _state_dict(golden_dir / "generator_tiny.npz"),
        _state_dict(golden_dir / "discriminator_tiny.npz"),
        _original_config(golden_dir),
    )
    counts = convert.convert_checkpoint(trainer, tmp / "ckpt")
    return tmp / "ckpt", counts


def test_round_trip_tiny_without_flags_reproduces_golden_outputs(tiny_converted, golden_dir):
    """A non-default architecture converted and restored without any config: the trainer
    config gives norm_groups (no shape records it), the shapes the rest."""
    out, counts = tiny_converted
    assert counts == {"generator": 895_236, "discriminator": 115_127}
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(out)
    restored = ml_collections.ConfigDict(config_dict)
    expected = _config(TINY_MODEL, TINY_DISC)
    assert _json(restored.model.to_dict()) == _json(expected.model.to_dict())
    assert _json(restored.discriminator.to_dict()) == _json(expected.discriminator.to_dict())

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


def test_architecture_from_shapes(golden_dir):
    """Bare state_dicts: every shape-bearing key from names and shapes; norm_groups (GroupNorm
    weights do not record their groups) is not guessed."""
    gen = _state_dict(golden_dir / "generator_tiny.npz")
    disc = _state_dict(golden_dir / "discriminator_tiny.npz")
    found = {k: v for k, (v, _) in torch_architecture.infer_architecture(gen, disc).items()}
    assert found == {
        "model.arch": "cswin",
        "model.base_channels": 16,
        "model.in_channels": 3,
        "model.out_channels": 31,
        "model.blocks_per_stage": 2,
        "model.split_sizes": (2, 2, 2),
        "model.num_heads": 2,
        "model.attention_mode": "v2",
        "discriminator.base_dim": 16,
        "discriminator.num_blocks": (1, 1, 1),
        "discriminator.num_heads": 2,
        "discriminator.mlp_ratio": 2.0,
    }
    mst = _state_dict(golden_dir / "mst_plus_plus.npz")
    found = {k: v for k, (v, _) in torch_architecture.infer_architecture(mst).items()}
    assert found == {
        "model.arch": "mst_plus_plus",
        "model.mst_plus_plus.n_feat": 31,
        "model.in_channels": 3,
        "model.out_channels": 31,
        "model.mst_plus_plus.stage": 3,
        "model.mst_plus_plus.sst_stage": 2,
        "model.mst_plus_plus.num_blocks": (1, 1, 1),
    }
    two_stages = {k: v for k, v in mst.items() if not k.startswith("body.2.")}
    assert torch_architecture.infer_architecture(two_stages)["model.mst_plus_plus.stage"][0] == 2


def _run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cswin_jax.convert", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_cli_bare_state_dict_override_without_config_file(golden_dir, tmp_path, tiny_converted):
    """`--config.model.norm_groups=4` alone (no --config=) on a bare state_dict: the shapes give
    the rest, a warning names what stays unknown, and the stored config equals the one from the
    trainer checkpoint (which reproduces the golden outputs)."""
    golden = golden_dir / "generator_tiny.npz"
    result = _run_cli("--torch", golden, "--out", tmp_path / "ck", "--config.model.norm_groups=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "895,236" in result.stdout
    assert "does not record model.output_activation; kept model.output_activation='none'" in (
        result.stderr
    )
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert disc_vars is None
    _, _, from_trainer = checkpoint.restore_model_variables(tiny_converted[0])
    assert config_dict["model"] == from_trainer["model"]
    expected, _ = convert.convert_state_dicts(_state_dict(golden), None, _config(TINY_MODEL))
    _assert_trees_equal(gen_params, expected)


def test_cli_override_contradicting_the_checkpoint_is_one_line(golden_dir, tmp_path):
    golden = golden_dir / "generator_tiny.npz"
    result = _run_cli("--torch", golden, "--out", tmp_path / "a", "--config.model.base_channels=24")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result)
    assert line.endswith(
        "--config.model.base_channels=24 conflicts with "
        f"{golden}, which records model.base_channels=16 (embedding.0.weight (16, 3, 3, 3)); "
        "drop the flag"
    )
    assert "Traceback" not in result.stderr
    result = _run_cli("--torch", golden, "--out", tmp_path / "b", "--config.model.base_channel=24")
    assert result.returncode == 2 and "did you mean model.base_channels" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_override_contradicting_the_trainer_config(golden_dir, tmp_path):
    trainer = _save_trainer_npz(
        tmp_path / "g.npz",
        _state_dict(golden_dir / "generator_tiny.npz"),
        config=_original_config(golden_dir),
    )
    with pytest.raises(cli.UserError) as info:
        convert.convert_checkpoint(trainer, tmp_path / "ck", overrides={"model.norm_groups": 8})
    assert str(info.value) == (
        f"--config.model.norm_groups=8 conflicts with {trainer}, which records "
        "model.norm_groups=4 (its trainer config (norm_groups: 4)); drop the flag"
    )
    assert not (tmp_path / "ck").exists()


def test_mismatch_error_is_short_and_names_the_fix(golden_dir, tmp_path):
    """Tiny weights against the default config: one line per network with the count, the first
    ten tensors and the config values the shapes give, not hundreds of names."""
    gen = _state_dict(golden_dir / "generator_tiny.npz")
    disc = _state_dict(golden_dir / "discriminator_tiny.npz")
    with pytest.raises(cli.UserError) as info:
        convert.convert_state_dicts(gen, disc, _config())
    message = str(info.value)
    assert "\n" not in message and len(message) < 3000, message
    assert message.startswith("generator: 630 tensors do not fit (630 misshaped")
    assert "denoising.0.weight (8, 3, 3, 3) vs (32, 3, 3, 3)" in message
    assert (
        "(620 more) — the tensors record model.base_channels=16, model.split_sizes=(2, 2, 2), "
        "model.num_heads=2: set those with --config.<key>=..."
    ) in message
    assert "; discriminator: " in message
    assert "discriminator.base_dim=16, discriminator.num_blocks=(1, 1, 1), " in message
    # another network's weights: no config key fits
    with pytest.raises(cli.UserError, match=r"generator: .* missing .*another network's weights"):
        convert.convert_state_dicts(disc, None, _config())
    # a checkpoint whose stages disagree with each other: nothing to infer that would fit
    bad = dict(gen)
    for name in [n for n in bad if n.startswith("decoder2.") and "relative_position" in n]:
        bad[name] = np.zeros((5, 5, 2), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(cli.UserError, match=r"^generator: 4 tensors do not fit .* vs \(3, 3, 2\)"):
        convert.convert_checkpoint(tmp_path / "bad.npz", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


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


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "model.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"needs torch, which is an optional extra"):
        convert.load_checkpoint(tmp_path / "model.pth")


def test_input_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown checkpoint type '\.h5'"):
        convert.load_checkpoint(tmp_path / "weights.h5")
    np.savez(tmp_path / "a.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="no arrays under prefix 'param/'"):
        convert.load_checkpoint(tmp_path / "a.npz", npz_prefix="param/")
    np.savez(tmp_path / "mixed.npz", **{"generator.a": np.zeros(1), "optimizer.b": np.zeros(1)})
    with pytest.raises(ValueError, match=r"optimizer\.b"):
        convert.split_generator_discriminator(convert.load_checkpoint(tmp_path / "mixed.npz")[0])
    np.savez(tmp_path / "c.npz", x=np.zeros(2), config=np.asarray("{base_channels: 16"))
    with pytest.raises(ValueError, match="c.npz: its 'config' entry is not JSON"):
        convert.load_checkpoint(tmp_path / "c.npz")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.convert_checkpoint(tmp_path / "a.npz", tmp_path / "full", _config())


def test_npz_names_under_ddp_module_prefix(tmp_path):
    np.savez(tmp_path / "ddp.npz", **{"module.generator.a": np.ones(2)})
    state, trainer_config = convert.load_checkpoint(tmp_path / "ddp.npz")
    assert list(state) == ["generator.a"] and trainer_config is None


def test_pth_trainer_checkpoint_round_trip(golden_dir, tmp_path):
    """The original trainer's .pth (state_dict, config, numpy RNG state) converts without flags
    to what the tiny config converts."""
    torch = pytest.importorskip("torch", reason="torch (optional extra) is not installed")
    gen_state = _state_dict(golden_dir / "generator_tiny.npz")
    disc_state = _state_dict(golden_dir / "discriminator_tiny.npz")
    state_dict = {f"generator.{k}": torch.from_numpy(v) for k, v in gen_state.items()}
    state_dict.update({f"discriminator.{k}": torch.from_numpy(v) for k, v in disc_state.items()})
    trainer = {"epoch": 3, "iter": 5000, "state_dict": state_dict}
    trainer.update(config=_original_config(golden_dir), numpy_rng_state=np.random.get_state())
    torch.save(trainer, tmp_path / "net.pth")
    with pytest.raises(ValueError, match="--trust_pickle"):
        convert.convert_checkpoint(tmp_path / "net.pth", tmp_path / "refused")
    convert.convert_checkpoint(tmp_path / "net.pth", tmp_path / "ck", trust_pickle=True)
    gen_params, disc_vars, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert config_dict["model"]["norm_groups"] == 4
    config = _config(TINY_MODEL, TINY_DISC)
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
    assert torch_architecture.detect_architecture(_state_dict(golden)) == "mst_plus_plus"
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
    """`python -m cswin_jax.convert --torch mst_plus_plus.npz --out DIR` needs no flag (an
    override alone lands in configs/mst_plus_plus.py's config); with a CSWin --config it
    prints one line and exits with status 2."""
    golden = golden_dir / "mst_plus_plus.npz"
    result = _run_cli("--torch", golden, "--out", tmp_path / "ck", "--config.model.remat=block")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1,619,625" in result.stdout
    _, _, config_dict = checkpoint.restore_model_variables(tmp_path / "ck")
    assert config_dict["recipe"] == "mst_plus_plus" and config_dict["model"]["remat"] == "block"
    result = _run_cli("--torch", golden, "--out", tmp_path / "other", "--config=configs/base.py")
    assert result.returncode == 2
    errors = _error_lines(result)
    assert len(errors) == 1 and "model.arch='mst_plus_plus'" in errors[0], result.stderr[-2000:]
