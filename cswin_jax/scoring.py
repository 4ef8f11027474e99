"""Scoring on the benchmark protocol: predict each scene (`inference.predict_frame`), score it
(`metrics.center_crop_metrics`, raw and clamped), summarise over scenes. The one evaluation
path of training validation (`loop`), the `evaluate` command and the per-pixel floor.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from cswin_jax import inference, metrics

FIRST_COLUMNS = ("stem", "has_ground_truth")


@functools.cache
def _jitted_metrics(clamp_predictions: bool):
    return jax.jit(
        functools.partial(metrics.center_crop_metrics, clamp_predictions=clamp_predictions)
    )


def score_scene(
    hsi_pred: np.ndarray, hsi_true: np.ndarray, clamp_predictions: bool = True
) -> dict[str, float]:
    """Centre-crop protocol metrics, raw and (by default) clamped. hsi_*: [H, W, 31]."""
    if hsi_pred.shape != hsi_true.shape:
        raise ValueError(
            f"prediction {hsi_pred.shape} and ground truth {hsi_true.shape} differ in shape"
        )
    values = _jitted_metrics(bool(clamp_predictions))(hsi_pred, hsi_true)
    return {name: float(value) for name, value in values.items()}


def scene_loader(scenes: Any) -> tuple[int, list[str], Callable]:
    """(count, stems, load) of `scenes`: an object with `len`, `stems` and `load(i) -> (rgb,
    hsi or None)` (`cswin_jax.data.pipeline.open_scenes`), or a sequence of (stem, rgb, hsi
    or None)."""
    if hasattr(scenes, "load"):
        return len(scenes), list(scenes.stems), scenes.load
    items = list(scenes)

    def load(i):
        return items[i][1], items[i][2]

    return len(items), [item[0] for item in items], load


def _progress(iterable: Iterable, total: int, description: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with tensorflow-datasets; degrade to log lines
        return iterable
    return tqdm(iterable, total=total, desc=description, unit="scene", dynamic_ncols=True)


def evaluate_scenes(
    apply_fn: Callable,
    scenes: Any,
    settings: Any,
    *,
    tiled: bool | None = None,
    ensemble: bool = False,
    clamp_predictions: bool = True,
    progress: bool = True,
    on_prediction: Callable[[dict, np.ndarray, np.ndarray, np.ndarray | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Predicts and scores every scene: the evaluation of the CLI and of training validation.

    Args:
      apply_fn: `[N, h, w, 3] -> [N, h, w, 31]` (e.g. from `inference.load_generator`).
      scenes: see `scene_loader`.
      settings: the run's `config.eval` (`inference.eval_settings`): whole frame or tiles.
      tiled: overrides `settings.tiled`.
      ensemble: 8-way D4 self-ensemble.
      clamp_predictions: also score the prediction clamped to [0, 1] (`<name>_clamped`).
      progress: a progress bar over the scenes.
      on_prediction: called as (row, rgb, prediction, truth or None) after each scene, with
        `row` the scene's result dict (below).

    Returns:
      one dict per scene: stem, has_ground_truth, the metrics (absent without truth), seconds.
    """
    count, stems, load = scene_loader(scenes)
    rows = []
    indices = _progress(range(count), count, "evaluate") if progress else range(count)
    for i in indices:
        rgb, hsi_true = load(i)
        start = time.perf_counter()
        hsi_pred = inference.predict_frame(apply_fn, rgb, settings, tiled=tiled, ensemble=ensemble)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"stem": stems[i], "has_ground_truth": hsi_true is not None}
        if hsi_true is not None:
            row.update(score_scene(hsi_pred, hsi_true, clamp_predictions))
        else:
            logging.info("%s: no ground-truth cube; predicted only, not scored", stems[i])
        row["seconds"] = seconds
        rows.append(row)
        if on_prediction is not None:
            on_prediction(row, rgb, hsi_pred, hsi_true)
    return rows


def metric_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in FIRST_COLUMNS and key != "seconds" and key not in names:
                names.append(key)
    raw = [n for n in names if not n.endswith("_clamped")]
    order = {name: i for i, name in enumerate(metrics.METRIC_NAMES)}
    raw.sort(key=lambda n: order.get(n, len(order)))
    return [n for name in raw for n in (name, f"{name}_clamped") if n in names]


def summarize(rows: Sequence[dict], num_extremes: int = 5) -> dict[str, Any]:
    """Mean/std over scored scenes, worst and best scenes by MRAE, unscored scenes."""
    scored = [r for r in rows if r["has_ground_truth"]]
    names = metric_names(scored)
    summary: dict[str, Any] = {
        "num_scenes": len(rows),
        "num_scored": len(scored),
        "predicted_only": [r["stem"] for r in rows if not r["has_ground_truth"]],
        "mean": {},
        "std": {},
        "seconds_per_scene": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }
    for name in names:
        values = np.array([r[name] for r in scored if name in r], np.float64)
        summary["mean"][name] = float(values.mean())
        summary["std"][name] = float(values.std())
    if scored and "mrae" in names:
        by_mrae = sorted(scored, key=lambda r: r["mrae"], reverse=True)
        pick = ("stem", "mrae", "psnr", "sam")
        summary["worst"] = [{k: r[k] for k in pick if k in r} for r in by_mrae[:num_extremes]]
        summary["best"] = [{k: r[k] for k in pick if k in r} for r in by_mrae[::-1][:num_extremes]]
    return summary
