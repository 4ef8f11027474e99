"""Tests for cswin_jax/checkpoint.py: weights-only files and reading a model from a folder."""

import numpy as np
import pytest

from cswin_jax import checkpoint as ckpt_lib


def _weights():
    gen = {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    disc = {
        "params": {"conv": {"kernel": np.ones((3, 2), np.float32)}},
        "spectral_norm": {"conv": {"u": np.full((2,), 0.5, np.float32)}},
    }
    return gen, disc


def test_weights_only_round_trip(tmp_path):
    gen, disc = _weights()
    ckpt_lib.save_model_checkpoint(
        tmp_path / "w",
        generator_params=gen,
        discriminator_variables=disc,
        config={"model": {"a": 1}},
    )
    gen2, disc2, config = ckpt_lib.restore_model_variables(tmp_path / "w")
    np.testing.assert_array_equal(gen2["conv"]["kernel"], gen["conv"]["kernel"])
    np.testing.assert_array_equal(disc2["spectral_norm"]["conv"]["u"], 0.5)
    assert config == {"model": {"a": 1}}


def test_missing_and_foreign_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_lib.restore_model_variables(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        ckpt_lib.restore_model_variables(tmp_path / "foreign")
