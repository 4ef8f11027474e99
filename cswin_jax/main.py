"""Training entry point.

  python -m cswin_jax.main --config=configs/gan.py --workdir=DIR [--config.batch_size=8 ...]

This file is intentionally kept short: flags, multi-host start-up, then one call into
`loop.train_and_evaluate`.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

import cswin_jax
from cswin_jax import cli

__doc__ += "\n" + cli.recipes_and_keys()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder for logs and checkpoints (default: config.log_dir and config.checkpoint_dir).",
)


def _maybe_initialize_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes.

    Recognised: JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID (launch.sh),
    torchrun-style MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, and SLURM (auto-detected).
    """
    import jax  # noqa: PLC0415

    env = os.environ
    if int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize(
            coordinator_address=f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}",
            num_processes=int(env["WORLD_SIZE"]),
            process_id=int(env["RANK"]),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def _enable_compilation_cache(path: str) -> None:
    """XLA's persistent compilation cache in `path` (config.compilation_cache_dir; "" = off)."""
    if not path:
        return
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/gan.py")
    _enable_compilation_cache(_CONFIG.value.compilation_cache_dir)
    _maybe_initialize_distributed()
    from cswin_jax import loop  # noqa: PLC0415 - after distributed start-up

    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main)
