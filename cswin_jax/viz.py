r"""Figures for spectral reconstructions: sRGB renderings, error maps, spectra, histograms.

Every function writes one PNG through matplotlib's object API (`Figure` + Agg canvas), so
nothing here touches pyplot's global state or needs a display.

Colour: cubes are rendered through `cswin_jax.srgb` (CIE 1931, D65); the error maps come
from `cswin_jax.error_maps`.

Training curves: `plot_validation_curve` reads a workdir's TensorBoard event files
(`cswin_jax.tensorboard_events.read_scalars`) and plots validation MRAE (or another `val/`
metric) against step, with the per-pixel regression floor of each polynomial order
(`cswin_jax.floor`, logged at step 0) as horizontal reference lines.

Usage:
  python -m cswin_jax.viz --pred cube.mat [--gt ARAD_1K_0901.mat] [--rgb photo.jpg] \
      [--metrics_csv eval/metrics.csv] --output figures/ [--pixels 120,200;300,50]
  python -m cswin_jax.viz --curve /tmp/cswin_quickstart --output figures/  # validation_mrae.png
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from absl import flags
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cswin_jax import cli, cubes, error_maps, polynomial_fit, srgb, tensorboard_events
from cswin_jax import io as hsi_io

# ----------------------------------------------------------------------------- helpers


def _robust_max(values: np.ndarray, percentile: float = 99.0) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    level = float(np.percentile(finite, percentile))
    return level if level > 0 else float(finite.max()) or 1.0


def _crop_rectangle(crop: tuple[int, int, int, int] | None, **style) -> Rectangle | None:
    if crop is None:
        return None
    y0, x0, y1, x1 = crop
    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, **style)


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _show_image(ax, image, title):
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


# ----------------------------------------------------------------------------- figures


def plot_comparison(
    path: str | pathlib.Path,
    hsi_pred: np.ndarray,
    hsi_true: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    title: str = "",
) -> pathlib.Path:
    """Input RGB | ground truth | prediction, both cubes rendered to sRGB at the truth's
    exposure (the prediction's own when there is no truth)."""
    exposure = srgb.auto_exposure(hsi_true if hsi_true is not None else hsi_pred)
    panels = []
    if rgb is not None:
        panels.append(("input RGB", np.clip(rgb, 0, 1)))
    if hsi_true is not None:
        panels.append(("ground truth (sRGB, D65)", srgb.hsi_to_srgb(hsi_true, exposure)))
    panels.append(("prediction (sRGB, D65)", srgb.hsi_to_srgb(hsi_pred, exposure)))
    aspect = hsi_pred.shape[0] / hsi_pred.shape[1]
    fig = Figure(layout="constrained", figsize=(4.2 * len(panels), 4.2 * aspect + 0.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, image) in zip(axes, panels, strict=True):
        _show_image(ax, image, name)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, pathlib.Path(path))


def plot_error_maps(
    path: str | pathlib.Path,
    hsi_pred: np.ndarray,
    hsi_true: np.ndarray,
    crop: tuple[int, int, int, int] | None = None,
    title: str = "",
) -> pathlib.Path:
    """Per-pixel MRAE and SAM (degrees) maps with colour bars; the colour scale stops at the
    99th percentile so a few near-zero-truth pixels do not wash the map out. `crop`
    (y0, x0, y1, x1) outlines the scored window."""
    maps = [
        ("MRAE per pixel", error_maps.mrae_map(hsi_pred, hsi_true), "magma"),
        ("SAM per pixel (degrees)", error_maps.sam_map(hsi_pred, hsi_true), "viridis"),
    ]
    aspect = hsi_pred.shape[0] / hsi_pred.shape[1]
    fig = Figure(layout="constrained", figsize=(10, 4.2 * aspect + 0.8))
    axes = fig.subplots(1, 2)
    for ax, (name, values, cmap) in zip(axes, maps, strict=True):
        vmax = _robust_max(values)
        image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        inside = values if crop is None else values[crop[0] : crop[2], crop[1] : crop[3]]
        ax.set_title(f"{name}\nmean {np.nanmean(inside):.4g} (scored window)", fontsize=10)
        ax.set_axis_off()
        rect = _crop_rectangle(crop, edgecolor="white", linestyle="--", linewidth=1.0)
        if rect is not None:
            ax.add_patch(rect)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, extend="max")
        bar.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, pathlib.Path(path))


def plot_spectra(
    path: str | pathlib.Path,
    hsi_pred: np.ndarray,
    hsi_true: np.ndarray | None = None,
    pixels: Sequence[tuple[int, int]] | None = None,
    crop: tuple[int, int, int, int] | None = None,
    title: str = "",
) -> pathlib.Path:
    """Spectra at `pixels` (default: the worst-MRAE pixels and the median one; without truth,
    the image centre and quartiles), truth solid, prediction dashed, with the locations
    marked on an sRGB rendering."""
    height, width = hsi_pred.shape[:2]
    median_last = pixels is None and hsi_true is not None
    if pixels is None:
        if hsi_true is not None:
            pixels = error_maps.worst_pixels(hsi_pred, hsi_true, crop=crop)
        else:
            pixels = [(height // 2, width // 2), (height // 4, width // 4)]
            pixels.append((3 * height // 4, 3 * width // 4))
    for y, x in pixels:
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"pixel ({y}, {x}) is outside the {height}x{width} image")
    reference = hsi_true if hsi_true is not None else hsi_pred
    fig = Figure(layout="constrained", figsize=(11, 4.2))
    ax_img, ax_spec = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    _show_image(ax_img, srgb.hsi_to_srgb(reference), "locations")
    colours = [f"C{i}" for i in range(len(pixels))]
    errors = error_maps.mrae_map(hsi_pred, hsi_true) if hsi_true is not None else None
    for i, (colour_name, (y, x)) in enumerate(zip(colours, pixels, strict=True)):
        ax_img.plot(x, y, "o", color=colour_name, markersize=7, mfc="none", mew=2)
        label = f"({y}, {x})"
        if median_last:
            label += " median" if i == len(pixels) - 1 else " worst"
        if errors is not None:
            label += f" MRAE {errors[y, x]:.3f}"
            ax_spec.plot(hsi_io.WAVELENGTHS_NM, hsi_true[y, x], "-", color=colour_name, label=label)
            label = None
        ax_spec.plot(hsi_io.WAVELENGTHS_NM, hsi_pred[y, x], "--", color=colour_name, label=label)
    ax_spec.set_xlabel("wavelength (nm)")
    ax_spec.set_ylabel("reflectance")
    ax_spec.set_xlim(400, 700)
    ax_spec.grid(alpha=0.3)
    heading = "truth (solid) vs prediction (dashed)" if hsi_true is not None else "prediction"
    ax_spec.set_title(heading, fontsize=10)
    ax_spec.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, pathlib.Path(path))


def plot_band_errors(
    path: str | pathlib.Path, hsi_pred: np.ndarray, hsi_true: np.ndarray, title: str = ""
) -> pathlib.Path:
    """Per-band MRAE and RMSE (and mean signed error) against wavelength."""
    errors = error_maps.band_errors(hsi_pred, hsi_true)
    fig = Figure(layout="constrained", figsize=(10, 3.8))
    ax_mrae, ax_rmse = fig.subplots(1, 2)
    ax_mrae.bar(hsi_io.WAVELENGTHS_NM, errors["mrae"], width=8, color="C3")
    ax_mrae.set_title("MRAE per band", fontsize=10)
    ax_rmse.bar(hsi_io.WAVELENGTHS_NM, errors["rmse"], width=8, color="C0", label="RMSE")
    ax_rmse.plot(hsi_io.WAVELENGTHS_NM, errors["bias"], "k.-", label="mean signed error")
    ax_rmse.axhline(0.0, color="grey", linewidth=0.6)
    ax_rmse.set_title("RMSE and bias per band", fontsize=10)
    ax_rmse.legend(fontsize=8)
    for ax in (ax_mrae, ax_rmse):
        ax.set_xlabel("wavelength (nm)")
        ax.set_xlim(395, 705)
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, pathlib.Path(path))


_METRIC_LABELS = {
    "mrae": "MRAE",
    "rmse": "RMSE",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "sam": "SAM (degrees)",
    "mae": "MAE",
}


def plot_metric_histograms(
    path: str | pathlib.Path, per_scene: Mapping[str, Sequence[float]], title: str = ""
) -> pathlib.Path:
    """One histogram per metric over scenes, mean marked. per_scene: metric -> values."""
    names = [k for k in per_scene if len(per_scene[k]) > 0]
    if not names:
        raise ValueError("no per-scene metric values to plot")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(layout="constrained", figsize=(4 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        values = np.asarray(per_scene[name], np.float64)
        values = values[np.isfinite(values)]
        ax.hist(values, bins=min(20, max(5, len(values))), color="C0", alpha=0.8)
        if values.size:
            ax.axvline(values.mean(), color="C3", linestyle="--", label=f"mean {values.mean():.4g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(_METRIC_LABELS.get(name, name))
        ax.set_ylabel("scenes")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(title or f"per-scene metrics ({len(per_scene[names[0]])} scenes)", fontsize=11)
    return _save(fig, pathlib.Path(path))


def write_scene_figures(
    out_dir: str | pathlib.Path,
    stem: str,
    hsi_pred: np.ndarray,
    hsi_true: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    crop: tuple[int, int, int, int] | None = None,
    pixels: Sequence[tuple[int, int]] | None = None,
) -> list[pathlib.Path]:
    """Every per-scene figure: `<stem>_comparison.png`, `<stem>_spectra.png` and, with
    ground truth, `<stem>_error_maps.png` and `<stem>_band_errors.png`."""
    out_dir = pathlib.Path(out_dir)
    hsi_pred = np.asarray(hsi_pred, np.float32)
    written = [plot_comparison(out_dir / f"{stem}_comparison.png", hsi_pred, hsi_true, rgb, stem)]
    if hsi_true is not None:
        hsi_true = np.asarray(hsi_true, np.float32)
        if hsi_true.shape != hsi_pred.shape:
            raise ValueError(
                f"{stem}: prediction {hsi_pred.shape} and truth {hsi_true.shape} differ in shape"
            )
        written.append(
            plot_error_maps(out_dir / f"{stem}_error_maps.png", hsi_pred, hsi_true, crop, stem)
        )
        written.append(plot_band_errors(out_dir / f"{stem}_band_errors.png", hsi_pred, hsi_true))
    written.append(
        plot_spectra(out_dir / f"{stem}_spectra.png", hsi_pred, hsi_true, pixels, crop, stem)
    )
    return written


def read_metrics_csv(path: str | pathlib.Path) -> dict[str, list[float]]:
    """Per-scene metrics from `evaluate`'s metrics.csv: metric -> values of scored scenes."""
    values: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for name in _METRIC_LABELS:
                text = row.get(name, "")
                if text not in ("", None):
                    values.setdefault(name, []).append(float(text))
    return values


# ----------------------------------------------------------------------------- training curves


def plot_validation_curve(
    path: str | pathlib.Path, log_dir: str | pathlib.Path, metric: str = "mrae", title: str = ""
) -> pathlib.Path:
    """Validation `metric` (the loop's `val/<metric>`, EMA weights) against step, with the
    per-pixel floor of each polynomial order (`floor/order<k>/<metric>`, logged when the run
    started) as horizontal reference lines."""
    scalars = tensorboard_events.read_scalars(log_dir)
    curve = scalars.get(f"val/{metric}")
    if not curve:
        found = sorted({tag.split("/")[-1] for tag in scalars if tag.startswith("val/")})
        raise ValueError(
            f"{log_dir}: no val/{metric} scalars (validation metrics found: {found or 'none'}); "
            "pass --curve_metric one of those, or a workdir whose run has validated"
        )
    floors = sorted(
        (int(tag.split("/")[1].removeprefix("order")), points[-1][1])
        for tag, points in scalars.items()
        if tag.startswith("floor/order") and tag.endswith(f"/{metric}") and points
    )
    label = _METRIC_LABELS.get(metric, metric)
    steps, values = zip(*curve, strict=True)
    fig = Figure(layout="constrained", figsize=(7, 4.2))
    ax = fig.subplots()
    ax.plot(steps, values, "o-", color="C0", label=f"validation {label} (EMA weights)")
    styles = ("--", "-.", ":")
    for i, (order, level) in enumerate(floors):
        name = polynomial_fit.ORDER_NAMES.get(order, f"order {order}")
        ax.axhline(level, color=f"C{i + 1}", linestyle=styles[i % len(styles)],
                   label=f"per-pixel floor, {name}: {level:.4g}")  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"validation {label} vs step, per-pixel floor for reference", fontsize=10)
    return _save(fig, pathlib.Path(path))


# ----------------------------------------------------------------------------- CLI


class _PixelsParser(flags.ArgumentParser):
    """`--pixels 'y,x;y,x'` -> [(y, x), ...]."""

    def parse(self, argument):
        if not isinstance(argument, str):  # the default (None) or a parsed list
            return argument
        try:
            pixels = [
                tuple(int(v) for v in item.split(",")) for item in argument.split(";") if item
            ]
        except ValueError:
            pixels = []
        if not pixels or any(len(p) != 2 for p in pixels):
            raise ValueError(f"--pixels must look like '120,200;300,50', got {argument!r}")
        return pixels

    def flag_type(self):
        return "pixel list"


_FLAGS = cli.program_flags()  # its own set: predict, evaluate, ... share names (cli.program_flags)
_PRED = flags.DEFINE_string(
    "pred", None, "Predicted cube (.mat v7.3 / .h5 / .npy).", flag_values=_FLAGS
)
_GT = flags.DEFINE_string(
    "gt", None, "Ground-truth cube (ARAD .mat, .h5 or .npy).", flag_values=_FLAGS
)
_RGB = flags.DEFINE_string(
    "rgb", None, "Input RGB image, shown beside the cubes.", flag_values=_FLAGS
)
_METRICS_CSV = flags.DEFINE_string(
    "metrics_csv", None, "evaluate's metrics.csv: per-scene histograms.", flag_values=_FLAGS
)
_CURVE = flags.DEFINE_string(
    "curve",
    None,
    "A training workdir: its validation curve with the floor lines.",
    flag_values=_FLAGS,
)
_CURVE_METRIC = flags.DEFINE_string(
    "curve_metric", "mrae", "The curve's val/ metric.", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string("output", "figures", "Folder for the PNG files.", flag_values=_FLAGS)
_PIXELS = flags.DEFINE(
    _PixelsParser(),
    "pixels",
    None,
    "Spectra at 'y,x;y,x' (default: the worst pixels).",
    flag_values=_FLAGS,
)


def main(argv: Sequence[str] | None = None) -> list[pathlib.Path]:
    """CLI entry point: `argv` are the arguments (None: sys.argv[1:]); returns the written
    files. A mistake in the flags or the workdir exits with one line (`cli.fail`)."""
    cli.parse_flags(_FLAGS, argv, __doc__)
    if not _PRED.value and not _METRICS_CSV.value and not _CURVE.value:
        cli.fail(
            "give --pred (a cube), --metrics_csv (evaluate's output) and/or --curve (a workdir) "
            "(see --help)"
        )
    out_dir = pathlib.Path(_OUTPUT.value)
    written = []
    if _PRED.value:
        hsi_pred = cubes.read_cube(_PRED.value)
        hsi_true = cubes.read_cube(_GT.value) if _GT.value else None
        rgb = hsi_io.read_rgb(_RGB.value) if _RGB.value else None
        stem = pathlib.Path(_PRED.value).stem
        written += write_scene_figures(out_dir, stem, hsi_pred, hsi_true, rgb, pixels=_PIXELS.value)
    if _METRICS_CSV.value:
        per_scene = read_metrics_csv(_METRICS_CSV.value)
        written.append(plot_metric_histograms(out_dir / "metric_histograms.png", per_scene))
    if _CURVE.value:
        target = out_dir / f"validation_{_CURVE_METRIC.value}.png"
        try:
            written.append(plot_validation_curve(target, _CURVE.value, _CURVE_METRIC.value))
        except (FileNotFoundError, ValueError) as err:  # the user's workdir: one line
            if _FLAGS.debug:
                raise
            cli.fail(cli.one_line(err))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    cli.run(main, flag_values=_FLAGS)
