r"""Score a checkpoint on the benchmark protocol, scene by scene.

Usage:
  python -m cswin_jax.evaluate --checkpoint runs/gan --data_dir $HSI_DATA_DIR \
      [--split valid] [--tiled] [--ensemble] [--figures] [--output DIR] [--nofloor]

Every scene of the split is predicted on its full frame (or tiled with --tiled, 8-way
self-ensemble with --ensemble) and scored by `cswin_jax.metrics.center_crop_metrics`: the
centred 226x256 window of each 482x512 frame. Each metric is reported twice: on the raw
prediction and on the prediction clamped to [0, 1] (`<name>_clamped`, as NTIRE submissions are
clamped). Scenes without a ground-truth cube are predicted only and reported as such.

Writes to --output (default `<checkpoint>/eval_<split>`):
  * metrics.csv: one row per scene (stem, has_ground_truth, the metrics, seconds).
  * summary.json: mean and std of every metric over scored scenes, the worst and best scenes
    by MRAE, the unscored scenes, the settings, and `floor`: the per-pixel polynomial floor
    (`cswin_jax.floor`, orders 1-3 fit on the training split, scored like the model on the
    same scenes; printed as rows under the model's), or {"skipped": why} when the dataset
    has no training split. `--nofloor` leaves it out.
  * figures/ with --figures: per-scene figures of the worst and best scenes and a histogram
    of the per-scene metrics (`cswin_jax.viz`).
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags, logging

import cswin_jax
from cswin_jax import cli, inference, metrics, predict, scoring


def write_results(
    output_dir: pathlib.Path, rows: Sequence[dict], summary: dict
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes metrics.csv and summary.json; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = [*scoring.FIRST_COLUMNS, *scoring.metric_names(rows), "seconds"]
    csv_path = output_dir / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    json_path = output_dir / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return csv_path, json_path


def format_table(rows: Sequence[dict], summary: dict) -> str:
    """A plain-text table: one line per scene, then mean and std, then the per-pixel floor's
    rows (`summary["floor"]`, when there) or the line saying why it was skipped."""
    shown = ("mrae", "rmse", "psnr", "sam")
    names = [n for n in scoring.metric_names(rows) if n.split("_")[0] in shown]
    header = f"{'scene':<20}" + "".join(f"{n:>15}" for n in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["has_ground_truth"]:
            cells = "".join(f"{row[n]:>15.5g}" for n in names)
        else:
            cells = f"{'(no ground truth: predicted only)':>{15 * max(1, len(names))}}"
        lines.append(f"{row['stem']:<20}{cells}")
    lines.append("-" * len(header))
    for stat in ("mean", "std"):
        if summary[stat]:
            cells = "".join(f"{summary[stat][n]:>15.5g}" for n in names)
            label = f"{stat} ({summary['num_scored']} scenes)"
            lines.append(f"{label:<20}{cells}")
    floor_summary = summary.get("floor")
    if floor_summary is not None and "skipped" in floor_summary:
        lines.append(f"floor: skipped, {floor_summary['skipped']}")
    elif floor_summary is not None:
        from cswin_jax import floor  # noqa: PLC0415

        lines += floor.format_rows(floor_summary, names)
        lines.append(f"({floor.describe(floor_summary)})")
    return "\n".join(lines)


def floor_summary(config, data_root, scenes, rows: Sequence[dict]) -> dict[str, Any]:
    """The per-pixel floor (`cswin_jax.floor`) fit on the dataset's training split and scored
    on `scenes` (the evaluated split), or {"skipped": why} when there is no training split or
    nothing of `scenes` has ground truth. `rows`: the model's rows of `scenes`."""
    from cswin_jax import floor  # noqa: PLC0415

    if not any(row["has_ground_truth"] for row in rows):
        reason = "no scene of the split has a ground-truth cube to score it on"
        logging.info("floor: skipped, %s", reason)
        return {"skipped": reason}
    train_scenes, missing = floor.open_train_split(config, data_root)
    if train_scenes is None:
        reason = f"the dataset has no training split to fit it on ({missing})"
        logging.info("floor: skipped, %s", reason)
        return {"skipped": reason}
    result = floor.evaluate_floor(
        train_scenes, scenes, clamp_predictions=True, **floor.settings(config)
    )
    logging.info("floor: fit and scored in %.1f s", result["seconds"])
    return result


def write_figures(
    figure_dir: pathlib.Path,
    rows: Sequence[dict],
    predictions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
) -> list[pathlib.Path]:
    """Per-scene figures for the scenes in `predictions` and the metric histograms."""
    from cswin_jax import viz

    written = []
    for stem, (rgb, hsi_pred, hsi_true) in predictions.items():
        crop = metrics.scored_window(*hsi_pred.shape[:2]) if hsi_true is not None else None
        written += viz.write_scene_figures(figure_dir, stem, hsi_pred, hsi_true, rgb, crop=crop)
    scored = [r for r in rows if r["has_ground_truth"]]
    if scored:
        per_scene = {
            name: [r[name] for r in scored if name in r]
            for name in ("mrae", "rmse", "psnr", "ssim", "sam")
        }
        written.append(viz.plot_metric_histograms(figure_dir / "metric_histograms.png", per_scene))
    return written


class _FigureKeeper:
    """Keeps the predictions of the current worst and best scenes (by MRAE) for figures, so an
    evaluation of 50 full frames does not hold 50 predicted cubes in memory."""

    def __init__(self, count: int):
        self.count = count
        self.worst: list[tuple[float, str]] = []
        self.best: list[tuple[float, str]] = []
        self.kept: dict[str, tuple] = {}
        self.unscored: list[str] = []

    def __call__(self, row, rgb, hsi_pred, hsi_true):
        stem = row["stem"]
        if hsi_true is None:
            if len(self.unscored) < self.count:
                self.unscored.append(stem)
                self.kept[stem] = (rgb, hsi_pred, None)
            return
        mrae = row["mrae"]
        self.kept[stem] = (rgb, hsi_pred, hsi_true)
        self.worst = sorted([*self.worst, (mrae, stem)], reverse=True)[: self.count]
        self.best = sorted([*self.best, (mrae, stem)])[: self.count]
        keep = {s for _, s in self.worst} | {s for _, s in self.best} | set(self.unscored)
        self.kept = {s: v for s, v in self.kept.items() if s in keep}


def evaluate_checkpoint(
    checkpoint_dir: str,
    data_dir: str,
    *,
    split: str = "valid",
    output_dir: str | None = None,
    tiled: bool | None = None,
    ensemble: bool = False,
    figures: bool = False,
    num_figure_scenes: int = 2,
    use_ema: bool = True,
    data_source: str = "arad",
    step: int | None = None,
    floor: bool = True,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Restores a checkpoint, evaluates every scene of `split`, writes the results.

    dtype: the generator's compute dtype ('float32' or 'bfloat16', `inference.load_generator`).

    floor: also fit the per-pixel floor on the dataset's training split and score it on
      `split` (`floor_summary`; skipped with the reason when the dataset has no training split).

    Returns the summary (also written to summary.json), with `output_dir` added.
    """
    import ml_collections

    from cswin_jax.data import arad, pipeline

    if not pathlib.Path(checkpoint_dir).exists():  # before the default output is made in it
        raise FileNotFoundError(
            f"checkpoint folder {checkpoint_dir} does not exist; pass a training workdir, its "
            "checkpoints/ folder, or a folder written by `python -m cswin_jax.convert`"
        )
    output = pathlib.Path(output_dir or pathlib.Path(checkpoint_dir) / f"eval_{split}")
    predict.ensure_writable_dir(output)
    if data_source == "arad":  # fail before the (slow) model restore
        arad.check_layout(data_dir)
    apply_fn, config_dict = inference.load_generator(
        checkpoint_dir, use_ema=use_ema, step=step, dtype=dtype
    )
    config = ml_collections.ConfigDict(config_dict)
    with config.unlocked():
        config.data.source = data_source
        config.data.data_dir = str(data_dir)
    if data_source == "tfds":
        data_root = pipeline.resolve_data_root(config, output)
    else:
        data_root = arad.check_layout(data_dir)
    scenes = pipeline.open_scenes(config, data_root, split, require_cubes=False)
    settings = inference.eval_settings(config)
    use_tiles = bool(settings.tiled) if tiled is None else tiled
    keeper = _FigureKeeper(num_figure_scenes) if figures else None
    logging.info(
        "evaluating %s on %d %s scenes from %s (%s%s)",
        checkpoint_dir,
        len(scenes),
        split,
        data_root,
        "tiled" if use_tiles else "whole frame",
        ", 8-way ensemble" if ensemble else "",
    )
    rows = scoring.evaluate_scenes(
        apply_fn, scenes, settings, tiled=use_tiles, ensemble=ensemble, on_prediction=keeper
    )
    summary = scoring.summarize(rows)
    summary["settings"] = {
        "checkpoint": str(checkpoint_dir),
        "data_dir": str(data_dir),
        "split": split,
        "tiled": use_tiles,
        "ensemble": ensemble,
        "use_ema": use_ema,
        "dtype": dtype,
        "protocol": "centre 226x256 window (metrics.center_crop_metrics); raw and clamped [0, 1]",
    }
    if floor:
        summary["floor"] = floor_summary(config, data_root, scenes, rows)
    csv_path, json_path = write_results(output, rows, summary)
    if keeper is not None:
        summary["figures"] = [str(p) for p in write_figures(output / "figures", rows, keeper.kept)]
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["output_dir"] = str(output)
    print(format_table(rows, summary))
    print(f"wrote {csv_path} and {json_path}")
    return summary


# ----------------------------------------------------------------------------- CLI


_FLAGS = cli.program_flags()  # its own set: predict, floor, ... share names (cli.program_flags)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Checkpoint folder (training or converted). Required.",
    flag_values=_FLAGS,
    required=True,
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Dataset root (MST++ / ARAD-1K layout). Required.",
    flag_values=_FLAGS,
    required=True,
)
_SPLIT = flags.DEFINE_enum(
    "split", "valid", ["train", "valid", "test"], "Split to evaluate.", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Results folder (default: <checkpoint>/eval_<split>).", flag_values=_FLAGS
)
_TILED = flags.DEFINE_bool(
    "tiled",
    None,
    "Tiled inference; --notiled: whole frames (default: the checkpoint's config.eval.tiled).",
    flag_values=_FLAGS,
)
_ENSEMBLE = flags.DEFINE_bool(
    "ensemble", False, "8-way flip/rotate self-ensemble.", flag_values=_FLAGS
)
_FIGURES = flags.DEFINE_bool(
    "figures",
    False,
    "Figures of the worst and best scenes (in <output>/figures).",
    flag_values=_FLAGS,
)
_FIGURE_SCENES = flags.DEFINE_integer(
    "figure_scenes",
    2,
    "How many worst and how many best scenes get figures.",
    flag_values=_FLAGS,
)
_RAW_WEIGHTS, _STEP, _DTYPE = predict.define_weight_flags(_FLAGS)
_DATA_SOURCE = flags.DEFINE_enum(
    "data_source",
    "arad",
    ["arad", "tfds"],
    "Dataset reader: arad (files in --data_dir) or tfds (TensorFlow Datasets).",
    flag_values=_FLAGS,
)
_FLOOR = flags.DEFINE_bool(
    "floor",
    True,
    "Rows of the per-pixel polynomial floor fit on the training split; --nofloor leaves them "
    "out (--no-floor is read as --nofloor).",
    flag_values=_FLAGS,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: `argv` are the arguments (None: sys.argv[1:]); returns the summary."""
    cli.parse_flags(_FLAGS, argv, __doc__)
    logging.set_verbosity(logging.INFO)
    return evaluate_checkpoint(
        _CHECKPOINT.value,
        _DATA_DIR.value,
        split=_SPLIT.value,
        output_dir=_OUTPUT.value,
        tiled=_TILED.value,
        ensemble=_ENSEMBLE.value,
        figures=_FIGURES.value,
        num_figure_scenes=_FIGURE_SCENES.value,
        use_ema=not _RAW_WEIGHTS.value,
        data_source=_DATA_SOURCE.value,
        step=_STEP.value,
        floor=_FLOOR.value,
        dtype=_DTYPE.value,
    )


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main, flag_values=_FLAGS)
