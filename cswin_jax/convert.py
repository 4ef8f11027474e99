"""Convert original CSWIN v2 PyTorch weights into Flax variables and an Orbax checkpoint.

Naming rule shared by every network in `cswin_jax.models`: a Flax variable path maps to a
PyTorch state_dict name by joining the path with '.', turning a module-name suffix `_<digits>`
into `.<digits>` (`encoder1_0` -> `encoder1.0`, `denoising_2` -> `denoising.2`), and renaming the
leaf: `kernel` -> `weight` (or `weight_orig` under spectral norm), `scale` -> `weight`;
spectral-norm state leaves `u`/`v` map to `weight_u`/`weight_v`. Layouts: OIHW conv weights
become HWIO (depthwise `(C,1,kh,kw)` -> `(kh,kw,1,C)`), and a Flax leaf whose shape equals the
converted one with singleton axes removed (1x1 convs stored as dense `(I,O)` kernels, `(heads,1,1)`
temperatures stored as `(heads,)`) is reshaped.

This module is the only place in the project that knows the PyTorch layout.
"""

from __future__ import annotations

import re
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
    source = {k[len(prefix) :]: np.asarray(v) for k, v in torch_params.items() if k.startswith(prefix)}
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
            "base_channels / num_heads / split_sizes):\n  " + "\n  ".join(lines)
        )
    return out
