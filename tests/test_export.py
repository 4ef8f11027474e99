"""Model export (`cswin_jax/export.py`): ONNX and StableHLO files of tiny CSWin and MST++
checkpoints, run in ONNX Runtime and `jax.export.deserialize`, reproduce the Flax model.

Tolerance: max |exported - flax| / max |flax| <= 1e-4 (float32 throughout; the runtimes only
sum in other orders).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from configs import mst_plus_plus
from cswin_jax import checkpoint, cli, export, inference, models
from cswin_jax.models import attention
from tests import stand_in_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
# jax2onnx 0.12's scan lowering reads jax.core.DropVar (the CSWin attention's chunk loop).
pytestmark = pytest.mark.filterwarnings("ignore:jax.core.DropVar is deprecated:DeprecationWarning")
RTOL = 1e-4
# Fixed-shape exports: not multiples of the size unit (8 for both tiny models), so the CSWin
# attention and MST++ padding and the odd-size resizes run.
FIXED_SHAPE = (2, 20, 27, 3)
# A --dynamic export runs at both sizes (multiples of 8), batch included.
DYNAMIC_SHAPES = ((1, 24, 32, 3), (2, 16, 8, 3))


def _tiny_configs():
    """CSWin at test size with one block per stage; MST++ with one one-level SST."""
    cswin = stand_in_models.tiny_model_config()
    cswin.model.blocks_per_stage = 1
    mst = mst_plus_plus.get_config()
    mst.model.mst_plus_plus.stage = 1
    mst.model.mst_plus_plus.sst_stage = 1
    mst.model.mst_plus_plus.num_blocks = (1, 1)
    return {"cswin": cswin, "mst_plus_plus": mst}


def _write_checkpoint(directory: pathlib.Path, config) -> pathlib.Path:
    """Weights-only checkpoint of random weights (`model.init` would cost a compilation)."""
    model = models.build_generator(config.model)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: rng.normal(0.0, 0.1, leaf.shape).astype(np.float32), abstract["params"]
    )
    checkpoint.save_model_checkpoint(directory, generator_params=params, config=config.to_dict())
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: _write_checkpoint(root / arch, c) for arch, c in _tiny_configs().items()}


@pytest.fixture(scope="module", params=["cswin", "mst_plus_plus"])
def model(request, checkpoints, tmp_path_factory):
    """A tiny generator as `python -m cswin_jax.predict` loads it (one per module and arch, so
    its compiled reference runs are shared by the tests)."""
    apply_fn, config = inference.load_generator(str(checkpoints[request.param]))
    return types.SimpleNamespace(
        arch=request.param,
        apply_fn=apply_fn,
        unit=export.size_unit(config["model"]),
        out=tmp_path_factory.mktemp(f"export_{request.param}"),
    )


def _rgb(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def _assert_matches_flax(model, path, fmt, rgb):
    actual = export.run_exported(path, fmt, rgb)
    assert actual.shape == rgb.shape[:3] + (31,) and actual.dtype == np.float32
    error = export.relative_error(actual, inference.predict_whole(model.apply_fn, rgb))
    assert error <= RTOL, f"{model.arch} {fmt} at {rgb.shape}: relative error {error:.1e}"


def test_size_units(model):
    # CSWin split sizes (2, 2, 2): lcm(4, 2, 4, 8); MST++: its padding multiple 8.
    assert model.unit == 8


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_fixed_shape_export_matches_flax(model, fmt, monkeypatch):
    # Small thresholds make the tiny CSWin compute its attention all three ways that full frames
    # of the real one do: a loop over chunks (an ONNX Loop), unrolled chunks, and whole.
    monkeypatch.setattr(attention, "_CHUNK_ABOVE_LOGITS", 4096)
    monkeypatch.setattr(attention, "_MAX_LOGITS_PER_CHUNK", 1024)
    path = export.export_model(model.apply_fn, fmt, model.out / f"fixed.{fmt}", FIXED_SHAPE)
    if fmt == "onnx":
        onnx.checker.check_model(str(path), full_check=True)
    _assert_matches_flax(model, path, fmt, _rgb(FIXED_SHAPE))


def test_dynamic_stablehlo_runs_at_two_sizes(model):
    path = model.out / "dynamic.stablehlo"
    export.export_model(model.apply_fn, "stablehlo", path, export.dynamic_shape(model.unit))
    for seed, shape in enumerate(DYNAMIC_SHAPES):
        _assert_matches_flax(model, path, "stablehlo", _rgb(shape, seed))


@pytest.mark.parametrize("keepdims", [True, False])
def test_onnx_means_over_long_axes_are_summed_in_blocks(tmp_path, keepdims):
    """Without `export.split_long_means`, ONNX Runtime's ReduceMean would put this centring of
    values near 100 over a 300x280 map 5e-4 off."""

    def centre(rgb):
        mean = jnp.mean(rgb, axis=(1, 2), keepdims=keepdims)
        return rgb - (mean if keepdims else mean[:, None, None, :])

    rgb = 100 + _rgb((1, 300, 280, 3))
    path = export.export_model(centre, "onnx", tmp_path / "centre.onnx", rgb.shape)
    error = export.relative_error(export.run_exported(path, "onnx", rgb), np.asarray(centre(rgb)))
    assert error <= RTOL


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cswin_jax.export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_writes_the_file_and_prints_its_parity(checkpoints, tmp_path):
    out = tmp_path / "mst.stablehlo"
    result = _run_cli(f"--checkpoint={checkpoints['mst_plus_plus']}", "--format=stablehlo",
                      f"--out={out}", "--dynamic", "--height=16", "--width=24")  # fmt: skip
    assert result.returncode == 0, result.stderr
    wrote, parity = result.stdout.splitlines()
    assert wrote.startswith(f"wrote {out} (") and out.stat().st_size > 0
    assert parity.startswith("parity: max |stablehlo - flax| / max |flax| = ")
    assert float(parity.split("= ")[1].split()[0]) <= RTOL
    assert parity.endswith("(1x16x24 random RGB)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--checkpoint={missing}", "--height=32", "--width=32"), "does not exist"),
        (("--checkpoint={cswin}", "--dynamic", "--height=20"), "--height=20: a --dynamic export "
         "of this model takes multiples of 8 (its size unit); pass e.g. --height=24"),
    ],
    ids=["missing_checkpoint", "not_a_multiple_of_the_unit"],
)  # fmt: skip
def test_cli_user_mistake_is_one_line(checkpoints, tmp_path, args, message):
    paths = {"missing": tmp_path / "missing", "cswin": checkpoints["cswin"]}
    args = [arg.format(**paths) for arg in args]
    result = _run_cli(*args, "--format=stablehlo", f"--out={tmp_path / 'x.stablehlo'}")
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message in line
