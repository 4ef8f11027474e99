"""The per-pixel regression floor: the deterministic pixel sample through the data readers,
scores equal to the metrics of an independent fit, evaluate's floor rows, the loop's step-0
scalars, the skip without a training split, and the CLI."""

import json
import pathlib
import re

import ml_collections
import numpy as np
import pytest
from stand_in_models import BANDS, write_tiny_checkpoint

from configs import base
from cswin_jax import (
    evaluate,
    floor,
    loop,
    metric_writers,
    metrics,
    programs,
    scoring,
    sharding,
    tensorboard_events,
)
from cswin_jax import io as hsi_io
from cswin_jax.data import pipeline, synthetic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two training and one validation synthetic scene of 260x264 (a 4x8 scored window)."""
    root = tmp_path_factory.mktemp("floor") / "synthetic"
    synthetic.write_dataset(root, num_train=2, num_valid=1, height=260, width=264, seed=0)
    return root


def _config(root):
    config = base.get_config()
    config.data.data_dir = str(root)
    return config


def test_sample_pixels_reads_what_the_readers_deliver(data_root):
    """The sample is deterministic, an equal share per scene, and equal to indexing the
    scenes the readers load (RGB min-max normalised) for dense and sparse samples alike."""
    scenes = pipeline.open_scenes(_config(data_root), data_root, "train")
    loaded = [(scenes.stems[i], *scenes.load(i)) for i in range(len(scenes))]
    for num_pixels in (20001, 301):  # one cube read per scene / one read per pixel
        rgb, hsi = floor.sample_pixels(scenes, num_pixels, seed=3)
        assert rgb.shape == (num_pixels, 3) and hsi.shape == (num_pixels, BANDS)
        again = floor.sample_pixels(loaded, num_pixels, seed=3)
        np.testing.assert_array_equal(rgb, again[0])
        np.testing.assert_array_equal(hsi, again[1])
    other, _ = floor.sample_pixels(scenes, 301, seed=4)
    assert not np.array_equal(rgb, other)
    first = loaded[0][1].reshape(-1, 3)
    everything, _ = floor.sample_pixels(loaded, 10**6, seed=0)  # more than there are: all
    assert len(everything) == 2 * 260 * 264
    np.testing.assert_array_equal(everything[: 260 * 264], first)


def test_scores_equal_an_independent_fit(data_root):
    """Order 1's metrics equal `metrics.center_crop_metrics` of a plain least-squares fit
    (unstandardised features) on the same pixels."""
    config = _config(data_root)
    train = pipeline.open_scenes(config, data_root, "train")
    valid = pipeline.load_split(config, data_root, "valid")
    summary = floor.evaluate_floor(train, valid, orders=(1, 2), num_pixels=4000, seed=0)
    assert [r["order"] for r in summary["orders"]] == [1, 2]
    assert summary["num_pixels"] == 4000 and summary["num_train_scenes"] == 2
    rgb, hsi = floor.sample_pixels(train, 4000, seed=0)
    design = np.concatenate([np.ones((4000, 1)), rgb], axis=1).astype(np.float64)
    weights, *_ = np.linalg.lstsq(design, hsi.astype(np.float64), rcond=None)
    _, rgb_valid, hsi_valid = valid[0]
    pred = (rgb_valid.astype(np.float64) @ weights[1:] + weights[0]).astype(np.float32)
    expected = metrics.center_crop_metrics(pred, hsi_valid, clamp_predictions=True)
    got = summary["orders"][0]["mean"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    assert json.loads(json.dumps(summary)) == summary  # JSON-ready
    table = floor.format_table(summary)
    assert "floor order 1" in table and "floor order 2" in table and "mrae_clamped" in table


def test_settings_from_config():
    assert floor.settings(base.get_config()) == {
        "orders": (1, 2, 3),
        "num_pixels": 32768,
        "seed": 0,
    }
    old = ml_collections.ConfigDict({"eval": {"tiled": False}})  # a config from before
    assert floor.settings(old)["num_pixels"] == 32768


def test_evaluate_prints_and_writes_the_floor(tmp_path, data_root, capsys):
    """evaluate's floor rows are `floor.evaluate_floor` on the same splits and settings."""
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval"
    summary = evaluate.main(["--checkpoint", str(checkpoint), "--data_dir", str(data_root),
                             "--output", str(out), "--tiled"])  # fmt: skip
    printed = capsys.readouterr().out
    config = _config(data_root)
    expected = floor.evaluate_floor(
        pipeline.open_scenes(config, data_root, "train"),
        pipeline.open_scenes(config, data_root, "valid", require_cubes=False),
        **floor.settings(config),
    )
    written = json.loads((out / "summary.json").read_text())
    for got in (summary["floor"], written["floor"]):
        assert [r["order"] for r in got["orders"]] == [1, 2, 3]
        for row, want in zip(got["orders"], expected["orders"], strict=True):
            assert row["mean"] == pytest.approx(want["mean"], rel=1e-6)
    assert printed.count("floor order") == 3 and "per-pixel floor" in printed
    mrae_column = printed.splitlines()[0].split().index("mrae")
    floor_line = next(x for x in printed.splitlines() if x.startswith("floor order 1"))
    assert float(floor_line.split()[mrae_column + 2]) == pytest.approx(
        expected["orders"][0]["mean"]["mrae"], rel=1e-4
    )


def test_no_training_split_is_skipped_with_the_reason(tmp_path, data_root):
    root = tmp_path / "valid_only"
    for folder in ("Train_RGB", "Train_Spec", "split_txt"):
        (root / folder).mkdir(parents=True)
    stem = (data_root / "split_txt" / "valid_list.txt").read_text().split()[0]
    for folder, suffix in (("Train_RGB", ".jpg"), ("Train_Spec", ".mat")):
        (root / folder / f"{stem}{suffix}").write_bytes(
            (data_root / folder / f"{stem}{suffix}").read_bytes()
        )
    (root / "split_txt" / "valid_list.txt").write_text(stem + "\n")
    config = _config(root)
    scenes = pipeline.open_scenes(config, root, "valid", require_cubes=False)
    rows = [{"stem": stem, "has_ground_truth": True, "mrae": 0.5, "seconds": 0.0}]
    result = evaluate.floor_summary(config, root, scenes, rows)
    assert set(result) == {"skipped"} and "train_list.txt is missing" in result["skipped"]
    summary = scoring.summarize(rows)
    summary["floor"] = result
    last = evaluate.format_table(rows, summary).splitlines()[-1]
    assert last.startswith("floor: skipped, the dataset has no training split")
    unscored = [{"stem": stem, "has_ground_truth": False, "seconds": 0.0}]
    assert (
        "no scene of the split" in evaluate.floor_summary(config, root, scenes, unscored)["skipped"]
    )
    with pytest.raises(SystemExit) as exit_info:
        floor.main(["--data_dir", str(root)])
    assert exit_info.value.code == 2


def test_loop_logs_the_floor_at_step_0(tmp_path, data_root):
    """`loop.log_floor` (what a fresh run calls before compiling) writes floor/order<k>/<m>
    scalars at step 0, clamped ones with eval.clamp_predictions; the floor keys are
    host-only (they never change the compiled programs)."""
    config = _config(data_root)
    config.eval.clamp_predictions = True
    config.eval.floor_pixels = 3000
    train = pipeline.open_scenes(config, data_root, "train")
    valid = pipeline.load_split(config, data_root, "valid")
    writer = metric_writers.MetricWriter(tmp_path, config)
    summary = loop.log_floor(config, writer, train, valid)
    writer.close()
    scalars = tensorboard_events.read_scalars(tmp_path)
    for result in summary["orders"]:
        for name in ("mrae", "psnr", "rmse", "sam", "ssim", "mae", "mrae_clamped"):
            tag = f"floor/order{result['order']}/{name}"
            assert scalars[tag] == [(0, pytest.approx(result["mean"][name], rel=1e-6))], tag
    assert summary["num_pixels"] == 3000
    mesh = sharding.make_mesh()
    changed = _config(data_root)
    changed.eval.floor, changed.eval.floor_pixels, changed.eval.floor_orders = False, 10, (1,)
    assert programs._programs_key(changed, mesh) == programs._programs_key(_config(data_root), mesh)


class _Compiling(Exception):
    pass


@pytest.mark.parametrize("enabled", [True, False])
def test_fresh_runs_log_the_floor_before_compiling(tmp_path, monkeypatch, enabled):
    """train_and_evaluate calls log_floor with the run's own splits before it compiles
    (stopped there: no step is compiled), only when eval.floor is set."""
    from train_setup import tiny_config

    calls = []
    monkeypatch.setattr(loop, "log_floor", lambda *args: calls.append(args))

    def stop(*args):
        raise _Compiling

    monkeypatch.setattr(loop, "compiled_programs", stop)
    config = tiny_config()
    config.eval.floor = enabled
    with pytest.raises(_Compiling):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert len(calls) == int(enabled)
    if enabled:
        _, _, train_scenes, valid_scenes = calls[0]
        assert len(train_scenes) == config.data.synthetic.num_train
        assert len(valid_scenes) == config.data.synthetic.num_valid


def test_cli(tmp_path, data_root, capsys):
    out = tmp_path / "floor.json"
    summary = floor.main(["--data_dir", str(data_root), "--orders", "1,3", "--pixels", "2000",
                          "--seed", "5", "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "floor order 1" in printed and "floor order 3" in printed and "order 2" not in printed
    assert json.loads(out.read_text())["orders"] == summary["orders"]
    assert summary["num_pixels"] == 2000 and summary["seed"] == 5
    assert summary["objective"] == "lsq"
    mrae_fit = floor.main(["--data_dir", str(data_root), "--orders", "1", "--pixels", "2000",
                           "--seed", "5", "--objective", "mrae"])  # fmt: skip
    assert mrae_fit["objective"] == "mrae" and "polynomial MRAE fit" in capsys.readouterr().out
    # Each fit minimises its own objective on its training pixels; on the validation scenes the
    # MRAE fit has to be at least competitive in MRAE with least squares.
    assert mrae_fit["orders"][0]["mean"]["mrae"] <= 1.05 * summary["orders"][0]["mean"]["mrae"]
    # A config file: its data source (synthetic, generated into the workdir) and eval keys.
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "from configs import quickstart\n\n\ndef get_config(arg=None):\n"
        "    c = quickstart.get_config(arg)\n"
        "    c.data.synthetic.num_train, c.data.synthetic.num_valid = 2, 1\n"
        "    c.data.synthetic.height, c.data.synthetic.width = 40, 48\n"
        "    c.eval.floor_orders = (2,)\n"
        "    return c\n"
    )
    summary = floor.main(["--config", str(config_file), "--workdir", str(tmp_path / "run")])
    assert [r["order"] for r in summary["orders"]] == [2]
    assert (tmp_path / "run" / pipeline.SYNTHETIC_FOLDER / "split_txt").is_dir()
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --data_dir"),
        (["--data_dir", "{tmp}/none"], "data directory .*/none does not exist"),
        (["--config", "{tmp}/none.py"], "config file .*none.py does not exist"),
        (["--config", "configs/quickstart.py"], "data.source='synthetic' .* pass --workdir"),
        (["--data_dir", "{data}", "--orders", "1,x"], "--orders must look like 1,2,3"),
        (["--data_dir", "{data}", "--orders", "5"], "polynomial order 5"),
        (["--data_dir", "{data}", "--split", "test"], "Test_RGB"),
    ],
)
def test_cli_user_mistakes_are_one_line(tmp_path, data_root, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=data_root) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        floor.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_scene_files_are_normalised_like_the_reader(data_root):
    """The floor's RGB is `io.normalize_rgb` of the decoded image (the MST++ min-max)."""
    scenes = pipeline.open_scenes(_config(data_root), data_root, "train")
    stem_path = pathlib.Path(scenes.scenes[0].rgb_path)
    expected = hsi_io.read_rgb(stem_path, eight_bit=True)
    rgb, _ = floor.sample_pixels(scenes, 260 * 264 * 2, seed=0)
    np.testing.assert_array_equal(rgb[: 260 * 264], expected.reshape(-1, 3))
