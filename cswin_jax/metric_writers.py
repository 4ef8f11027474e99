"""Scalar logging: TensorBoard event files, the console, optional wandb, a progress bar."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping

import ml_collections
from absl import logging


class MetricWriter:
    """Writes scalars to `<log_dir>/tensorboard` (tensorboardX) and, if enabled, to wandb.

    Only the chief process writes; on other processes every call is a no-op.
    """

    def __init__(
        self,
        log_dir: str | pathlib.Path,
        config: ml_collections.ConfigDict,
        *,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        path = pathlib.Path(log_dir) / "tensorboard"
        path.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(path))
        if config.get("use_wandb"):
            try:
                import wandb  # noqa: PLC0415
            except ImportError:
                logging.warning(
                    "config.use_wandb is set but wandb is not installed "
                    "(pip install wandb); logging to TensorBoard only"
                )
            else:
                self._wandb = wandb.init(
                    project=config.wandb_project, config=config.to_dict(), dir=str(log_dir)
                )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """Console progress: a line every log interval with rate and ETA (tqdm bar when a TTY)."""

    def __init__(self, total: int, start: int):
        self.total = total
        self.start = start
        self.t_start = time.time()
        self._bar = None
        try:
            import sys  # noqa: PLC0415

            if sys.stderr.isatty():
                from tqdm import tqdm  # noqa: PLC0415

                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._last = start

    def update(self, step: int, summary: Mapping[str, float]) -> None:
        done = step - self.start
        elapsed = time.time() - self.t_start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        keys = ("gen_loss", "disc_loss", "reconstruction", "lr_g", "patches_per_second")
        text = " ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary)
        if self._bar is not None:
            self._bar.update(step - self._last)
            self._bar.set_postfix_str(text)
        logging.info(
            "step %d/%d %s | %.2f step/s, ETA %s",
            step,
            self.total,
            text,
            rate,
            _format_seconds(eta),
        )
        self._last = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
