"""Export a generator checkpoint as one self-contained model file, to serve without this package.

  python -m cswin_jax.export --checkpoint DIR --format onnx|stablehlo --out FILE
      (--height H --width W [--batch_size N] | --dynamic) [--platforms cpu,cuda] [--noverify]

The exported function is what `python -m cswin_jax.predict` computes for a whole frame (no
tiles, no self-ensemble, before its clamp to [0, 1]): rgb [N, H, W, 3] float32 in [0, 1] (MST++
min-max normalised, as `predict.read_rgb` reads photos) -> hsi [N, H, W, 31] float32, with the
weights inlined.

* ONNX (`--format=onnx`, converted by jax2onnx): for ONNX Runtime on CPU or GPU machines
  without JAX. Fixed input shape; input `rgb`, output `hsi`.
* StableHLO (`--format=stablehlo`, `jax.export` serialized, lowered for `--platforms`): for
  XLA-based serving: `jax.export.deserialize(bytearray(data)).call(rgb)`, or hand its
  `mlir_module()` to IREE / TF Serving. `--dynamic` leaves the batch, height and width
  symbolic: any N, H and W any multiple of the model's size unit (`size_unit`: 8 for MST++,
  lcm(4, s1, 2 s2, 4 s3) for CSWin with split sizes (s1, s2, s3), 28 for (7, 7, 7)).

After writing, the file runs in its runtime on a random input and is compared with the Flax
model (`--noverify` skips this). Needs the export extra: `pip install -e '.[export]'`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cswin_jax import cli, inference, models
from cswin_jax.models import generator, mst_plus_plus

FORMATS = ("onnx", "stablehlo")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
Shape = tuple[Any, ...]  # ints, or jax.export symbolic dimensions


def size_unit(model_cfg: Mapping) -> int:
    """Heights and widths of a `--dynamic` export are multiples of this.

    At those sizes the model's internal padding (MST++ to a multiple of 8, CSWin attention to
    a multiple of its split size) is empty and its halving and doubling resizes are exact:
    symbolic sizes can express neither a padding that depends on the size nor a resize ratio.
    """
    model = models.build_generator(model_cfg)
    if isinstance(model, mst_plus_plus.MSTPlusPlus):
        return max(mst_plus_plus.PAD_MULTIPLE, 2**model.sst_stage)
    s1, s2, s3 = generator._three_split_sizes(model.split_sizes)
    return math.lcm(4, s1, 2 * s2, 4 * s3)


def dynamic_shape(unit: int) -> Shape:
    """[n, unit * h, unit * w, 3] with symbolic n, h, w >= 1."""
    return jax.export.symbolic_shape(f"n, {unit}*h, {unit}*w, 3")


MEAN_BLOCK = 256


def split_long_means(model, block: int = MEAN_BLOCK) -> None:
    """Rewrites, in place, each ReduceMean of an ONNX model over an axis longer than `block`:
    that axis is zero-padded and split into blocks of `block`, and each ReduceSum sums along one
    axis of at most `block` values (or blocks), before one division.

    The same mean, summed in another order. ONNX Runtime's float32 ReduceMean loses precision
    over long axes (a GroupNorm mean over a 240x256 map comes out 1e-5 off, XLA's 1e-7), which
    the normalisation amplifies to 4e-4 of the CSWin output; short sums keep XLA's precision.
    """
    import onnx  # noqa: PLC0415 - optional dependency
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]  # 0: unknown
        for v in [*inferred.input, *inferred.value_info]
    }
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "ReduceMean" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        size = shapes.get(node.input[0], [0])
        axes = {int(a) % len(size) for a in consts[node.input[1]].ravel()}
        if 0 in size or all(size[a] <= block for a in axes):
            continue
        nodes.pop()
        pads, blocked, summed = [0] * (2 * len(size)), [], []
        for a, n in enumerate(size):
            if a in axes and n > block:
                pads[len(size) + a] = -n % block
                summed.append(len(blocked))
                blocked.append(-(-n // block))
            if a in axes:
                summed.append(len(blocked))
            blocked.append(min(n, block) if a in axes else n)
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        final = [1 if a in axes else n for a, n in enumerate(size) if keepdims or a not in axes]
        count = math.prod(size[a] for a in axes)
        name = f"{node.output[0]}_blocked"
        # Pad, reshape to blocks, sum one (sub)axis at a time, innermost first, divide.
        steps = [("Pad", pads), ("Reshape", blocked)]
        steps += [("ReduceSum", [axis]) for axis in reversed(summed)]
        steps += [("Div", np.float32(count)), ("Reshape", final)]
        value = node.input[0]
        for index, (op, arg) in enumerate(steps):
            arg = np.asarray(arg, np.float32 if op == "Div" else np.int64)
            graph.initializer.append(numpy_helper.from_array(arg, f"{name}_{index}_arg"))
            result = node.output[0] if index == len(steps) - 1 else f"{name}_{index}"
            nodes.append(helper.make_node(op, [value, f"{name}_{index}_arg"], [result]))
            value = result
    del graph.node[:]
    graph.node.extend(nodes)

    def inputs(g):  # of every node, in loop bodies too
        for n in g.node:
            yield from n.input
            yield from (i for a in n.attribute if a.HasField("g") for i in inputs(a.g))

    used = set(inputs(graph))
    kept = [t for t in graph.initializer if t.name in used]  # drops the replaced axes
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _import_jax2onnx():
    # jax2onnx 0.12 logs a traceback for each dm_pix plugin it cannot import under jax 0.10
    # (no model here uses them), and onnx_ir a warning for each shape annotation it drops.
    for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import jax2onnx  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise cli.UserError(
            "ONNX export needs jax2onnx, onnx and onnxruntime: pip install -e '.[export]'"
        ) from e
    return jax2onnx


def export_model(
    apply_fn: Callable[[jax.Array], jax.Array],
    fmt: str,
    out: str | pathlib.Path,
    shape: Shape,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> pathlib.Path:
    """Writes `apply_fn` ([N, H, W, 3] -> [N, H, W, C] float32) as an ONNX or StableHLO file.

    Args:
      apply_fn: e.g. the `inference.load_generator` model; its weights are inlined.
      fmt: 'onnx' or 'stablehlo'.
      out: the file to write.
      shape: the input shape; symbolic dimensions (`dynamic_shape`) only for 'stablehlo'.
      platforms: the platforms a StableHLO file is lowered for.
    """
    if fmt not in FORMATS:
        raise cli.UserError(f"--format={fmt}: use one of {', '.join(FORMATS)}")
    out = pathlib.Path(out)
    if not out.parent.is_dir():
        raise cli.UserError(f"--out={out}: folder {out.parent} does not exist; create it first")
    symbolic = not all(isinstance(d, int) for d in shape)
    rgb = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    if fmt == "onnx":
        if symbolic:  # jax2onnx takes plain symbolic sizes only, not multiples
            raise ValueError(f"ONNX exports take a fixed shape, got {shape}")
        jax2onnx = _import_jax2onnx()
        # jax2onnx 0.12's convolution lowering prints a debug line to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            model = jax2onnx.to_onnx(
                lambda x: apply_fn(x),
                [rgb],
                model_name="cswin_jax_generator",
                input_names=["rgb"],
                output_names=["hsi"],
            )
        # Its shape annotations of intermediate values say batch N where a broadcast keeps 1
        # (ONNX Runtime warns of each); they are optional, the runtime infers shapes itself.
        del model.graph.value_info[:]
        split_long_means(model)
        out.write_bytes(model.SerializeToString())
    else:
        exported = jax.export.export(jax.jit(apply_fn), platforms=tuple(platforms))(rgb)
        out.write_bytes(exported.serialize())
    return out


def run_exported(path: str | pathlib.Path, fmt: str, rgb: np.ndarray) -> np.ndarray:
    """Runs an exported file in its own runtime (ONNX Runtime on CPU / `jax.export`)."""
    if fmt == "onnx":
        import onnxruntime  # noqa: PLC0415 - optional dependency

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["hsi"], {"rgb": np.asarray(rgb, np.float32)})[0]
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return np.asarray(exported.call(jnp.asarray(rgb, jnp.float32)))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (shapes must match)."""
    if actual.shape != expected.shape:
        raise ValueError(f"exported output {actual.shape} != Flax output {expected.shape}")
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(actual - expected))) / scale


def _check_dynamic(model_cfg: Mapping, unit: int, height: int, width: int) -> None:
    if model_cfg.get("attention_mode") == "cswin":
        raise cli.UserError(
            "--dynamic: attention_mode='cswin' builds its stripe mask with numpy, which needs "
            "concrete sizes; export at a fixed --height/--width"
        )
    for name, size in (("height", height), ("width", width)):
        if size % unit:
            raise cli.UserError(
                f"--{name}={size}: a --dynamic export of this model takes multiples of {unit} "
                f"(its size unit); pass e.g. --{name}={-(-size // unit) * unit}"
            )


def _define_flags() -> dict[str, Any]:
    """The CLI's flags, defined only when run as a program (as in `cswin_jax.convert`)."""
    from absl import flags  # noqa: PLC0415

    return {
        "checkpoint": flags.DEFINE_string(
            "checkpoint",
            None,
            "Checkpoint folder: a training workdir or a `cswin_jax.convert` output.",
            required=True,
        ),
        "format": flags.DEFINE_enum(
            "format",
            None,
            FORMATS,
            "onnx: ONNX Runtime without JAX; stablehlo: jax.export for XLA-based serving.",
            required=True,
        ),
        "out": flags.DEFINE_string("out", None, "The model file to write.", required=True),
        "height": flags.DEFINE_integer(
            "height",
            None,
            "Input height of the exported model (any size); with --dynamic only the parity "
            "check's, a multiple of the size unit (default 2 units).",
            lower_bound=1,
        ),
        "width": flags.DEFINE_integer("width", None, "Input width, as --height.", lower_bound=1),
        "batch_size": flags.DEFINE_integer(
            "batch_size", 1, "Images per call (with --dynamic: of the parity check).", lower_bound=1
        ),
        "dynamic": flags.DEFINE_bool(
            "dynamic",
            False,
            "StableHLO only: symbolic batch, height and width; heights and widths must be "
            "multiples of the model's size unit (MST++: 8; CSWin: lcm(4, s1, 2 s2, 4 s3) of its "
            "split sizes, 28 for the default (7, 7, 7); the error names it).",
        ),
        "platforms": flags.DEFINE_list(
            "platforms",
            ["cpu", "cuda"],
            f"StableHLO only: platforms to lower for, from {', '.join(PLATFORMS)}.",
        ),
        "verify": flags.DEFINE_bool(
            "verify", True, "Run the file on random RGB and print its error against Flax."
        ),
        "raw_weights": flags.DEFINE_bool(
            "raw_weights", False, "Export a training state's raw generator weights, not the EMA."
        ),
        "step": flags.DEFINE_integer(
            "step", None, "Training step the output head sees (only for delayed_sigmoid)."
        ),
    }


def main(argv: list[str], flag_values: Mapping[str, Any]) -> None:
    """`python -m cswin_jax.export --checkpoint DIR --format onnx|stablehlo --out FILE ...`."""
    from absl import app  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    value = {name: holder.value for name, holder in flag_values.items()}
    fmt, dynamic = value["format"], value["dynamic"]
    if dynamic and fmt == "onnx":
        raise cli.UserError(
            "--dynamic is for --format=stablehlo (jax2onnx cannot express the size multiples "
            "the models need); export ONNX at a fixed --height/--width"
        )
    if not dynamic and (value["height"] is None or value["width"] is None):
        raise cli.UserError("pass --height and --width (the exported input size), or --dynamic")
    unknown = sorted(set(value["platforms"]) - set(PLATFORMS))
    if unknown:
        raise cli.UserError(f"--platforms: unknown {unknown}; use some of {', '.join(PLATFORMS)}")
    apply_fn, config = inference.load_generator(
        value["checkpoint"], use_ema=not value["raw_weights"], step=value["step"]
    )
    unit = size_unit(config["model"])
    height, width = value["height"] or 2 * unit, value["width"] or 2 * unit
    batch = value["batch_size"]
    if dynamic:
        _check_dynamic(config["model"], unit, height, width)
        shape = dynamic_shape(unit)
    else:
        shape = (batch, height, width, 3)
    out = export_model(apply_fn, fmt, value["out"], shape, value["platforms"])
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB)")
    if value["verify"]:
        rgb = np.random.default_rng(0).uniform(0, 1, (batch, height, width, 3)).astype(np.float32)
        error = relative_error(run_exported(out, fmt, rgb), inference.predict_whole(apply_fn, rgb))
        print(
            f"parity: max |{fmt} - flax| / max |flax| = {error:.1e} "
            f"({batch}x{height}x{width} random RGB)"
        )


if __name__ == "__main__":
    import functools

    cli.run(functools.partial(main, flag_values=_define_flags()))
