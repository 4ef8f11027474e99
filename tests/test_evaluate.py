"""Evaluate CLI: the scored window, per-scene rows, summary, CSV/JSON, scenes without ground
truth, figures, the floor's rows, and the end-to-end run on a synthetic validation split."""

import csv
import json

import numpy as np
import pytest
from stand_in_models import BANDS, pointwise_model, write_tiny_checkpoint

from cswin_jax import evaluate, inference, metrics, scoring

SETTINGS = inference.eval_settings({})  # configs/base.py's config.eval: whole frames


def _scene(stem, height, width, seed, with_truth=True):
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
    truth = rng.uniform(0.2, 1.0, (height, width, BANDS)).astype(np.float32)
    return stem, rgb, truth if with_truth else None


def test_scored_window_is_the_protocol_window():
    assert metrics.scored_window(482, 512) == (128, 128, 354, 384)
    assert metrics.scored_window(300, 320) == (128, 128, 172, 192)  # fallback: whole slice
    assert metrics.scored_window(256, 400) is None  # empty slice -> sentinel
    # Errors only outside the window must not move the metrics (same pixels as metrics.py).
    truth = np.random.default_rng(0).uniform(0.2, 1, (482, 512, BANDS)).astype(np.float32)
    pred = truth.copy()
    y0, x0, y1, x1 = metrics.scored_window(482, 512)
    outside = np.ones((482, 512), bool)
    outside[y0:y1, x0:x1] = False
    pred[outside] += 1.0
    assert scoring.score_scene(pred, truth)["mrae"] == 0.0
    pred[y0, x0] += 1.0
    assert scoring.score_scene(pred, truth)["mrae"] > 0.0


def test_rows_and_summary_with_a_scene_without_truth():
    """Per-scene rows equal metrics.center_crop_metrics of the prediction (1e-6 relative:
    the same jitted function), mean/std over scored scenes only, worst first."""
    apply_fn = pointwise_model()
    scenes = [
        _scene("a", 260, 264, 0),
        _scene("b", 260, 264, 1),
        _scene("rgb_only", 260, 264, 2, with_truth=False),
    ]
    predictions = {}

    def keep(row, rgb, pred, truth):
        predictions[row["stem"]] = pred

    rows = scoring.evaluate_scenes(apply_fn, scenes, SETTINGS, on_prediction=keep)
    assert [r["stem"] for r in rows] == ["a", "b", "rgb_only"]
    assert rows[2]["has_ground_truth"] is False and "mrae" not in rows[2]
    for row, (_, _, truth) in zip(rows[:2], scenes[:2], strict=True):
        expected = metrics.center_crop_metrics(predictions[row["stem"]], truth, True)
        for name, value in expected.items():
            assert row[name] == pytest.approx(float(value), rel=1e-6), name
        assert {"mrae", "mrae_clamped", "psnr", "psnr_clamped", "ssim", "sam", "mae"} <= set(row)
    summary = scoring.summarize(rows)
    assert summary["num_scenes"] == 3 and summary["num_scored"] == 2
    assert summary["predicted_only"] == ["rgb_only"]
    mraes = [rows[0]["mrae"], rows[1]["mrae"]]
    assert summary["mean"]["mrae"] == pytest.approx(np.mean(mraes))
    assert summary["std"]["mrae"] == pytest.approx(np.std(mraes))
    assert summary["worst"][0]["mrae"] == max(mraes)
    assert summary["best"][0]["mrae"] == min(mraes)
    table = evaluate.format_table(rows, summary)
    assert "no ground truth: predicted only" in table and "mrae_clamped" in table


def test_small_frames_give_the_sentinel():
    rows = scoring.evaluate_scenes(pointwise_model(), [_scene("small", 40, 50, 0)], SETTINGS)
    assert rows[0]["mrae"] == 999.0 and rows[0]["psnr"] == 0.0


def test_write_results(tmp_path):
    rows = [
        {"stem": "a", "has_ground_truth": True, "mrae": 0.2, "mrae_clamped": 0.1, "seconds": 1.0},
        {"stem": "b", "has_ground_truth": False, "seconds": 2.0},
    ]
    csv_path, json_path = evaluate.write_results(tmp_path, rows, scoring.summarize(rows))
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["stem"] for r in table] == ["a", "b"]
    assert table[0]["mrae"] == "0.2" and table[1]["mrae"] == ""
    assert list(table[0]) == ["stem", "has_ground_truth", "mrae", "mrae_clamped", "seconds"]
    summary = json.loads(json_path.read_text())
    assert summary["mean"]["mrae"] == 0.2 and summary["predicted_only"] == ["b"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """Three synthetic 260x264 validation scenes; the third has its cube removed."""
    from cswin_jax.data import synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    synthetic.write_dataset(root, num_train=1, num_valid=3, height=260, width=264, seed=0)
    stems = (root / "split_txt" / "valid_list.txt").read_text().split()
    (root / "Train_Spec" / f"{stems[-1]}.mat").unlink()
    return root, stems


def test_cli_end_to_end(tmp_path, synthetic_root):
    """Tiny generator checkpoint, tiled (64-pixel tiles), figures: CSV with one row per scene,
    summary, the scene without a cube predicted only, figure files written."""
    root, stems = synthetic_root
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval"
    summary = evaluate.main(
        ["--checkpoint", str(checkpoint), "--data_dir", str(root), "--output", str(out),
         "--tiled", "--figures", "--figure_scenes", "1"]
    )  # fmt: skip
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["stem"] for r in table] == stems
    assert [r["has_ground_truth"] for r in table] == ["True", "True", "False"]
    assert all(np.isfinite(float(r["mrae"])) for r in table[:2]) and table[2]["mrae"] == ""
    written = json.loads((out / "summary.json").read_text())
    assert written["num_scored"] == 2 and written["predicted_only"] == [stems[2]]
    assert written["settings"]["tiled"] is True and written["settings"]["use_ema"] is True
    # The per-pixel floor, fit on the one training scene, scored on the two with cubes.
    assert [r["order"] for r in written["floor"]["orders"]] == [1, 2, 3]
    assert all(r["num_scored"] == 2 for r in written["floor"]["orders"])
    figures = {p.name for p in (out / "figures").iterdir()}
    assert "metric_histograms.png" in figures
    for stem in stems[:2]:  # worst and best
        assert {f"{stem}_{kind}.png" for kind in ("comparison", "error_maps", "spectra")} <= figures
    assert f"{stems[2]}_comparison.png" in figures and f"{stems[2]}_error_maps.png" not in figures
    assert all((out / "figures" / name).stat().st_size > 1000 for name in figures)
    assert summary["output_dir"] == str(out)


def test_cli_bad_inputs(tmp_path, synthetic_root):
    root, _ = synthetic_root
    for output in (["--output", str(tmp_path / "out")], []):
        with pytest.raises(FileNotFoundError, match="checkpoint folder .* does not exist"):
            evaluate.main(["--checkpoint", str(tmp_path / "none"), "--data_dir", str(root),
                           *output])  # fmt: skip
    assert not (tmp_path / "none").exists()
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="data directory .* does not exist"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data_dir", str(tmp_path / "nodata"),
                       "--output", str(tmp_path / "out")])  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data_dir", str(root),
                       "--output", str(blocker / "out")])  # fmt: skip
