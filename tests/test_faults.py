"""Nothing lost: a training run killed with SIGKILL at random moments and restarted on its
workdir each time ends bit-identical to an uninterrupted run (generator, EMA, discriminator,
optimizer states, RNG, data iterator position); a truncated newest checkpoint is skipped."""

import jax
import numpy as np
import pytest

from cswin_jax.train_checkpoint import TrainCheckpointer
from tests import fault_campaign


@pytest.mark.slow
def test_sigkill_campaign_resumes_bit_identical(tmp_path):
    config = fault_campaign.write_config(tmp_path)
    log = tmp_path / "runs.log"
    fault_campaign.run_to_end(config, tmp_path / "uninterrupted", log)  # also fills the cache
    campaign = fault_campaign.run_with_kills(config, tmp_path / "killed", log, kills=3, seed=0)
    print("\n".join(campaign.kills))
    assert campaign.lives >= 2
    assert fault_campaign.differences(tmp_path / "uninterrupted", tmp_path / "killed") == []


def _state(value):
    return {"w": np.full(64, value, np.float32), "step": np.int32(value)}


@pytest.mark.parametrize("part", ["state", "config"])
def test_truncated_newest_checkpoint_is_skipped(tmp_path, part):
    """A newest step with a truncated file (what a crash mid-write or a full disk leaves
    behind a finished rename) is skipped: the resume uses the step before, nothing deleted."""
    ckpt = TrainCheckpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(float(step)), {"model": {"step": step}}, force=True)
    ckpt.wait()
    files = sorted(
        p
        for p in (tmp_path / "train" / "2" / part).rglob("*")
        if p.is_file() and p.name != "commit_success.txt"
    )
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    state, step = ckpt.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 1 and float(state["w"][0]) == 1.0
    assert (tmp_path / "damaged" / "2").is_dir()
    ckpt.close()
