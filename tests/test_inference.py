"""Tiled / whole-frame inference: the original's tile geometry, blending and self-ensemble.

Stand-in models (no generator needed): a per-pixel linear map RGB -> 31 bands and 5x5
convolutions with zero 'SAME' padding. Both are translation-equivariant, so tiled and
whole-frame results must agree wherever a tile's output is not influenced by its own edge.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stand_in_models import BANDS, conv_model, pointwise_model

from configs import base
from cswin_jax import inference
from tests import golden_parity

# configs/base.py's config.eval tiling; a test's own keywords override it.
_TILES = {"tile": 128, "overlap": 16, "batch_size": 4}


def _tiled(apply_fn, rgb, **kwargs):
    return inference.predict_tiled(apply_fn, rgb, **{**_TILES, **kwargs})


@pytest.fixture(scope="module")
def pointwise():
    return pointwise_model()


@pytest.fixture(scope="module")
def conv():
    return conv_model()


@pytest.fixture(scope="module")
def symmetric_conv():
    return conv_model(seed=2, symmetric=True)


def _rgb(height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (height, width, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- golden geometry


def _golden_cases(golden_dir):
    import json

    archive = np.load(golden_dir / "patch_inference.npz")
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    cases = manifest["files"]["patch_inference.npz"]["cases"]
    return archive, cases


def test_tile_geometry_matches_golden(golden_dir):
    """Tile positions exactly; the blend mask (floor 0 = the original's) to float32 rounding.

    Tolerance 1e-6 on the mask: the original evaluates the cosine in float32, this port in
    float64 and rounds once (observed difference 1.2e-7).
    """
    archive, cases = _golden_cases(golden_dir)
    for j, case in enumerate(cases):
        _, _, height, width = case["shape"]
        positions = inference.tile_positions(height, width, case["patch_size"], case["overlap"])
        np.testing.assert_array_equal(positions, archive[f"debug/tile_positions_{j}"])
        assert len(positions) == case["n_tiles"]
        mask = inference.blend_weights(case["patch_size"], case["overlap"], ramp_floor=0.0)
        np.testing.assert_allclose(mask, archive[f"debug/weight_mask_{j}"], rtol=0, atol=1e-6)


def test_golden_zero_set_is_where_summed_weight_is_zero(golden_dir):
    """The original's output is 0 exactly where its summed blend weight is 0.

    Cropping padded tiles' weights top-left matters: in case 1 (50 rows < patch 64) the
    last row is non-zero. This port floors the ramp, so its summed weight is never 0.
    """
    archive, cases = _golden_cases(golden_dir)
    expected_zero_counts = (696, 248)
    for j, case in enumerate(cases):
        _, _, height, width = case["shape"]
        tile, overlap = case["patch_size"], case["overlap"]
        original_weight = inference.summed_weight(height, width, tile, overlap, ramp_floor=0.0)
        golden_zero = np.all(archive[f"output/{j}"][0] == 0, axis=0)
        np.testing.assert_array_equal(golden_zero, original_weight == 0)
        assert golden_zero.sum() == expected_zero_counts[j]
        assert inference.summed_weight(height, width, tile, overlap).min() > 0


def test_arad_frame_geometry():
    assert inference.tile_starts(482, 128, 16) == [0, 112, 224, 336, 354]
    assert inference.tile_starts(512, 128, 16) == [0, 112, 224, 336, 384]
    assert len(inference.tile_positions(482, 512, 128, 16)) == 25
    # Axis shorter than a tile: one short tile; exactly one tile; one pixel past a tile.
    assert inference.tile_starts(97, 128, 16) == [0]
    assert inference.tile_starts(128, 128, 16) == [0]
    assert inference.tile_starts(129, 128, 16) == [0, 1]
    positions = inference.tile_positions(97, 131, 128, 16)
    np.testing.assert_array_equal(positions, [[0, 0, 97, 128], [0, 3, 97, 131]])


def test_bad_tiling_arguments(pointwise):
    with pytest.raises(ValueError, match="overlap"):
        inference.tile_starts(200, 64, 64)
    with pytest.raises(ValueError, match="3 channels"):
        _tiled(pointwise, np.zeros((200, 200, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        inference.predict_whole(pointwise, np.zeros((200, 3), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        _tiled(pointwise, np.zeros((200, 200, 3), np.float32), batch_size=0)


# ----------------------------------------------------------------------------- blending


def test_pointwise_model_tiled_equals_whole_everywhere(pointwise):
    """A per-pixel model gives every tile the exact values, so blending must reproduce them
    at every pixel, the outer border included (the original returns 0 there). Tolerance
    1e-5 relative: float32 weighted averaging of identical values."""
    rgb = _rgb(150, 200)
    whole = inference.predict_whole(pointwise, rgb)
    tiled = _tiled(pointwise, rgb, tile=64, overlap=16, batch_size=3)
    assert tiled.shape == (150, 200, BANDS) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    assert np.all(tiled > 0)


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [
        (97, 131, 128, 16),  # rows shorter than a tile: reflect padding at the bottom
        (482, 512, 128, 16),  # the ARAD frame
        (20, 300, 128, 16),  # padding longer than the image: edge replication
        (70, 90, 32, 8),  # many small tiles, partial last batch
    ],
)
def test_conv_model_tiled_matches_whole_away_from_seams(conv, height, width, tile, overlap):
    """5x5 convolution: a tile's output differs from the whole frame's only within 2 pixels
    of its edges; there the blend weight ramps from ~0, so away from seams (3-pixel margin)
    the results agree within 1e-4 (float32 convolution rounding and the 1e-6 ramp floor)."""
    rgb = _rgb(height, width, seed=height)
    whole = inference.predict_whole(conv, rgb)
    tiled = _tiled(conv, rgb, tile=tile, overlap=overlap, batch_size=4)
    assert tiled.shape == whole.shape == (height, width, BANDS)
    away = ~inference.seam_mask(height, width, tile, overlap, margin=3)
    assert away.mean() > 0.3
    np.testing.assert_allclose(tiled[away], whole[away], rtol=0, atol=1e-4)
    assert np.isfinite(tiled).all()


def test_image_smaller_than_a_tile_runs_whole(conv):
    rgb = _rgb(50, 60)
    np.testing.assert_array_equal(_tiled(conv, rgb, tile=128), inference.predict_whole(conv, rgb))
    tiny = _rgb(1, 1)
    assert _tiled(conv, tiny).shape == (1, 1, BANDS)


def test_result_independent_of_tile_batch_size(conv):
    """Padding the last batch must not leak into the result (bit-identical per tile)."""
    rgb = _rgb(150, 170)
    results = [_tiled(conv, rgb, tile=64, overlap=16, batch_size=b) for b in (1, 4, 7)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=0, atol=1e-6)


def test_batched_input_and_rank(pointwise):
    rgb = np.stack([_rgb(100, 150, seed=s) for s in range(2)])
    tiled = _tiled(pointwise, rgb, tile=64)
    assert tiled.shape == (2, 100, 150, BANDS)
    np.testing.assert_allclose(tiled[1], _tiled(pointwise, rgb[1], tile=64))


def test_one_compilation_for_all_image_sizes():
    """Every tile batch has the same shape, so two image sizes trace the model once."""
    traces = []
    matrix = jnp.ones((3, BANDS), jnp.float32)

    def apply_fn(rgb):
        traces.append(rgb.shape)
        return rgb @ matrix

    _tiled(apply_fn, _rgb(100, 150), tile=64, batch_size=2)
    _tiled(apply_fn, _rgb(130, 90), tile=64, batch_size=2)
    assert traces == [(2, 64, 64, 3)]


def test_model_apply_passes_variables_as_arguments():
    """ModelApply: new variables of the same structure reuse the compiled function."""
    traces = []

    def fn(variables, rgb):
        traces.append(rgb.shape)
        return rgb @ variables["matrix"]

    first = inference.ModelApply(fn, {"matrix": jnp.ones((3, BANDS))})
    rgb = _rgb(100, 150)
    out1 = _tiled(first, rgb, tile=64)
    first.variables = {"matrix": 2 * jnp.ones((3, BANDS))}
    out2 = _tiled(first, rgb, tile=64)
    np.testing.assert_allclose(out2, 2 * out1, rtol=1e-6)
    assert len(traces) == 1


# ----------------------------------------------------------------------------- self-ensemble


def test_ensemble_of_equivariant_model_equals_plain(symmetric_conv):
    """A D4-symmetric kernel commutes with flips/rotations: the ensemble equals the plain
    result (1e-5: float32 sums of 8 equal maps), whole-frame (non-square) and tiled."""
    rgb = _rgb(60, 84)
    plain = inference.predict_whole(symmetric_conv, rgb)
    np.testing.assert_allclose(
        inference.predict_whole(symmetric_conv, rgb, ensemble=True), plain, rtol=0, atol=1e-5
    )
    tiled_plain = _tiled(symmetric_conv, rgb, tile=32, overlap=8)
    tiled_ens = _tiled(symmetric_conv, rgb, tile=32, overlap=8, ensemble=True)
    np.testing.assert_allclose(tiled_ens, tiled_plain, rtol=0, atol=1e-5)


def test_ensemble_is_mean_of_inverse_mapped_views(conv):
    """For a model that is not D4-equivariant, compare with views built in numpy."""
    rgb = _rgb(24, 40)
    expected = np.zeros((24, 40, BANDS), np.float32)
    for flip in (False, True):
        for k in range(4):
            view = np.rot90(np.flip(rgb, 1) if flip else rgb, k, axes=(0, 1))
            out = np.asarray(conv(jnp.asarray(view[None].copy())))[0]
            out = np.rot90(out, -k, axes=(0, 1))
            expected += np.flip(out, 1) if flip else out
    expected /= 8
    got = inference.predict_whole(conv, rgb, ensemble=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert not np.allclose(got, inference.predict_whole(conv, rgb), atol=1e-3)


# ----------------------------------------------------------------------------- golden, end to end


@pytest.fixture(scope="module")
def tiny_generator_apply(golden_dir):
    import json

    from cswin_jax import convert
    from cswin_jax.models.generator import build_generator

    manifest = json.loads((golden_dir / "manifest.json").read_text())
    model_cfg = dict(manifest["files"]["generator_tiny.npz"]["config"])
    model_cfg["clamp_range"] = model_cfg.pop("generator_clamp_range")
    model = build_generator(base.complete({"model": model_cfg}).model)
    archive = np.load(golden_dir / "generator_tiny.npz")
    torch_params = {k: archive[k] for k in archive.files if k.startswith("param/")}
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = convert.torch_to_flax(torch_params, abstract, prefix="param/")
    return inference.make_generator_apply(model, variables["params"])


@pytest.mark.parametrize("case_index", [0, 1])
def test_tiny_generator_tiles_match_golden(golden_dir, tiny_generator_apply, case_index):
    """The original's PatchInference output with the tiny generator.

    Compared everywhere EXCEPT where the original's summed blend weight is 0: there the
    original outputs 0 (its ramp starts at exactly 0), while this port's floored
    ramp gives the average of the covering tiles, which must be finite and non-zero.
    Tolerance max|d| / max|ref| <= 1e-4 (the golden README's model-output tolerance); the
    1e-6 ramp floor contributes at most ~1e-6 of the tiles' disagreement (observed 3-4e-5).
    """
    archive, cases = _golden_cases(golden_dir)
    case = cases[case_index]
    rgb = archive[f"input/rgb_{case_index}"][0].transpose(1, 2, 0)
    expected = archive[f"output/{case_index}"][0].transpose(1, 2, 0)
    tiled = inference.predict_tiled(
        tiny_generator_apply,
        rgb,
        tile=case["patch_size"],
        overlap=case["overlap"],
        batch_size=case["batch_size"],
    )
    original_weight = inference.summed_weight(
        *rgb.shape[:2], case["patch_size"], case["overlap"], ramp_floor=0.0
    )
    compared = original_weight > 0
    error = golden_parity.record(
        "patch_inference", f"output/{case_index} (weight > 0)", tiled[compared], expected[compared]
    )
    assert error <= 1e-4, error
    border = tiled[~compared]
    assert np.isfinite(border).all() and np.all(np.abs(border).max(axis=-1) > 0)


def test_tiles_come_from_the_config():
    """`_TILES` above is configs/base.py's config.eval; a checkpoint's config that predates a
    key gets the base default, and its own values win."""
    settings = inference.eval_settings({})
    assert (settings.tile_size, settings.tile_overlap, settings.tile_batch_size) == (
        _TILES["tile"],
        _TILES["overlap"],
        _TILES["batch_size"],
    )
    saved = inference.eval_settings({"eval": {"tile_size": 64, "tiled": True}})
    assert (saved.tile_size, saved.tile_overlap, saved.tiled) == (64, 16, True)
    rgb = np.random.default_rng(0).uniform(0, 1, (150, 140, 3)).astype(np.float32)
    pointwise = pointwise_model()
    np.testing.assert_array_equal(
        inference.predict_frame(pointwise, rgb, saved), _tiled(pointwise, rgb, tile=64)
    )
    np.testing.assert_array_equal(
        inference.predict_frame(pointwise, rgb, saved, tiled=False),
        inference.predict_whole(pointwise, rgb),
    )
