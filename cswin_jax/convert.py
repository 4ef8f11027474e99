"""Convert PyTorch weights (the original CSWIN v2 code's, official MST++ releases) into Flax
variables and an Orbax checkpoint.

Naming rule shared by every network in `cswin_jax.models`: a Flax variable path maps to a
PyTorch state_dict name by joining the path with '.', turning a module-name suffix `_<digits>`
into `.<digits>` (`encoder1_0` -> `encoder1.0`, `denoising_2` -> `denoising.2`), and renaming the
leaf: `kernel` -> `weight` (or `weight_orig` under spectral norm), `scale` -> `weight`;
spectral-norm state leaves `u`/`v` map to `weight_u`/`weight_v`. Layouts: OIHW conv weights
become HWIO (depthwise `(C,1,kh,kw)` -> `(kh,kw,1,C)`; a transposed conv's `(I,O,kh,kw)` the
same way, to `(kh,kw,O,I)`), `nn.Linear` `(out,in)` weights become `(in,out)`, and a Flax leaf
whose shape equals the converted one with singleton axes removed (1x1 convs stored as dense
`(I,O)` kernels, `(heads,1,1)` temperatures stored as `(heads,)`) is reshaped.

Command line (torch is only needed for `.pth` files):

  python -m cswin_jax.convert --torch CKPT --out DIR [--discriminator D_CKPT]
      [--config=configs/gan.py --config.model.base_channels=16 ...] [--trust_pickle]

reads a trainer checkpoint (`state_dict` with `generator.*` and `discriminator.*`), a bare
generator state_dict, an official MST++ checkpoint (`{'state_dict': ...}`, names possibly under
`module.`), or an `.npz` of state_dict names (optionally under a prefix such as `param/`). The
generator's architecture is recognised from the names (`detect_architecture`): without
--config, configs/base.py (CSWin) or configs/mst_plus_plus.py (MST++) describes it; a --config
of the other architecture is refused. Both networks are converted for the config's `model` /
`discriminator` and written as a weights-only Orbax checkpoint
(`cswin_jax.checkpoint.save_model_checkpoint`) that training (`init_from`) and inference restore
with `cswin_jax.checkpoint.restore_model_variables`.

This module is the only place in the project that knows the PyTorch layout.
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

_INDEX_SUFFIX = re.compile(r"_(\d+)(?=_|$)")


def _torch_segment(segment: str) -> str:
    return _INDEX_SUFFIX.sub(lambda m: "." + m.group(1), segment)


def torch_name_candidates(path: tuple[str, ...], collection: str) -> list[str]:
    """PyTorch state_dict names a Flax variable at `path` may come from, most likely first."""
    *modules, leaf = path
    prefix = ".".join(_torch_segment(s) for s in modules)
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if collection != "params":
        return [join(f"weight_{leaf}"), join(leaf)]
    if leaf == "kernel":
        return [join("weight"), join("weight_orig")]
    if leaf == "scale":
        return [join("weight")]
    return [join(leaf)]


def _convert_layout(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Returns `value` in the Flax layout of `shape`, or None when no rule fits."""
    candidates = [value]
    if value.ndim == 4:
        candidates.insert(0, np.transpose(value, (2, 3, 1, 0)))  # OIHW -> HWIO
    elif value.ndim == 2:
        candidates.insert(0, value.T)  # nn.Linear (out, in) -> (in, out)
    for cand in candidates:
        if cand.shape == tuple(shape):
            return cand
        squeezed = tuple(d for d in cand.shape if d != 1)
        if squeezed == tuple(d for d in shape if d != 1) and cand.size == int(np.prod(shape)):
            return cand.reshape(shape)
    return None


def torch_to_flax(
    torch_params: Mapping[str, np.ndarray],
    abstract_variables: Mapping[str, Any],
    *,
    prefix: str = "",
    ignore: tuple[str, ...] = ("iteration_count",),
) -> dict[str, Any]:
    """Maps a PyTorch state_dict onto the Flax variable tree `abstract_variables`.

    Args:
      torch_params: state_dict entries as numpy arrays (names as in PyTorch).
      abstract_variables: `{collection: tree}` of arrays or `jax.ShapeDtypeStruct`s, e.g.
        `jax.eval_shape(model.init, ...)`.
      prefix: only names starting with this prefix are used, with the prefix stripped
        (`'generator.'`, `'discriminator.'`, `'param/'`).
      ignore: state_dict names (after the prefix) that carry no Flax variable.

    Returns:
      `{collection: tree}` of float32 numpy arrays with the structure of `abstract_variables`.

    Raises:
      ValueError listing every Flax variable without a source, every shape mismatch and every
      unused PyTorch tensor.
    """
    source = {
        k[len(prefix) :]: np.asarray(v) for k, v in torch_params.items() if k.startswith(prefix)
    }
    unused = set(source) - set(ignore)
    missing, bad_shape = [], []
    out: dict[str, Any] = {}
    for collection, tree in abstract_variables.items():
        flat = traverse_util.flatten_dict(dict(tree))
        converted = {}
        for path, leaf in flat.items():
            names = [n for n in torch_name_candidates(path, collection) if n in source]
            if not names:
                missing.append(f"{collection}/{'/'.join(path)}")
                continue
            name = names[0]
            arr = _convert_layout(source[name], tuple(leaf.shape))
            if arr is None:
                bad_shape.append(f"{name}: torch {source[name].shape} vs flax {tuple(leaf.shape)}")
                continue
            if name not in unused:
                bad_shape.append(f"{name}: used by more than one Flax variable")
            unused.discard(name)
            converted[path] = np.asarray(arr, dtype=np.dtype(leaf.dtype))
        out[collection] = traverse_util.unflatten_dict(converted)
    if missing or bad_shape or unused:
        lines = []
        if missing:
            lines.append(f"{len(missing)} Flax variables have no PyTorch tensor: {sorted(missing)}")
        if bad_shape:
            lines.append(f"{len(bad_shape)} tensors do not fit: {bad_shape}")
        if unused:
            lines.append(f"{len(unused)} PyTorch tensors are unused: {sorted(unused)}")
        raise ValueError(
            "checkpoint does not match this architecture (check the model config, e.g. "
            "base_channels / num_heads / split_sizes, or model.mst_plus_plus for MST++):\n  "
            + "\n  ".join(lines)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Reading original checkpoints and the command-line converter
# ---------------------------------------------------------------------------------------------

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
GENERATOR_PREFIX = "generator."
DISCRIMINATOR_PREFIX = "discriminator."
# Keys under which the original trainers (and common PyTorch code) nest the state_dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def _import_torch():
    try:
        import torch  # noqa: PLC0415 - optional dependency, imported only for .pth files
    except ImportError as e:
        raise ImportError(
            "reading a PyTorch .pth checkpoint needs torch, which is an optional extra: "
            "`pip install 'cswin-jax[torch]'` (or `pip install torch`); alternatively save the "
            "state_dict as .npz in an environment with torch: "
            "np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})"
        ) from e
    return torch


def _load_torch_file(path: pathlib.Path, *, trust_pickle: bool) -> Any:
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if trust_pickle:
            raise ValueError(f"{path}: torch.load failed: {e}") from e
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused the file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The original trainers' checkpoints "
            "also hold numpy RNG states and the config; if you trust where the file comes from, "
            "rerun with --trust_pickle to load it with weights_only=False"
        ) from e


def _tensor_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            out[str(name)] = value
    return out


def load_state_dict(
    path: str | pathlib.Path, *, npz_prefix: str | None = None, trust_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Reads an original checkpoint as `{state_dict name: numpy array}`.

    Args:
      path: a PyTorch file (`.pth`/`.pt`/`.ckpt`/`.bin`, needs torch) holding a bare state_dict
        or a trainer dict whose `state_dict` (or `model_state_dict`) holds it; or an `.npz`
        whose keys are state_dict names, optionally all under one prefix.
      npz_prefix: for `.npz`: use only keys under this prefix, stripped (e.g. 'param/'). None:
        'param/' when any key has it (the golden files' layout), else every key.
      trust_pickle: load `.pth` files with `torch.load(weights_only=False)` (runs pickled code;
        needed for the original trainers' checkpoints, which store numpy RNG states).

    Returns names without a leading DDP `module.` prefix.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if npz_prefix is None:
                npz_prefix = "param/" if any(n.startswith("param/") for n in names) else ""
            state = {
                n[len(npz_prefix) :]: np.asarray(archive[n])
                for n in names
                if n.startswith(npz_prefix)
            }
        if not state:
            raise ValueError(f"{path}: no arrays under prefix {npz_prefix!r}; keys: {names[:20]}")
    elif path.suffix in TORCH_SUFFIXES:
        obj = _load_torch_file(path, trust_pickle=trust_pickle)
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"{path}: expected a state_dict or a checkpoint dict, found {type(obj).__name__}"
            )
        for key in _NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        state = _tensor_dict(obj)
        if not state:
            raise ValueError(
                f"{path}: no tensors found; top-level keys: {sorted(map(str, obj))[:20]} "
                f"(expected a state_dict, or a dict with one of {list(_NESTED_STATE_KEYS)})"
            )
    else:
        raise ValueError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .npz or one of "
            f"{list(TORCH_SUFFIXES)}"
        )
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module.") :]: value for name, value in state.items()}
    return state


def split_generator_discriminator(
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Splits a state_dict into (generator, discriminator or None) state_dicts.

    A trainer checkpoint's combined model has `generator.*` and `discriminator.*` names; any
    other name is an error. A bare state_dict (no such prefixes) is the generator's.
    """
    if not any(n.startswith((GENERATOR_PREFIX, DISCRIMINATOR_PREFIX)) for n in state):
        return dict(state), None
    gen, disc, other = {}, {}, []
    for name, value in state.items():
        if name.startswith(GENERATOR_PREFIX):
            gen[name[len(GENERATOR_PREFIX) :]] = value
        elif name.startswith(DISCRIMINATOR_PREFIX):
            disc[name[len(DISCRIMINATOR_PREFIX) :]] = value
        else:
            other.append(name)
    if other:
        raise ValueError(
            f"checkpoint mixes generator./discriminator. names with {len(other)} others: "
            f"{sorted(other)[:20]}"
        )
    if not gen:
        raise ValueError("checkpoint has discriminator.* tensors but no generator.* tensors")
    return gen, (disc or None)


def detect_architecture(state: Mapping[str, Any]) -> str | None:
    """The generator architecture (`config.model.arch`) a generator state_dict comes from:
    'mst_plus_plus' (`conv_in.*`, `body.<k>.*`), 'cswin' (`denoising.*`, `embedding.*`), or
    None when the names fit neither."""
    names = list(state)
    if "conv_in.weight" in state and any(n.startswith("body.") for n in names):
        return "mst_plus_plus"
    if any(n.startswith(("denoising.", "embedding.")) for n in names):
        return "cswin"
    return None


def default_config(arch: str | None):
    """The repository's config for `arch`: configs/mst_plus_plus.py for MST++, else
    configs/base.py (importable from the repository root)."""
    try:
        if arch == "mst_plus_plus":
            from configs import mst_plus_plus as recipe  # noqa: PLC0415
        else:
            from configs import base as recipe  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(
            "no --config given and configs/ is not importable; run from the repository root "
            "or pass --config=path/to/config.py"
        ) from e
    return recipe.get_config()


def abstract_model_variables(config) -> tuple[Any, Any]:
    """`jax.eval_shape` variable trees of config's generator and discriminator (nothing computed).

    Returns ({'params': ...} of the generator, {'params', 'spectral_norm'} of the discriminator).
    """
    import jax  # noqa: PLC0415 - keep `import cswin_jax.convert` light for torch_to_flax users
    import jax.numpy as jnp  # noqa: PLC0415

    from cswin_jax import models  # noqa: PLC0415
    from cswin_jax.models import discriminator as disc_lib  # noqa: PLC0415

    size = 32  # parameter shapes do not depend on the image size
    rgb = jnp.zeros((1, size, size, int(config.model.in_channels)), jnp.float32)
    hsi = jnp.zeros((1, size, size, int(config.model.out_channels)), jnp.float32)
    gen = models.build_generator(config.model)
    disc = disc_lib.build_discriminator(config.discriminator)
    disc = disc.clone(rgb_channels=rgb.shape[-1], hsi_channels=hsi.shape[-1])
    key = jax.random.key(0)
    gen_vars = jax.eval_shape(lambda: gen.init(key, rgb, train=False))
    disc_vars = jax.eval_shape(lambda: disc.init(key, rgb, hsi, train=False))
    return gen_vars, disc_vars


def convert_state_dicts(
    generator_state: Mapping[str, np.ndarray],
    discriminator_state: Mapping[str, np.ndarray] | None,
    config,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Original state_dicts -> (generator params, discriminator variables or None).

    Raises ValueError listing, per network, every unmatched, misshaped or unused tensor.
    """
    gen_abstract, disc_abstract = abstract_model_variables(config)
    errors = []
    gen_params = disc_vars = None
    try:
        gen_params = torch_to_flax(generator_state, gen_abstract)["params"]
    except ValueError as e:
        errors.append(f"generator (config.model): {e}")
    if discriminator_state is not None:
        try:
            disc_vars = torch_to_flax(discriminator_state, disc_abstract)
        except ValueError as e:
            errors.append(f"discriminator (config.discriminator): {e}")
    if errors:
        raise ValueError("\n".join(errors))
    return gen_params, disc_vars


def convert_checkpoint(
    torch_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config=None,
    *,
    discriminator_path: str | pathlib.Path | None = None,
    npz_prefix: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, int]:
    """Converts an original checkpoint into a weights-only Orbax checkpoint at `out_dir`.

    Args:
      torch_path: the original checkpoint (see `load_state_dict`): a trainer checkpoint with
        generator and discriminator, or a generator state_dict.
      out_dir: the new checkpoint folder (must not exist or be empty); restore it with
        `cswin_jax.checkpoint.restore_model_variables(out_dir)`.
      config: an ml_collections ConfigDict whose `model` / `discriminator` describe the
        architecture; it is stored with the weights. None: `default_config` of the
        architecture the names come from. A config of another architecture than the names'
        (`detect_architecture`) is refused with one line naming both.
      discriminator_path: a separate discriminator state_dict (when `torch_path` holds only the
        generator's).

    Returns the number of converted parameters per network ('generator', 'discriminator').
    """
    from cswin_jax import checkpoint, models  # noqa: PLC0415 - pulls in orbax

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty; pick a new --out folder")
    state = load_state_dict(torch_path, npz_prefix=npz_prefix, trust_pickle=trust_pickle)
    gen_state, disc_state = split_generator_discriminator(state)
    detected = detect_architecture(gen_state)
    if config is None:
        config = default_config(detected)
    if detected is not None:
        mismatch = models.architecture_mismatch(
            {"arch": detected},
            config.model,
            str(torch_path),
            fix=f"use {models.RECIPES[detected]}, or no --config (recognised from the names)",
        )
        if mismatch:
            raise ValueError(mismatch)
    if detected == "mst_plus_plus" and discriminator_path is not None:
        raise ValueError(
            f"{torch_path} is an MST++ generator (no discriminator); drop --discriminator"
        )
    if discriminator_path is not None:
        if disc_state is not None:
            raise ValueError(
                f"{torch_path} already holds discriminator.* tensors; drop --discriminator"
            )
        disc_state = load_state_dict(
            discriminator_path, npz_prefix=npz_prefix, trust_pickle=trust_pickle
        )
    gen_params, disc_vars = convert_state_dicts(gen_state, disc_state, config)
    checkpoint.save_model_checkpoint(
        out_dir,
        generator_params=gen_params,
        discriminator_variables=disc_vars,
        config=config.to_dict(),
    )
    counts = {"generator": _parameter_count(gen_params)}
    if disc_vars is not None:
        counts["discriminator"] = _parameter_count(disc_vars["params"])
    return counts


def _parameter_count(tree: Mapping[str, Any]) -> int:
    return int(sum(np.size(x) for x in traverse_util.flatten_dict(dict(tree)).values()))


def _define_flags() -> dict[str, Any]:
    """The CLI's flags; defined only when run as a program, so importing this module (e.g.
    next to `cswin_jax.main`, which also defines --config) never clashes."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    return {
        "config": config_flags.DEFINE_config_file(
            "config",
            None,
            "Configuration whose model/discriminator match the checkpoint (default: "
            "configs/base.py, or configs/mst_plus_plus.py for MST++ weights, recognised from "
            "the names); override keys with e.g. --config.model.base_channels=16.",
        ),
        "torch": flags.DEFINE_string(
            "torch", None, "Original checkpoint: .pth (needs torch) or .npz.", required=True
        ),
        "out": flags.DEFINE_string("out", None, "New Orbax checkpoint folder.", required=True),
        "discriminator": flags.DEFINE_string(
            "discriminator", None, "Separate discriminator state_dict (.pth or .npz), optional."
        ),
        "npz_prefix": flags.DEFINE_string(
            "npz_prefix", None, "Only .npz keys under this prefix (default: 'param/' if present)."
        ),
        "trust_pickle": flags.DEFINE_bool(
            "trust_pickle",
            False,
            "Load .pth with torch.load(weights_only=False); needed for the original trainers' "
            "checkpoints (numpy RNG states). Only for files from a trusted source.",
        ),
    }


def main(argv: list[str], flag_values: Mapping[str, Any]) -> None:
    """`python -m cswin_jax.convert --torch CKPT --out DIR [--config configs/gan.py ...]`."""
    from absl import app  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = flag_values["out"].value
    try:
        counts = convert_checkpoint(
            flag_values["torch"].value,
            out,
            flag_values["config"].value,
            discriminator_path=flag_values["discriminator"].value,
            npz_prefix=flag_values["npz_prefix"].value,
            trust_pickle=flag_values["trust_pickle"].value,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        # A user's mistake (wrong file, config or folder): the message, no traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
    for network, n in counts.items():
        print(f"  {network:<14s} {n:>12,d} parameters")


if __name__ == "__main__":
    import functools

    from cswin_jax import cli

    cli.run(functools.partial(main, flag_values=_define_flags()))
