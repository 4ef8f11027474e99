"""Figures: every figure type written as a non-empty PNG, the validation curve from the event
files, and the CLI."""

import numpy as np
import pytest
from PIL import Image
from stand_in_models import BANDS

from cswin_jax import cubes, tensorboard_events, viz


def _cube(height=24, width=32, seed=0):
    return np.random.default_rng(seed).uniform(0.05, 1.0, (height, width, BANDS)).astype(np.float32)


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_scene_figures(tmp_path):
    truth = _cube(48, 64, seed=4)
    pred = truth + np.random.default_rng(5).normal(0, 0.05, truth.shape).astype(np.float32)
    rgb = np.random.default_rng(6).uniform(0, 1, (48, 64, 3)).astype(np.float32)
    written = viz.write_scene_figures(tmp_path, "scene", pred, truth, rgb, crop=(8, 8, 40, 56))
    names = [p.name for p in written]
    assert names == [
        "scene_comparison.png",
        "scene_error_maps.png",
        "scene_band_errors.png",
        "scene_spectra.png",
    ]
    for path in written:
        _check_png(path)
    unscored = viz.write_scene_figures(tmp_path, "rgb_only", pred)
    assert [p.name for p in unscored] == ["rgb_only_comparison.png", "rgb_only_spectra.png"]
    with pytest.raises(ValueError, match="outside the 48x64 image"):
        viz.plot_spectra(tmp_path / "x.png", pred, truth, pixels=[(48, 0)])
    with pytest.raises(ValueError, match="differ in shape"):
        viz.write_scene_figures(tmp_path, "bad", pred, truth[:-1])


def test_metric_histograms(tmp_path):
    rng = np.random.default_rng(7)
    per_scene = {"mrae": rng.gamma(2, 0.05, 20), "psnr": rng.normal(33, 2, 20), "sam": []}
    _check_png(viz.plot_metric_histograms(tmp_path / "hist.png", per_scene))
    with pytest.raises(ValueError, match="no per-scene metric values"):
        viz.plot_metric_histograms(tmp_path / "none.png", {"mrae": []})


def test_cli(tmp_path):
    truth = _cube(40, 50, seed=8)
    cubes.write_cube(tmp_path / "pred.npy", truth * 1.1)
    cubes.write_cube(tmp_path / "truth.mat", truth)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8) + 90).save(tmp_path / "rgb.png")
    (tmp_path / "metrics.csv").write_text(
        "stem,has_ground_truth,mrae,psnr\na,True,0.1,30\nb,True,0.2,31\nc,False,,\n"
    )
    written = viz.main(
        ["--pred", str(tmp_path / "pred.npy"), "--gt", str(tmp_path / "truth.mat"),
         "--rgb", str(tmp_path / "rgb.png"), "--metrics_csv", str(tmp_path / "metrics.csv"),
         "--output", str(tmp_path / "figs"), "--pixels", "3,4;20,30"]
    )  # fmt: skip
    assert len(written) == 5 and all(p.stat().st_size > 0 for p in written)
    assert viz.read_metrics_csv(tmp_path / "metrics.csv") == {"mrae": [0.1, 0.2], "psnr": [30, 31]}
    with pytest.raises(SystemExit) as exit_info:
        viz.main(["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        viz.main(["--pred", str(tmp_path / "pred.npy"), "--pixels", "3;4"])
    assert exit_info.value.code == 2


def _write_scalars(log_dir, points):
    """points: [(step, {tag: value})], written by the loop's writer."""
    import ml_collections

    from cswin_jax import metric_writers

    writer = metric_writers.MetricWriter(log_dir, ml_collections.ConfigDict())
    for step, values in points:
        writer.scalars(step, values)
    writer.close()


def test_read_scalars_and_the_validation_curve(tmp_path):
    """Event files read back (a later file wins at a repeated step, a truncated last record
    is dropped); the curve with the floor lines is a PNG; missing data is a clear error."""
    floors = {f"floor/order{k}/mrae": v for k, v in ((1, 0.45), (2, 0.64), (3, 0.70))}
    _write_scalars(tmp_path, [(0, {**floors, "floor/order1/psnr": 22.5}),
                              (50, {"val/mrae": 0.98}), (100, {"val/mrae": 0.74})])  # fmt: skip
    # A resumed run's file, named (as tensorboardX names them) by a later start time.
    _write_scalars(tmp_path / "resumed", [(100, {"val/mrae": 0.70}), (150, {"val/mrae": 0.66})])
    (later,) = (tmp_path / "resumed" / "tensorboard").glob("events.out.tfevents.*")
    later.rename(tmp_path / "tensorboard" / "events.out.tfevents.9999999999.host")
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    with open(files[-1], "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00partial")  # a record still being written
    scalars = tensorboard_events.read_scalars(tmp_path)
    assert scalars["val/mrae"] == [(50, pytest.approx(0.98)), (100, pytest.approx(0.70)),
                                   (150, pytest.approx(0.66))]  # fmt: skip
    assert scalars["floor/order2/mrae"] == [(0, pytest.approx(0.64))]
    assert tensorboard_events.read_scalars(
        tmp_path / "tensorboard"
    ) == tensorboard_events.read_scalars(files[0]) | {"val/mrae": scalars["val/mrae"]}
    _check_png(viz.plot_validation_curve(tmp_path / "curve.png", tmp_path))
    with pytest.raises(
        ValueError, match=r"no val/psnr scalars \(validation metrics found: \['mrae'\]"
    ):
        viz.plot_validation_curve(tmp_path / "x.png", tmp_path, metric="psnr")
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        tensorboard_events.read_scalars(tmp_path / "figs")


def test_cli_curve(tmp_path, capsys):
    _write_scalars(tmp_path / "run", [(0, {"floor/order1/mrae": 0.45}), (10, {"val/mrae": 0.9})])
    written = viz.main(["--curve", str(tmp_path / "run"), "--output", str(tmp_path / "figs")])
    assert written == [tmp_path / "figs" / "validation_mrae.png"]
    _check_png(written[0])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        viz.main(["--curve", str(tmp_path / "none"), "--output", str(tmp_path / "figs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no TensorBoard event files" in err
