"""The long fault campaign: a tiny training run killed with SIGKILL at random moments,
restarted on the same workdir after each kill, compared bit for bit with a run that was never
interrupted (generator, EMA, discriminator, optimizer states, RNG, data iterator position).

  python bench/faults.py [--kills 10] [--seed 0] [--workdir DIR]

Prints each kill (when it came and what the checkpoint folder then held) and the result.
`tests/test_faults.py` runs the short version (3 kills) in the suite.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cswin_jax import cli
from tests import fault_campaign  # noqa: E402

_KILLS = flags.DEFINE_integer("kills", 10, "How many times to SIGKILL the run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for the two runs and their log (default: a temporary folder)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(_WORKDIR.value or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        config = fault_campaign.write_config(folder)
        log = folder / "runs.log"
        start = time.perf_counter()
        fault_campaign.run_to_end(config, folder / "uninterrupted", log)
        print(f"uninterrupted run: {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        campaign = fault_campaign.run_with_kills(
            config, folder / "killed", log, kills=_KILLS.value, seed=_SEED.value
        )
        for line in campaign.kills:
            print(line)
        found = fault_campaign.differences(folder / "uninterrupted", folder / "killed")
        print(
            f"{len(campaign.kills)} kills, {campaign.lives} processes, "
            f"{time.perf_counter() - start:.0f} s: "
            + (
                "final state bit-identical to the uninterrupted run"
                if not found
                else f"DIFFERS in {len(found)} places: {', '.join(found[:10])}"
            )  # fmt: skip
        )
        if found:
            sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
