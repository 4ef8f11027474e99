"""Convert PyTorch weights (the original CSWIN v2 code's, official MST++ releases) into Flax
variables and an Orbax checkpoint.

Naming rule shared by every network in `cswin_jax.models`: a Flax variable path maps to a
PyTorch state_dict name by joining the path with '.', turning a module-name suffix `_<digits>`
into `.<digits>` (`encoder1_0` -> `encoder1.0`), and renaming the leaf: `kernel` -> `weight` (or
`weight_orig` under spectral norm), `scale` -> `weight`; spectral-norm state `u`/`v` ->
`weight_u`/`weight_v`. Layouts: OIHW conv weights become HWIO (depthwise `(C,1,kh,kw)` ->
`(kh,kw,1,C)`; a transposed conv's `(I,O,kh,kw)` the same way), `nn.Linear` `(out,in)` weights
become `(in,out)`, and a leaf whose shape equals the converted one without singleton axes (1x1
convs as dense `(I,O)` kernels, `(heads,1,1)` temperatures as `(heads,)`) is reshaped.

  python -m cswin_jax.convert --torch CKPT --out DIR [--discriminator D_CKPT]
      [--config=configs/gan.py] [--config.model.norm_groups=4 ...] [--trust_pickle]

The architecture comes from the checkpoint: the original trainer's `config` when it holds one
(`ORIGINAL_CONFIG_KEYS`), then the tensors' names and shapes (`infer_architecture`), which win.
The recipe (--config; default configs/base.py, or configs/mst_plus_plus.py for MST++ weights)
gives the rest; `--config.<key>` sets what the checkpoint does not record (a bare state_dict
has no norm_groups or output_activation: a warning names them) and is an error, naming both
values, where it contradicts the checkpoint. The written weights-only checkpoint stores that
config, so training (`init_from`), predict and evaluate restore it without flags.

This module and `cswin_jax.torch_architecture` (what architecture a checkpoint holds) are the
only places in the project that know the PyTorch layout.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util
from ml_collections.config_flags import config_path

from cswin_jax import cli
from cswin_jax.torch_architecture import (
    NOT_IN_WEIGHTS,
    apply_architecture,
    checkpoint_architecture,
    detect_architecture,
    fix_hint,
    infer_architecture,
    show,
)

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


def _torch_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """A Flax leaf's shape in the PyTorch layout of an `ndim`-d tensor (for error messages)."""
    if len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    elif len(shape) == 2:
        shape = shape[::-1]
    return tuple(shape) + (1,) * (ndim - len(shape))


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
      prefix: only names with this prefix are used, stripped ('generator.', 'param/').
      ignore: state_dict names (after the prefix) that carry no Flax variable.

    Returns `{collection: tree}` of numpy arrays with the structure of `abstract_variables`.
    Raises a one-line ValueError: how many tensors do not fit and the first ten.
    """
    source = {
        k[len(prefix) :]: np.asarray(v) for k, v in torch_params.items() if k.startswith(prefix)
    }
    order = {name: i for i, name in enumerate(source)}
    matched, misshaped, missing = set(), [], []
    out: dict[str, Any] = {}
    for collection, tree in abstract_variables.items():
        converted = {}
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            candidates = torch_name_candidates(path, collection)
            name = next((n for n in candidates if n in source), None)
            shape = tuple(leaf.shape)
            if name is None:
                missing.append(f"{candidates[0]} missing {_torch_shape(shape, len(shape))}")
                continue
            arr, twice = _convert_layout(source[name], shape), name in matched
            matched.add(name)
            if arr is None or twice:
                what = f"vs {_torch_shape(shape, source[name].ndim)}" if arr is None else "twice"
                misshaped.append((order[name], f"{name} {source[name].shape} {what}"))
                continue
            converted[path] = np.asarray(arr, dtype=np.dtype(leaf.dtype))
        out[collection] = traverse_util.unflatten_dict(converted)
    unused = [f"{n} {source[n].shape} unused" for n in source if n not in matched | set(ignore)]
    from cswin_jax import checkpoint  # noqa: PLC0415 - orbax only when converting

    message = checkpoint.misfit_message([text for _, text in sorted(misshaped)], missing, unused)
    if message:
        raise ValueError(message)
    return out


# --- reading original checkpoints ------------------------------------------------------------

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
GENERATOR_PREFIX = "generator."
DISCRIMINATOR_PREFIX = "discriminator."
# Keys under which the original trainers (and common PyTorch code) nest the state_dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
CONFIG_ENTRY = "config"  # a trainer checkpoint's config (in an .npz: a JSON string)


def _load_torch_file(path: pathlib.Path, *, trust_pickle: bool) -> Any:
    try:
        import torch  # noqa: PLC0415 - optional dependency, imported only for .pth files
    except ImportError as e:
        raise ImportError(
            "reading a PyTorch .pth checkpoint needs torch, which is an optional extra: "
            "`pip install 'cswin-jax[torch]'` (or `pip install torch`); or save it as .npz where "
            "torch is installed: np.savez(path, config=json.dumps(ckpt['config']), "
            "**{k: v.numpy() for k, v in state_dict.items()})"
        ) from e
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


def load_checkpoint(
    path: str | pathlib.Path, *, npz_prefix: str | None = None, trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Reads an original checkpoint as ({state_dict name: numpy array}, trainer config or None).

    `path`: `.pth`/`.pt`/`.ckpt`/`.bin` (needs torch; `trust_pickle` loads it with
    weights_only=False, which the original trainers' checkpoints need for their numpy RNG
    states) holding a bare state_dict or a trainer dict (`state_dict` or `model_state_dict`,
    and `config`); or an `.npz` of state_dict names under `npz_prefix` (None: 'param/' when a
    key has it, the golden files' layout) with an optional `config` entry (a JSON string).
    Names lose a DDP `module.` prefix.
    """
    path, trainer_config = pathlib.Path(path), None
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = [n for n in archive.files if n != CONFIG_ENTRY]
            if CONFIG_ENTRY in archive.files:
                try:
                    trainer_config = json.loads(str(archive[CONFIG_ENTRY]))
                except ValueError as e:
                    raise ValueError(f"{path}: its 'config' entry is not JSON ({e})") from e
            if npz_prefix is None:
                npz_prefix = "param/" if any(n.startswith("param/") for n in names) else ""
            state = {n[len(npz_prefix) :]: archive[n] for n in names if n.startswith(npz_prefix)}
        if not state:
            raise ValueError(f"{path}: no arrays under prefix {npz_prefix!r}; keys: {names[:20]}")
    elif path.suffix in TORCH_SUFFIXES:
        obj = _load_torch_file(path, trust_pickle=trust_pickle)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state_dict or a dict, found {type(obj).__name__}")
        if isinstance(obj.get(CONFIG_ENTRY), Mapping):
            trainer_config = dict(obj[CONFIG_ENTRY])
        obj = next((obj[k] for k in _NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)), obj)
        state = {
            str(k): v.detach().cpu().numpy() if hasattr(v, "detach") else v
            for k, v in obj.items()
            if hasattr(v, "detach") or isinstance(v, np.ndarray)
        }
        if not state:
            raise ValueError(
                f"{path}: no tensors found; top-level keys: {sorted(map(str, obj))[:20]} "
                f"(expected a state_dict, or a dict with one of {list(_NESTED_STATE_KEYS)})"
            )
    else:
        raise ValueError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .npz or "
            f"one of {list(TORCH_SUFFIXES)}"
        )
    if all(name.startswith("module.") for name in state):
        state = {name[len("module.") :]: value for name, value in state.items()}
    return state, trainer_config


def split_generator_discriminator(state: Mapping[str, np.ndarray]):
    """Splits a state_dict into (generator, discriminator or None) state_dicts: a trainer
    checkpoint's `generator.*` and `discriminator.*` names (any other name is an error), or a
    bare state_dict, the generator's."""
    if not any(n.startswith((GENERATOR_PREFIX, DISCRIMINATOR_PREFIX)) for n in state):
        return dict(state), None
    parts: dict[str, dict[str, np.ndarray]] = {GENERATOR_PREFIX: {}, DISCRIMINATOR_PREFIX: {}}
    for name, value in state.items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is None:
            other = sorted(n for n in state if not n.startswith(tuple(parts)))
            raise ValueError(
                f"checkpoint mixes generator./discriminator. names with "
                f"{len(other)} others: {other[:20]}"
            )
        parts[prefix][name[len(prefix) :]] = value
    if not parts[GENERATOR_PREFIX]:
        raise ValueError("checkpoint has discriminator.* tensors but no generator.* tensors")
    return parts[GENERATOR_PREFIX], (parts[DISCRIMINATOR_PREFIX] or None)


# --- converting, and the command line ---------------------------------------------------------


def default_config(arch: str | None):
    """configs/mst_plus_plus.py's config for MST++, else configs/base.py's."""
    try:
        from configs import base, mst_plus_plus  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(
            "no --config given and configs/ is not importable; run from the repository root "
            "or pass --config=path/to/config.py"
        ) from e
    return (mst_plus_plus if arch == "mst_plus_plus" else base).get_config()


def abstract_model_variables(config) -> tuple[Any, Any]:
    """`jax.eval_shape` variable trees of config's generator and discriminator (nothing computed):
    ({'params'} of the generator, {'params', 'spectral_norm'} of the discriminator)."""
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


def convert_state_dicts(generator_state, discriminator_state, config):
    """Original state_dicts -> (generator params, discriminator variables or None).

    Raises one line (`cli.UserError`): per misfit network the count, the first ten tensors and
    the config values the tensors give (`infer_architecture`).
    """
    gen_abstract, disc_abstract = abstract_model_variables(config)
    found = infer_architecture(generator_state, discriminator_state)
    errors, gen_params, disc_vars = [], None, None
    try:
        gen_params = torch_to_flax(generator_state, gen_abstract)["params"]
    except ValueError as e:
        errors.append(f"generator: {e}{fix_hint(found, config, 'model.')}")
    if discriminator_state is not None:
        try:
            disc_vars = torch_to_flax(discriminator_state, disc_abstract)
        except ValueError as e:
            errors.append(f"discriminator: {e}{fix_hint(found, config, 'discriminator.')}")
    if errors:
        raise cli.UserError("; ".join(errors))
    return gen_params, disc_vars


def convert_checkpoint(
    torch_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config=None,
    *,
    overrides: Mapping[str, Any] | None = None,
    discriminator_path: str | pathlib.Path | None = None,
    npz_prefix: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, int]:
    """Converts an original checkpoint (see `load_checkpoint`) into a weights-only Orbax
    checkpoint at `out_dir` (a new or empty folder), with its config.

    `config` is the recipe for what the checkpoint does not record (None: `default_config` of
    the architecture the names show; another architecture's is refused in one line naming
    both); `overrides` (`{dotted key: value}`, the user's `--config.<key>`) go on top, and one
    that contradicts the checkpoint raises `cli.UserError`. `discriminator_path`: a separate
    discriminator state_dict. Returns the parameter count per network.
    """
    from cswin_jax import checkpoint, models  # noqa: PLC0415 - pulls in orbax

    out_dir, overrides, source = pathlib.Path(out_dir), dict(overrides or {}), str(torch_path)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty; pick a new --out folder")
    options = {"npz_prefix": npz_prefix, "trust_pickle": trust_pickle}
    state, trainer_config = load_checkpoint(torch_path, **options)
    gen_state, disc_state = split_generator_discriminator(state)
    detected = detect_architecture(gen_state)
    config = default_config(detected) if config is None else config
    if detected is not None:
        fix = f"use {models.RECIPES[detected]}, or no --config (recognised from the names)"
        if mismatch := models.architecture_mismatch({"arch": detected}, config.model, source, fix):
            raise ValueError(mismatch)
    if discriminator_path is not None:
        if detected == "mst_plus_plus" or disc_state is not None:
            holds = "is an MST++ generator" if disc_state is None else "holds discriminator.*"
            raise ValueError(f"{source} {holds}; drop --discriminator")
        disc_state, _ = load_checkpoint(discriminator_path, **options)
    found = checkpoint_architecture(gen_state, disc_state, trainer_config)
    config = apply_architecture(config, found, overrides, source)
    logging.info("%s: %s", source, ", ".join(f"{k}={show(v)}" for k, (v, _) in found.items()))
    unknown = [k for k in NOT_IN_WEIGHTS if k not in found and k not in overrides]
    if detected == "cswin" and unknown:
        kept = ", ".join(f"{k}={show(config_path.get_value(k, config))}" for k in unknown)
        hint = "if the original run used others, pass them as --config.<key>=..."
        logging.warning(
            "%s does not record %s; kept %s: %s", source, " or ".join(unknown), kept, hint
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


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program (`cswin_jax.main` defines --config
    too). --config defaults to configs/base.py so that `--config.<key>=...` works alone."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    base = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
    default = str(base) if base.is_file() else None
    help_text = (
        "Recipe for what the checkpoint does not record (default: configs/base.py, or "
        "configs/mst_plus_plus.py for MST++); e.g. --config.model.norm_groups=4."
    )
    try:  # with the default file, ml_collections parses the overrides here, not in cli.run
        config_flags.DEFINE_config_file("config", default, help_text)
    except (KeyError, AttributeError, flags.Error) as e:
        cli.fail(cli.unknown_override_message(sys.argv, "config", default) or cli.one_line(e))
    flags.DEFINE_string("torch", None, "Original checkpoint: .pth (needs torch) or .npz.")
    flags.DEFINE_string("out", None, "New Orbax checkpoint folder.")
    flags.DEFINE_string("discriminator", None, "Separate discriminator state_dict, optional.")
    flags.DEFINE_string("npz_prefix", None, "Only .npz keys under this prefix (default: param/).")
    flags.DEFINE_bool(
        "trust_pickle",
        False,
        "torch.load(weights_only=False): for the original trainers' checkpoints (numpy RNG "
        "states); trusted files only.",
    )
    flags.mark_flags_as_required(["torch", "out"])


def main(argv: list[str]) -> None:
    """`python -m cswin_jax.convert --torch CKPT --out DIR [--config.<key>=... ...]`."""
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args, config_flag = flags.FLAGS, flags.FLAGS["config"]
    try:
        counts = convert_checkpoint(
            args.torch,
            args.out,
            config_flag.value if config_flag.present else None,  # None: by architecture
            overrides=config_flags.get_override_values(config_flag) if config_flag.value else {},
            discriminator_path=args.discriminator,
            npz_prefix=args.npz_prefix,
            trust_pickle=args.trust_pickle,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        cli.fail(cli.one_line(e))  # a wrong file, flag or folder: the message, no traceback
    print(f"wrote {args.out}")
    for network, n in counts.items():
        print(f"  {network:<14s} {n:>12,d} parameters")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
