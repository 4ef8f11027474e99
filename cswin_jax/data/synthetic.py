r"""Physically based synthetic scenes in the ARAD-1K / MST++ layout (the embedded default).

    python -m cswin_jax.data.synthetic --out DIR --train N --valid M \
        --height 482 --width 512 --seed S

writes DIR/Train_Spec/<stem>.mat (MATLAB v7.3: `cube` stored (31, W, H), `bands`,
`norm_factor`), DIR/Train_RGB/<stem>.jpg and DIR/split_txt/{train,valid}_list.txt, i.e. exactly
what `cswin_jax.data.arad` reads for ARAD-1K.

How a scene is made (all spectra on 400-700 nm at 10 nm, 31 bands):
  1. Materials: measured reflectances bundled with colour-science (colour checkers, CIE/NIST
     test colour samples, the CIE 2017 colour-fidelity set, the rawtoaces 190-patch set),
     floored at 0.01, plus a spectrally flat interface reflection of 2-5 % (dichromatic
     model), so no material is black in any band.
  2. Layout: a domain-warped Voronoi partition plus soft-edged elliptical objects; borders
     alpha-blend neighbouring materials (linear spectral mixing). Inside each region a smooth
     multi-octave texture mixes in a second material and modulates albedo.
  3. Shading: a low-frequency field in [0.2, 1].
  4. Illuminant: CIE daylight (4000-25000 K), tungsten (A, blackbody 2700-3400 K),
     fluorescent (FL1-12, FL3.x), LED or high-pressure lamps, or a spatial mixture of two;
     plus an ambient fill of CIE daylight (skylight, interreflections) at 4-12 % of the direct
     light's peak, softly occluded but not shaded.
  5. Radiance = reflectance x (shading x illuminant + ambient), divided by its maximum (ARAD
     stores [0, 1] cubes; the factor is saved as `norm_factor`).
  6. RGB as in the NTIRE 2022 challenge: measured camera sensitivities (Nikon 5100, Sigma
     SD Merrill, Canon 5D Mark II), per-channel gains, exposure to mean 0.18 (with jitter),
     Poisson shot noise, Gaussian read noise, 8-bit quantisation and JPEG.

Every random choice comes from numpy's Philox generator seeded by (seed, scene number), so a
scene is the same whatever the number of scenes generated around it.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np
from absl import flags, logging
from PIL import Image

from cswin_jax import cli, cubes
from cswin_jax import io as hsi_io

REFLECTANCE_FLOOR = 0.01
INTERFACE_REFLECTION = (0.02, 0.05)  # flat first-surface reflectance, per scene
AMBIENT_FILL = (0.04, 0.12)  # skylight fill relative to the direct light's peak, per scene
TRAIN_PREFIX = "SYNTH"
COMPLETE_MARKER = "synthetic.json"


# ---------------------------------------------------------------------------------------------
# Measured spectra (colour-science)
# ---------------------------------------------------------------------------------------------


def _align(spectrum, shape):
    """Resamples a colour spectral distribution onto 400-700/10, constant extrapolation."""
    return np.asarray(
        spectrum.copy()
        .align(shape, extrapolator_kwargs={"method": "Constant", "left": None, "right": None})
        .values,
        dtype=np.float64,
    )


@functools.lru_cache(maxsize=1)
def spectral_library() -> dict:
    """Measured spectra on the 31-band grid.

    Returns {'reflectances': [N, 31], 'illuminants': {family: [[31], ...]},
    'cameras': {name: [31, 3]}}; illuminants scaled to max 1, cameras to max 1.
    """
    import colour  # noqa: PLC0415  (a slow import, only needed to build the library)
    from colour.quality.cfi2017 import load_TCS_CIE2017  # noqa: PLC0415
    from colour.quality.datasets import SDS_TCS, SDS_VS  # noqa: PLC0415

    shape = colour.SpectralShape(400, 700, 10)
    reflectances = []
    for name in ("BabelColor Average", "ColorChecker N Ohta", "ISO 17321-1", "PMC"):
        reflectances += [_align(sd, shape) for sd in colour.SDS_COLOURCHECKERS[name].values()]
    for collection in (SDS_TCS["CIE 1995"], SDS_TCS["CIE 2024"]):
        reflectances += [_align(sd, shape) for sd in collection.values()]
    for collection in (SDS_VS["NIST CQS 7.4"], SDS_VS["NIST CQS 9.0"]):
        reflectances += [_align(sd, shape) for sd in collection.values()]
    for multi in (
        load_TCS_CIE2017(colour.SpectralShape(380, 780, 5)),
        colour.characterisation.read_training_data_rawtoaces_v1(),
    ):
        reflectances += list(_align(multi, shape).T)
    reflectances = np.clip(np.stack(reflectances), REFLECTANCE_FLOOR, 1.0)

    illuminants = {"daylight": [], "tungsten": [], "fluorescent": [], "led": []}
    for cct in np.arange(4000, 25001, 500):
        xy = colour.temperature.CCT_to_xy_CIE_D(cct)
        illuminants["daylight"].append(_align(colour.sd_CIE_illuminant_D_series(xy), shape))
    sds = colour.SDS_ILLUMINANTS
    illuminants["tungsten"].append(_align(sds["A"], shape))
    illuminants["tungsten"].append(_align(sds["ISO 7589 Studio Tungsten"], shape))
    for kelvin in (2700, 2900, 3100, 3400):
        illuminants["tungsten"].append(_align(colour.sd_blackbody(kelvin, shape), shape))
    illuminants["fluorescent"] = [_align(sds[name], shape) for name in sds if name.startswith("FL")]
    illuminants["led"] = [
        _align(sds[name], shape) for name in sds if name.startswith(("LED", "HP"))
    ]
    illuminants = {
        family: [s / s.max() for s in spectra] for family, spectra in illuminants.items()
    }

    cameras = {}
    for name, label in (("Nikon 5100 (NPL)", "nikon5100"), ("Sigma SDMerill (NPL)", "sigma")):
        cameras[label] = _align(colour.MSDS_CAMERA_SENSITIVITIES[name], shape)
    canon_csv = (
        pathlib.Path(colour.characterisation.__file__).parent
        / "datasets/rawtoaces/CANON_EOS_5DMark_II_RGB_Sensitivities.csv"
    )
    canon = np.loadtxt(canon_csv, delimiter=",", skiprows=1)
    cameras["canon5d2"] = np.stack(
        [np.interp(hsi_io.WAVELENGTHS_NM, canon[:, 0], canon[:, c]) for c in (1, 2, 3)], axis=1
    )
    cameras = {name: np.clip(s, 0.0, None) / s.max() for name, s in cameras.items()}
    return {"reflectances": reflectances, "illuminants": illuminants, "cameras": cameras}


# ---------------------------------------------------------------------------------------------
# Scene synthesis
# ---------------------------------------------------------------------------------------------


def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
    """[size, cells + 2] Gaussian interpolation weights from a coarse grid onto `size` pixels."""
    coarse = np.arange(cells + 2, dtype=np.float32) - 1.0
    position = np.linspace(0, cells - 1, size, dtype=np.float32)
    weights = np.exp(-0.5 * ((position[:, None] - coarse[None]) / 0.6) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def _smooth_noise(rng, height, width, cells, octaves=1):
    """Band-limited noise in about [-1, 1]: random coarse grids interpolated smoothly.

    Each octave is a (cells x cells)-ish grid mapped to the image by separable Gaussian
    interpolation matrices (two small matmuls, no per-pixel Python).
    """
    field = np.zeros((height, width), np.float32)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        cells_y = max(2, int(round(cells * 2**octave)))
        cells_x = max(2, int(round(cells_y * width / height)))
        grid = rng.standard_normal((cells_y + 2, cells_x + 2)).astype(np.float32)
        rows = _interpolation_matrix(height, cells_y)
        cols = _interpolation_matrix(width, cells_x)
        field += amplitude * (rows @ grid @ cols.T)
        total += amplitude
        amplitude *= 0.5
    return field * (1.6 / total)


def _region_weights(rng, height, width, num_materials):
    """Soft region memberships [K, H*W] float32 summing to 1 per pixel.

    Voronoi cells under a smooth domain warp, with soft-edged ellipses painted on top; the
    soft borders give linear spectral mixing between neighbouring materials.
    """
    yy, xx = np.meshgrid(
        np.linspace(0, 1, height, dtype=np.float32),
        np.linspace(0, width / height, width, dtype=np.float32),
        indexing="ij",
    )
    yy = yy + 0.05 * _smooth_noise(rng, height, width, 3, octaves=2)
    xx = xx + 0.05 * _smooth_noise(rng, height, width, 3, octaves=2)
    num_cells = num_materials // 2 + 1
    seeds = rng.uniform(0, 1, (num_cells, 2)).astype(np.float32)
    seeds[:, 1] *= width / height
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    sharpness = np.float32(rng.uniform(400, 3000))
    weights = np.exp(-sharpness * (dist - dist.min(axis=0, keepdims=True)))
    weights /= weights.sum(axis=0, keepdims=True)
    layers = [weights.reshape(num_cells, -1)]
    for _ in range(num_materials - num_cells):
        cy, cx = rng.uniform(0, 1), rng.uniform(0, width / height)
        ry, rx = rng.uniform(0.04, 0.25, size=2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - np.float32(cy), xx - np.float32(cx)
        u = (dy * np.float32(np.cos(angle)) + dx * np.float32(np.sin(angle))) / np.float32(ry)
        v = (dx * np.float32(np.cos(angle)) - dy * np.float32(np.sin(angle))) / np.float32(rx)
        edge = np.float32(rng.uniform(8, 30)) * (u * u + v * v - 1)
        alpha = (1.0 / (1.0 + np.exp(np.clip(edge, -30, 30)))).reshape(1, -1)
        layers = [layer * (1 - alpha) for layer in layers] + [alpha]
    return np.concatenate(layers, axis=0)


def _pick_illuminant(rng, library):
    illuminants = library["illuminants"]
    family = rng.choice(["daylight", "daylight", "tungsten", "fluorescent", "led"])
    spectra = illuminants[family]
    return family, spectra[rng.integers(len(spectra))]


def make_scene(height: int, width: int, rng: np.random.Generator) -> dict:
    """One synthetic scene.

    Returns {'cube': [H, W, 31] float32 in (0, 1], 'rgb': [H, W, 3] uint8 (before JPEG),
    'norm_factor': float, 'meta': dict of the random choices}.
    """
    library = spectral_library()
    reflectances = library["reflectances"]
    num_materials = int(rng.integers(6, 16))
    primary = reflectances[rng.choice(len(reflectances), num_materials, replace=False)]
    secondary = reflectances[rng.choice(len(reflectances), num_materials)]
    weights = _region_weights(rng, height, width, num_materials)

    # Texture: a second material mixed in by a smooth field, plus albedo variation.
    mix_strength = rng.uniform(0.0, 0.6, num_materials).astype(np.float32)
    texture = 0.5 + 0.5 * _smooth_noise(rng, height, width, rng.uniform(6, 20), octaves=3)
    texture = np.clip(texture, 0, 1).reshape(-1)
    reflectance = weights.T @ primary.astype(np.float32)
    reflectance += (texture[:, None] * weights.T) @ (
        mix_strength[:, None] * (secondary - primary)
    ).astype(np.float32)
    albedo = 1.0 + 0.15 * _smooth_noise(rng, height, width, rng.uniform(20, 60), octaves=2)
    reflectance *= albedo.reshape(-1, 1)
    np.clip(reflectance, REFLECTANCE_FLOOR, 1.0, out=reflectance)
    # Dichromatic model: a spectrally flat interface (first-surface) reflection on top of the
    # body reflectance, as on dielectric materials (Fresnel ~4 % at normal incidence).
    interface = np.float32(rng.uniform(*INTERFACE_REFLECTION))
    reflectance *= 1.0 - interface
    reflectance += interface

    # Shading in [0.2, 1]: low-frequency field plus a planar gradient.
    gy, gx = np.meshgrid(
        np.linspace(-1, 1, height, dtype=np.float32),
        np.linspace(-1, 1, width, dtype=np.float32),
        indexing="ij",
    )
    direction = rng.uniform(-0.3, 0.3, 2)
    shading = 0.65 + 0.3 * _smooth_noise(rng, height, width, 2.5) + direction[0] * gy
    shading += direction[1] * gx
    shading = np.clip(shading, 0.2, 1.0).reshape(-1, 1)

    family, illuminant = _pick_illuminant(rng, library)
    meta = {"illuminant": family, "num_materials": num_materials}
    if rng.uniform() < 0.3:  # a second light source over part of the scene
        family2, illuminant2 = _pick_illuminant(rng, library)
        blend = np.clip(0.5 + _smooth_noise(rng, height, width, 1.5), 0, 1).reshape(-1, 1)
        light = (1 - blend) * illuminant.astype(np.float32) + blend * illuminant2.astype(np.float32)
        meta["illuminant"] = f"{family}+{family2}"
    else:
        light = illuminant.astype(np.float32)[None]
    # Ambient fill: diffuse skylight and interreflections reach every surface, unshaded by the
    # direct light's geometry (only softly occluded), so no band is black even under lamps
    # with next to no blue (LED, high-pressure sodium).
    sky = library["illuminants"]["daylight"]
    sky = sky[rng.integers(len(sky))].astype(np.float32)[None]
    occlusion = np.clip(0.8 + 0.2 * _smooth_noise(rng, height, width, 2.0), 0.5, 1.0)
    ambient = np.float32(rng.uniform(*AMBIENT_FILL)) * occlusion.reshape(-1, 1)
    radiance = reflectance * (shading * light + ambient * sky)
    norm_factor = float(radiance.max())
    cube = (radiance / norm_factor).astype(np.float32).reshape(height, width, hsi_io.NUM_BANDS)

    # Camera: sensitivities -> per-channel gains (grey-world on an equal-energy white) ->
    # exposure -> shot + read noise -> 8 bit (NTIRE 2022 recipe).
    camera_name = rng.choice(sorted(library["cameras"]))
    sensitivity = library["cameras"][camera_name].astype(np.float32)
    sensitivity = sensitivity * (sensitivity[:, 1].sum() / sensitivity.sum(axis=0))
    linear = cube.reshape(-1, hsi_io.NUM_BANDS) @ sensitivity
    exposure = 0.18 / max(float(linear.mean()), 1e-8) * rng.uniform(0.6, 1.4)
    electrons_at_white = rng.uniform(400, 1500)
    signal = np.clip(linear * (exposure * electrons_at_white), 0, None)
    noisy = rng.poisson(signal).astype(np.float32) / electrons_at_white
    noisy += rng.normal(0, rng.uniform(0.5, 2.0) / 255, noisy.shape).astype(np.float32)
    rgb = np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8).reshape(height, width, 3)
    meta.update(camera=str(camera_name), electrons_at_white=float(electrons_at_white))
    return {"cube": cube, "rgb": rgb, "norm_factor": norm_factor, "meta": meta}


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def write_dataset(
    out: str | pathlib.Path,
    *,
    num_train: int,
    num_valid: int,
    height: int = 482,
    width: int = 512,
    seed: int = 0,
    jpeg_quality: tuple[int, int] = (70, 95),
) -> pathlib.Path:
    """Generates `num_train + num_valid` scenes into `out` in the MST++ layout."""
    if num_train < 1 or num_valid < 0 or height < 8 or width < 8:
        raise ValueError(
            f"synthetic set needs --train >= 1, --valid >= 0 and an image of at least 8x8, got "
            f"train={num_train}, valid={num_valid}, {height}x{width}"
        )
    out = pathlib.Path(out)
    for folder in ("Train_RGB", "Train_Spec", "split_txt"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    stems = [f"{TRAIN_PREFIX}_{i:04d}" for i in range(1, num_train + num_valid + 1)]
    start = time.perf_counter()
    scenes_meta = {}
    for number, stem in enumerate(stems, start=1):
        rng = np.random.Generator(np.random.Philox(key=[seed, number]))
        scene = make_scene(height, width, rng)
        cubes.write_mat73(out / "Train_Spec" / f"{stem}.mat", scene["cube"], scene["norm_factor"])
        quality = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
        Image.fromarray(scene["rgb"]).save(out / "Train_RGB" / f"{stem}.jpg", quality=quality)
        scenes_meta[stem] = dict(scene["meta"], jpeg_quality=quality)
    (out / "split_txt" / "train_list.txt").write_text("\n".join(stems[:num_train]) + "\n")
    (out / "split_txt" / "valid_list.txt").write_text("".join(s + "\n" for s in stems[num_train:]))
    elapsed = time.perf_counter() - start
    settings = dict(num_train=num_train, num_valid=num_valid, height=height, width=width, seed=seed)
    # Written last: its presence marks a complete set.
    (out / COMPLETE_MARKER).write_text(
        json.dumps({"settings": settings, "scenes": scenes_meta}, indent=1)
    )
    logging.info(
        "synthetic: wrote %d scenes of %dx%d to %s in %.1f s",
        len(stems),
        height,
        width,
        out,
        elapsed,
    )
    return out


def is_complete(out: str | pathlib.Path, **settings) -> bool:
    """Whether `out` holds a finished set generated with `settings`."""
    marker = pathlib.Path(out) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())["settings"]
    except (ValueError, KeyError):
        return False
    return all(stored.get(k) == v for k, v in settings.items())


_FLAGS = cli.program_flags()  # its own set: predict, floor, ... share names (cli.program_flags)
_OUT = flags.DEFINE_string(
    "out", None, "Output folder (MST++ layout). Required.", flag_values=_FLAGS, required=True
)
_TRAIN = flags.DEFINE_integer("train", 8, "Number of training scenes.", flag_values=_FLAGS)
_VALID = flags.DEFINE_integer("valid", 2, "Number of validation scenes.", flag_values=_FLAGS)
_HEIGHT = flags.DEFINE_integer("height", 482, "Scene height in pixels.", flag_values=_FLAGS)
_WIDTH = flags.DEFINE_integer("width", 512, "Scene width in pixels.", flag_values=_FLAGS)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the scenes (the same seed writes the same files).", flag_values=_FLAGS
)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: `argv` are the arguments (None: sys.argv[1:])."""
    cli.parse_flags(_FLAGS, argv, __doc__)
    logging.set_verbosity(logging.INFO)
    write_dataset(
        _OUT.value,
        num_train=_TRAIN.value,
        num_valid=_VALID.value,
        height=_HEIGHT.value,
        width=_WIDTH.value,
        seed=_SEED.value,
    )


if __name__ == "__main__":
    cli.run(main, flag_values=_FLAGS)
