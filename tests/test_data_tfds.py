"""TFDS builder `arad1k` (`cswin_jax/data/tfds_arad1k.py`) and `data.source='tfds'`.

Prepared from a small synthetic layout (3 train + 2 valid scenes of 40x48); records must
round-trip bit-exact against the file reader.
"""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from cswin_jax.data import arad, pipeline, synthetic, tfds_arad1k


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    synthetic.write_dataset(root, num_train=3, num_valid=2, height=40, width=48, seed=2)
    return root


@pytest.fixture(scope="module")
def tfds_dir(layout, tmp_path_factory):
    return tfds_arad1k.prepare(layout, tmp_path_factory.mktemp("tfds"), excluded_scenes=())


def _config(layout, tfds_dir, source="tfds"):
    config = base.get_config()
    config.batch_size = 4
    config.data.update(
        source=source, data_dir=str(layout), tfds_data_dir=str(tfds_dir), patch_size=16,
        stride=8, num_workers=0,
    )  # fmt: skip
    return config


def test_prepared_as_array_record(tfds_dir):
    files = sorted(p.name for p in (tfds_dir / "arad1k" / "1.0.0").iterdir())
    assert "arad1k-train.array_record-00000-of-00001" in files
    assert "arad1k-valid.array_record-00000-of-00001" in files
    assert "dataset_info.json" in files


@pytest.mark.parametrize("split", ["train", "valid"])
def test_records_match_the_file_reader_bit_exact(layout, tfds_dir, split):
    from_tfds = tfds_arad1k.TfdsScenes(tfds_dir, split)
    from_files = arad.FileScenes(arad.list_scenes(layout, split))
    assert from_tfds.stems == from_files.stems and from_tfds.sizes == from_files.sizes
    for i in range(len(from_files)):
        for a, b in zip(from_tfds.load(i), from_files.load(i), strict=True):
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    pickle.loads(pickle.dumps(from_tfds))  # grain workers receive it pickled


def test_excluded_scenes_dropped_at_read(tfds_dir):
    scenes = tfds_arad1k.TfdsScenes(tfds_dir, "train", excluded_scenes=["SYNTH_0002"])
    assert scenes.stems == ["SYNTH_0001", "SYNTH_0003"]


def test_tfds_source_gives_the_same_batches_as_files(layout, tfds_dir):
    config = _config(layout, tfds_dir)
    root = pipeline.resolve_data_root(config, layout)
    assert root == tfds_dir
    from_tfds = pipeline.create_train_iterator(config, root, process_count=1)
    files_config = _config(layout, tfds_dir, source="arad")
    from_files = pipeline.create_train_iterator(files_config, layout, process_count=1)
    for _ in range(2):
        a, b = next(from_tfds), next(from_files)
        np.testing.assert_array_equal(a["hsi"], b["hsi"])
        np.testing.assert_array_equal(a["rgb"], b["rgb"])
    valid = pipeline.load_split(config, root, "valid")
    assert [s.stem for s in valid] == ["SYNTH_0004", "SYNTH_0005"]


def test_reading_does_not_import_tensorflow(tfds_dir):
    code = (
        "import sys; from cswin_jax.data import tfds_arad1k as t; "
        f"s = t.TfdsScenes({str(tfds_dir)!r}, 'train'); s.load(0); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_prepared_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no prepared 'arad1k' dataset.*prepare"):
        tfds_arad1k.TfdsScenes(tmp_path, "train")
