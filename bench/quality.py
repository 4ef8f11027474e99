"""Time to quality: each recipe trained for the same minutes on the synthetic default, one table.

  python bench/quality.py --minutes 10 [--recipes quickstart,quickstart:generator,...]
      [--out /tmp/cswin_quality] [--config.<key>=... applied to every recipe]

1. Generates the quick start's synthetic scenes once (`OUT/synthetic_data`; reused when
   complete) and fits the per-pixel floor on their training split, by least squares and
   fitted to MRAE (`cswin_jax.floor`, both objectives).
2. Per recipe (a `configs/<name>.py[:arg]` spec): compiles its training step and times a few
   steps, sets the schedule's length to the steps that fit in `--minutes`, trains that many
   steps from scratch with the training loop (`OUT/<recipe>`), whose closing validation
   scores the EMA weights on the validation scenes (full frames, the centre-crop protocol).
3. Prints the floor's rows, then per recipe: steps done, seconds per step, the run's wall
   time (compile, training and the closing validation), MRAE / RMSE / PSNR / SAM.

The default recipes: `quickstart` (the Sinkhorn-GAN quick start), `quickstart:generator` (the
same generator and data, generator-only) and `mst_plus_plus:quickstart` (MST++ at its full
size, with its reference loss and optimizer, on the quick start's data and batch).
"""

from __future__ import annotations

import collections
import importlib
import json
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import app, flags, logging

from cswin_jax import cli

_MINUTES = flags.DEFINE_float("minutes", 10.0, "training minutes per recipe (steps x step time)")
_RECIPES = flags.DEFINE_list(
    "recipes",
    ["quickstart", "quickstart:generator", "mst_plus_plus:quickstart"],
    "config specs (configs/<name>.py[:arg])",
)
_OUT = flags.DEFINE_string("out", "/tmp/cswin_quality", "folder for the data and the runs")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 5, "steps timed to size each run")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 2, "fewest steps a run is given")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "KEY=VALUE override applied to every recipe (e.g. --set=data.patch_size=16)"
)
_KEEP_RUNS = flags.DEFINE_bool("keep_runs", True, "keep each recipe's workdir")

TABLE_METRICS = ("mrae", "rmse", "psnr", "sam")


def load_recipe(spec: str):
    """`quickstart:generator` -> configs.quickstart.get_config('generator')."""
    name, _, arg = spec.partition(":")
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg or None)


def apply_overrides(config, overrides):
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set {item!r}: expected KEY=VALUE")
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        current = node[last]
        if isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float, str)):
            value = type(current)(text)
        else:
            value = json.loads(text)
        node[last] = value
    return config


def prepare_data(config, out: pathlib.Path) -> pathlib.Path:
    """The synthetic scenes `config.data.synthetic` describes, generated once into `out`."""
    from cswin_jax.data import synthetic  # noqa: PLC0415

    settings = dict(config.data.synthetic)
    root = out / "synthetic_data"
    if not synthetic.is_complete(root, **settings):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.write_dataset(
            root,
            num_train=settings["num_train"],
            num_valid=settings["num_valid"],
            height=settings["height"],
            width=settings["width"],
            seed=settings["seed"],
        )
    return root


def on_files(config, data_root: pathlib.Path):
    """`config` reading the generated scenes from `data_root` as an ARAD-layout dataset."""
    config.data.source = "arad"
    config.data.data_dir = str(data_root)
    config.eval.floor = False  # the bench scores the floor once for every recipe
    return config


def step_seconds(config, num_steps: int) -> tuple[float, float]:
    """(compile seconds, seconds per training step) of `config`'s steps: each kind of step
    (`schedule.step_kind`: with or without R1) timed, weighted by how often the schedule runs it."""
    from cswin_jax import programs, schedule, sharding  # noqa: PLC0415

    mesh = sharding.make_mesh()
    start = time.perf_counter()
    compiled = programs.compiled_programs(config, mesh)
    compile_s = time.perf_counter() - start
    state = compiled.init_fn(jax.random.key(config.seed))
    p = config.data.patch_size
    shape = (config.gradient_accumulation_steps, config.batch_size, p, p)
    rng = np.random.default_rng(0)
    batch = {
        "rgb": rng.uniform(0, 1, (*shape, config.model.in_channels)).astype(np.float32),
        "hsi": rng.uniform(0.01, 1, (*shape, config.model.out_channels)).astype(np.float32),
    }
    batch = jax.device_put(batch, compiled.batch_sharding)
    period = max(1, config.n_critic) * max(1, config.loss.r1_interval)
    share = collections.Counter(schedule.step_kind(config, s) for s in range(period))
    seconds = 0.0
    for kind, step_fn in compiled.step_fns.items():
        times = []
        for _ in range(num_steps + 1):  # the first run pays one-time costs
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        seconds += share[kind] / period * float(np.median(times[1:]))
    programs.clear_compiled_programs()
    return compile_s, seconds


def final_validation(workdir: pathlib.Path, step: int) -> dict:
    """The loop's validation metrics (EMA weights, full frames) at `step`, from TensorBoard."""
    from cswin_jax import tensorboard_events  # noqa: PLC0415

    scalars = tensorboard_events.read_scalars(workdir)
    return {
        tag.removeprefix("val/"): dict(points)[step]
        for tag, points in scalars.items()
        if tag.startswith("val/") and step in dict(points)
    }


def run_recipe(spec: str, data_root: pathlib.Path, out: pathlib.Path) -> dict:
    from cswin_jax import loop, programs  # noqa: PLC0415

    config = on_files(apply_overrides(load_recipe(spec), _OVERRIDES.value), data_root)
    compile_s, seconds = step_seconds(config, _TIMED_STEPS.value)
    steps = max(_MIN_STEPS.value, int(_MINUTES.value * 60 / seconds))
    print(
        f"{spec}: step compiled in {compile_s:.0f} s, {seconds:.3f} s/step -> {steps} steps "
        f"in {_MINUTES.value:g} min",
        flush=True,
    )
    config.epochs = 1
    config.iterations_per_epoch = steps  # one validation, at the end
    config.optim.total_steps = steps
    config.checkpoint_every = steps
    workdir = out / spec.replace(":", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    loop.train_and_evaluate(config, str(workdir))
    run_s = time.perf_counter() - start
    programs.clear_compiled_programs()
    means = final_validation(workdir, steps)
    if not _KEEP_RUNS.value:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"recipe": spec, "steps": steps, "step_s": seconds, "run_s": run_s, **means}


def format_table(floors: list[dict], results: list[dict], minutes: float) -> str:
    """floors: `floor.evaluate_floor` summaries (least squares, MRAE fit); results: per recipe."""
    width = 44
    header = f"{'':<{width}}{'steps':>7}{'s/step':>8}{'run s':>8}" + "".join(
        f"{m.upper():>9}" for m in TABLE_METRICS
    )
    lines = [f"time to quality: {minutes:g} min of training per recipe", header, "-" * len(header)]
    for summary in floors:
        how = "MRAE fit" if summary.get("objective") == "mrae" else "least squares"
        for row in summary["orders"]:
            label = f"floor, {how}, order {row['order']}"
            lines.append(
                f"{label:<{width}}{'':>7}{'':>8}{'':>8}"
                + "".join(f"{row['mean'][m]:>9.4g}" for m in TABLE_METRICS)
            )
    for r in results:
        lines.append(
            f"{r['recipe']:<{width}}{r['steps']:>7d}{r['step_s']:>8.3f}{r['run_s']:>8.0f}"
            + "".join(f"{r[m]:>9.4g}" for m in TABLE_METRICS)
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cswin_jax import floor, polynomial_fit  # noqa: PLC0415
    from cswin_jax.data import arad  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    reference = apply_overrides(load_recipe(_RECIPES.value[0]), _OVERRIDES.value)
    data_root = prepare_data(reference, out)
    train_scenes = arad.FileScenes(arad.list_scenes(data_root, "train", excluded_scenes=[]))
    valid_scenes = arad.FileScenes(arad.list_scenes(data_root, "valid", excluded_scenes=[]))
    floors = [
        floor.evaluate_floor(
            train_scenes,
            valid_scenes,
            clamp_predictions=False,
            objective=objective,
            **floor.settings(reference),
        )
        for objective in polynomial_fit.OBJECTIVES
    ]
    print(
        f"data: {len(train_scenes)} training and {len(valid_scenes)} validation scenes in "
        f"{data_root}; devices: {jax.devices()}",
        flush=True,
    )
    results = []
    for spec in _RECIPES.value:
        results.append(run_recipe(spec, data_root, out))
        print(json.dumps(results[-1]), flush=True)
    table = format_table(floors, results, _MINUTES.value)
    summary = {"minutes": _MINUTES.value, "floors": floors, "results": results}
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    print(table, flush=True)


if __name__ == "__main__":
    cli.run(main)
