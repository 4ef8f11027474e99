"""The per-pixel regression floor: polynomial least squares from RGB to the 31 bands.

A model that reconstructs spectra from RGB should beat the best per-pixel polynomial fit of
its own training data; this module fits that floor and scores it the way models are scored,
so every table and validation curve has its reference:

* Features and fit (`cswin_jax.polynomial_fit`): the monomials of a pixel's RGB of total
  degree <= `order` (order 1 is linear + bias, 2 quadratic, 3 cubic), fit by least squares in
  float64. RGB is what the data readers deliver (`io.normalize_rgb`, the MST++ per-image
  min-max), so the floor sees the model's input. `objective='mrae'` instead minimises the
  benchmark's own loss, the mean relative absolute error: a stronger reference where scenes
  differ in scale, since least squares is pulled by the brightest scenes while MRAE punishes
  overshooting dark ones.
* Pixels: `num_pixels` training pixels drawn without replacement, an equal share per training
  scene (`sample_pixels`, a numpy generator seeded with `seed`: deterministic).
* Score: each scene of the scored split is predicted on its full frame and scored by
  `scoring.score_scene` (the centre-crop protocol of `metrics.center_crop_metrics`, raw and
  optionally clamped to [0, 1]); mean and std over scenes by `scoring.summarize`.

It shows up in `python -m cswin_jax.evaluate` (rows beside the model's, `--floor`), at the
start of training (`floor/order<k>/<metric>` TensorBoard scalars at step 0, config
`eval.floor`), in `viz.plot_validation_curve` (reference lines), and on its own:

  python -m cswin_jax.floor --data_dir $HSI_DATA_DIR [--data_source tfds] [--split valid]
  python -m cswin_jax.floor --config configs/quickstart.py --workdir /tmp/cswin_quickstart

printing one row per order (`--orders`, `--pixels`, `--seed`; `--output floor.json`).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from cswin_jax import cli, cubes, polynomial_fit, scoring

TABLE_METRICS = ("mrae", "rmse", "psnr", "sam")  # the columns `evaluate.format_table` shows


def _pixel_source(scenes: Any, index: int):
    """(stem, rgb [H, W, 3], read_hsi_window(row, col, h, w), close or None) of one scene."""
    if hasattr(scenes, "open"):
        opened = scenes.open(index)
        return scenes.stems[index], opened.rgb, opened.read_hsi_window, opened.close
    stem, rgb, cube = scenes[index]
    if cube is None:
        raise ValueError(f"{stem}: the floor is fit on scenes with ground-truth cubes")
    return stem, rgb, lambda y, x, h, w: cube[y : y + h, x : x + w], None


def sample_pixels(scenes: Any, num_pixels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic uniform sample of the pixels of `scenes`, an equal share per scene.

    Args:
      scenes: a split with ground truth (`pipeline.open_scenes`: `len`, `stems` and `open(i)`
        with windowed cube reads, so a large split reads only its sampled pixels' spectra),
        or a sequence of (stem, rgb, hsi).
      num_pixels: total pixels; the first `num_pixels % len(scenes)` scenes take one more, a
        scene smaller than its share gives all its pixels.
      seed: seeds the numpy generator that draws them.

    Returns:
      rgb [N, 3] float32 and hsi [N, bands] float32, in scene order.
    """
    if num_pixels < 1:
        raise ValueError(f"eval.floor_pixels must be a positive pixel count, got {num_pixels}")
    rng = np.random.default_rng(seed)
    count = len(scenes)
    rgb_parts, hsi_parts = [], []
    for i in range(count):
        share = num_pixels // count + (i < num_pixels % count)
        if share == 0:
            continue
        stem, rgb, read_window, close = _pixel_source(scenes, i)
        try:
            height, width = rgb.shape[:2]
            size = min(share, height * width)
            flat = np.sort(rng.choice(height * width, size=size, replace=False))
            ys, xs = np.divmod(flat, width)
            if size * 64 >= height * width:  # a dense sample: one read of the whole cube
                spectra = np.asarray(read_window(0, 0, height, width))[ys, xs]
            else:  # a sparse one (many scenes): read only the sampled spectra
                spectra = np.stack([np.asarray(read_window(y, x, 1, 1))[0, 0]
                                    for y, x in zip(ys, xs, strict=True)])  # fmt: skip
        finally:
            if close is not None:
                close()
        cubes.check_finite(spectra, f"{stem} (floor pixels)")
        rgb_parts.append(np.asarray(rgb, np.float32)[ys, xs])
        hsi_parts.append(spectra.astype(np.float32))
    return np.concatenate(rgb_parts), np.concatenate(hsi_parts)


def score(
    floors: Sequence[polynomial_fit.PolynomialFloor], scenes: Any, *, clamp_predictions: bool = True
) -> dict[int, list[dict[str, Any]]]:
    """Per-scene rows of each floor on `scenes`, keyed by order.

    scenes: as `scoring.evaluate_scenes` takes them; each scene is loaded once. Rows are
    `scoring.evaluate_scenes` rows (stem, has_ground_truth, the metrics, seconds).
    """
    count, stems, load = scoring.scene_loader(scenes)
    rows: dict[int, list[dict[str, Any]]] = {f.order: [] for f in floors}
    for i in range(count):
        rgb, hsi_true = load(i)
        for floor in floors:
            start = time.perf_counter()
            hsi_pred = floor.predict(rgb)
            row: dict[str, Any] = {"stem": stems[i], "has_ground_truth": hsi_true is not None}
            if hsi_true is not None:
                row.update(scoring.score_scene(hsi_pred, hsi_true, clamp_predictions))
            row["seconds"] = time.perf_counter() - start
            rows[floor.order].append(row)
    return rows


def evaluate_floor(
    train_scenes: Any,
    scenes: Any,
    *,
    orders: Sequence[int] = polynomial_fit.ORDERS,
    num_pixels: int = 32768,
    seed: int = 0,
    clamp_predictions: bool = True,
    objective: str = "lsq",
) -> dict[str, Any]:
    """Fits each order on `train_scenes` (least squares, or MRAE with `objective='mrae'`),
    scores it on `scenes`.

    Returns a JSON-ready summary: num_pixels, num_train_scenes, seed, objective, seconds (fit
    and score together), and `orders`: per order {order, name, num_coefficients, mean, std,
    num_scored} (mean/std of the metrics as `scoring.summarize` gives them).
    """
    start = time.perf_counter()
    orders = sorted({int(k) for k in orders})
    for order in orders:
        polynomial_fit.monomials(order)  # an unknown order fails before any pixel is read
    rgb, hsi = sample_pixels(train_scenes, num_pixels, seed)
    floors = [polynomial_fit.fit(rgb, hsi, order, objective) for order in orders]
    rows = score(floors, scenes, clamp_predictions=clamp_predictions)
    results = []
    for floor in floors:
        summary = scoring.summarize(rows[floor.order])
        results.append(
            {
                "order": floor.order,
                "name": floor.name,
                "num_coefficients": int(floor.weights.shape[0]),
                "mean": summary["mean"],
                "std": summary["std"],
                "num_scored": summary["num_scored"],
            }
        )
    return {
        "num_pixels": len(rgb),
        "num_train_scenes": len(train_scenes),
        "seed": seed,
        "objective": objective,
        "orders": results,
        "seconds": time.perf_counter() - start,
    }


def settings(config) -> dict[str, Any]:
    """`evaluate_floor`'s keyword arguments from `config.eval` (`floor_orders`,
    `floor_pixels`, `floor_seed`; defaults for configs written before they existed)."""
    evaluation = config.get("eval") or {}
    return {
        "orders": tuple(int(k) for k in evaluation.get("floor_orders", polynomial_fit.ORDERS)),
        "num_pixels": int(evaluation.get("floor_pixels", 32768)),
        "seed": int(evaluation.get("floor_seed", 0)),
    }


def open_train_split(config, data_root) -> tuple[Any, str | None]:
    """(the training split of `config.data.source` at `data_root`, None), or (None, why) when
    the dataset has no usable training split to fit the floor on."""
    from cswin_jax.data import pipeline  # noqa: PLC0415

    try:
        return pipeline.open_scenes(config, data_root, "train"), None
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)


def format_rows(
    summary: Mapping[str, Any], names: Sequence[str], label_width: int = 20
) -> list[str]:
    """One table line per order, `names` columns 15 wide (as `evaluate.format_table`)."""
    lines = []
    for result in summary["orders"]:
        mean = result["mean"]
        cells = "".join(f"{mean[n]:>15.5g}" if n in mean else f"{'':>15}" for n in names)
        lines.append(f"{'floor order ' + str(result['order']):<{label_width}}{cells}")
    return lines


def describe(summary: Mapping[str, Any]) -> str:
    """One line: what the floor rows of `summary` (from `evaluate_floor`) are."""
    orders = ", ".join(
        f"order {r['order']} = {polynomial_fit.ORDER_NAMES[r['order']]}" for r in summary["orders"]
    )
    how = "MRAE fit" if summary.get("objective") == "mrae" else "least squares"
    return (
        f"per-pixel floor: polynomial {how} RGB -> bands, fit on {summary['num_pixels']} "
        f"pixels of {summary['num_train_scenes']} training scenes (seed {summary['seed']}); "
        f"{orders}"
    )


def format_table(summary: Mapping[str, Any], names: Sequence[str] | None = None) -> str:
    """The floor on its own: `describe`, then a header and one row per order (default
    columns: MRAE, RMSE, PSNR, SAM, raw and clamped, as `evaluate.format_table`)."""
    if names is None:
        present = summary["orders"][0]["mean"] if summary["orders"] else {}
        names = [n for m in TABLE_METRICS for n in (m, f"{m}_clamped") if n in present]
    scored = summary["orders"][0]["num_scored"] if summary["orders"] else 0
    header = f"{f'{scored} scenes':<20}" + "".join(f"{n:>15}" for n in names)
    return "\n".join([describe(summary), header, "-" * len(header), *format_rows(summary, names)])


# ----------------------------------------------------------------------------- CLI


def load_config(spec: str):
    """`get_config(arg)` of a config file given as `path` or `path:arg` (as --config takes)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass e.g. --config "
                                "configs/quickstart.py")  # fmt: skip
    module_spec = importlib.util.spec_from_file_location(f"_floor_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(); a config file returns its "
                         "ConfigDict from get_config()")  # fmt: skip
    return module.get_config(arg or None)


_FLAGS = cli.program_flags()  # its own set: predict, evaluate, ... share names (cli.program_flags)
flags.DEFINE_string(
    "config",
    None,
    "A config file (configs/*.py[:arg]): its data and eval keys.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "workdir",
    None,
    "The run folder (a synthetic config's data is in its synthetic_data/).",
    flag_values=_FLAGS,
)
flags.DEFINE_string("data_dir", None, "Dataset root (MST++ / ARAD-1K layout).", flag_values=_FLAGS)
flags.DEFINE_enum(
    "data_source",
    None,
    ["arad", "tfds"],
    "Dataset reader with --data_dir (default arad).",
    flag_values=_FLAGS,
)
flags.DEFINE_enum(
    "split",
    "valid",
    ["train", "valid", "test"],
    "Split to score the floor on.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "orders",
    None,
    "Polynomial orders, e.g. 1,2,3 (default: the config's eval.floor_orders).",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "pixels", None, "Training pixels to fit on (default: eval.floor_pixels).", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "seed", None, "Seed of the pixel draw (default: eval.floor_seed).", flag_values=_FLAGS
)
flags.DEFINE_enum(
    "objective",
    "lsq",
    polynomial_fit.OBJECTIVES,
    "lsq: least squares (the floor); mrae: minimise MRAE.",
    flag_values=_FLAGS,
)
flags.DEFINE_bool(
    "clamp",
    True,
    "Also score the predictions clamped to [0, 1]; --noclamp leaves them out.",
    flag_values=_FLAGS,
)
flags.DEFINE_string("output", None, "Also write the summary to this JSON file.", flag_values=_FLAGS)


def _config_from_args(args):
    from cswin_jax.data import pipeline  # noqa: PLC0415

    if args.config:
        config = load_config(args.config)
    elif args.data_dir:
        from configs import base  # noqa: PLC0415

        config = base.get_config()
    else:
        raise ValueError("give --data_dir (a dataset in the MST++ layout) or --config "
                         "(a config file, e.g. configs/quickstart.py)")  # fmt: skip
    with config.unlocked():
        if args.data_dir:
            config.data.data_dir = args.data_dir
        if args.data_source or not args.config:
            config.data.source = args.data_source or "arad"
    if str(config.data.source) == "synthetic" and not args.workdir:
        raise ValueError(f"{args.config}: data.source='synthetic' reads <workdir>/"
                         f"{pipeline.SYNTHETIC_FOLDER}; pass --workdir (the run folder; the "
                         "scenes are generated there when absent)")  # fmt: skip
    return config


def run(args) -> dict[str, Any]:
    """Fits and scores the floor as the flags `args` (`_FLAGS`, or any object with their
    names as attributes) say; prints the table and returns the summary."""
    from cswin_jax.data import pipeline  # noqa: PLC0415

    config = _config_from_args(args)
    options = settings(config)
    if args.orders:
        try:
            options["orders"] = tuple(int(k) for k in args.orders.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"--orders must look like 1,2,3, got {args.orders!r}") from None
    if args.pixels is not None:
        options["num_pixels"] = args.pixels
    if args.seed is not None:
        options["seed"] = args.seed
    data_root = pipeline.resolve_data_root(config, args.workdir or config.data.data_dir)
    train_scenes, missing = open_train_split(config, data_root)
    if train_scenes is None:
        raise ValueError(f"{data_root}: no training split to fit the floor on ({missing})")
    scenes = pipeline.load_split(config, data_root, args.split)
    if not any(scene.hsi is not None for scene in scenes):
        raise ValueError(f"{data_root}: the {args.split} split has no ground-truth cubes to "
                         "score the floor on; pass --split valid")  # fmt: skip
    summary = evaluate_floor(
        train_scenes, scenes, clamp_predictions=args.clamp, objective=args.objective, **options
    )
    summary["settings"] = {"data_root": str(data_root), "split": args.split}
    print(format_table(summary))
    print(f"fit and scored in {summary['seconds']:.1f} s")
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.output}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: `argv` are the arguments (None: sys.argv[1:]); returns the summary.
    A mistake in the data or flags exits with one line (`cli.fail`)."""
    cli.parse_flags(_FLAGS, argv, __doc__)
    logging.set_verbosity(logging.INFO)
    try:
        return run(_FLAGS)
    except (FileNotFoundError, ValueError) as err:  # the user's data or flags: one line
        if _FLAGS.debug:
            raise
        cli.fail(cli.one_line(err))


if __name__ == "__main__":
    cli.run(main, flag_values=_FLAGS)
