"""This project against the original CSWIN v2 PyTorch code: one run, same machine, one table.

  python bench/vs_original.py --original_src PATH/TO/ORIGINAL/src --torch_python PYTHON
      [--cases fwd128,train,train_r1,fwd482] [--iters 3] [--batch 2] [--threads 2]

`--original_src` is a checkout of the original code (the folder holding `hsi_model/` and
`configs/config.yaml`); `--torch_python` an interpreter with torch, hydra-core/omegaconf and
einops installed (default: this one). Nothing of the original is imported into this process:
each case runs in its own child process (the original's cases under `--torch_python`, this
project's under this interpreter), the two alternating so that drift hits both, and each
child's peak RSS comes from the kernel (`wait4`).

Cases (default widths, float32, `--threads` CPU threads for torch; XLA uses every core):
  fwd128    generator forward, eval mode, 1 x 128 x 128
  fwd482    generator forward, eval mode, 1 x 482 x 512 (an ARAD-1K frame)
  train     one Sinkhorn-GAN training iteration without R1 at `--batch` x 128 x 128: the
            original's as its trainer runs a discriminator-step iteration (G forward, D(real),
            D(fake) for G, generator loss and backward, clip, Adam; D(fake), Sinkhorn loss,
            backward, clip, Adam); this project's `bench/train_step.py` step
  train_r1  the same with the R1 penalty (the original's `apply_r1_regularization`)

Prints one line per case: the median seconds and peak RSS of each and their ratio
(original / this project: above 1 means this project is faster or leaner).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("fwd128", "train", "train_r1", "fwd482")
_SRC = flags.DEFINE_string("original_src", None, "checkout of the original code (its src/)")
_TORCH_PY = flags.DEFINE_string("torch_python", sys.executable, "interpreter with torch")
_CASES = flags.DEFINE_list("cases", list(CASES), f"cases to run, of {CASES}")
_ITERS = flags.DEFINE_integer("iters", 3, "timed repetitions per case (after one warm-up)")
_BATCH = flags.DEFINE_integer("batch", 2, "training batch size")
_THREADS = flags.DEFINE_integer("threads", 2, "torch CPU threads")

# Runs under the torch interpreter with the original's src/ on sys.path. Prints one JSON line.
_ORIGINAL_HARNESS = r"""
import json, os, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
src, case, iters, batch, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
sys.path.insert(0, src)
import torch
torch.set_num_threads(threads)
from omegaconf import OmegaConf
from hsi_model.models import NoiseRobustCSWinModel
from hsi_model.models.losses_consolidated import NoiseRobustLoss, ComputeSinkhornDiscriminatorLoss
from hsi_model import training_script_fixed as tsf

cfg = OmegaConf.load(os.path.join(src, "configs", "config.yaml"))
cfg.pop("hydra", None)
cfg = OmegaConf.to_container(cfg, resolve=True)
cfg.update(local_rank=0, world_size=1, distributed=False, mixed_precision=False)
torch.manual_seed(0)
model = NoiseRobustCSWinModel(cfg)
gen, disc = model.generator, model.discriminator

def timed(fn):
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)

if case.startswith("fwd"):
    h, w = (128, 128) if case == "fwd128" else (482, 512)
    gen.eval()
    x = torch.rand(1, 3, h, w)
    def step():
        with torch.no_grad():
            gen(x)
else:
    model.train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg["generator_lr"], betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg["discriminator_lr"], betas=(0.5, 0.999))
    criterion = NoiseRobustLoss(cfg)
    disc_criterion = ComputeSinkhornDiscriminatorLoss(criterion)
    rgb, hsi = torch.rand(batch, 3, 128, 128), torch.rand(batch, 31, 128, 128)
    state = {"it": 1}
    def step():
        it = state["it"]; state["it"] += 2
        if hasattr(gen, "set_iteration"):
            gen.set_iteration(it)
        fake = gen(rgb)
        real_pred = disc(rgb, hsi)
        tsf.set_requires_grad(disc, False)
        fake_for_g = disc(rgb, fake)
        tsf.set_requires_grad(disc, True)
        loss, _ = criterion(fake, hsi, disc_real=real_pred.detach(), disc_fake=fake_for_g,
                            current_iteration=it)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt_g.step(); opt_g.zero_grad(set_to_none=True)
        d_loss = disc_criterion(real_pred, disc(rgb, fake.detach()))
        if case == "train_r1":
            hsi_r1 = hsi.detach().clone().requires_grad_(True)
            d_loss = d_loss + tsf.apply_r1_regularization(
                disc(rgb, hsi_r1).float(), hsi_r1, gamma=cfg["r1_gamma"])
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        opt_d.step(); opt_d.zero_grad(set_to_none=True)
print("RESULT " + json.dumps({"seconds": timed(step), "torch": torch.__version__}), flush=True)
"""


def _run(cmd, env=None) -> tuple[str, float]:
    """(stdout + stderr, peak RSS in GB) of one child process."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed:\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1e6  # KiB -> GB


def run_original(case: str) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_ORIGINAL_HARNESS)
    try:
        args = [_SRC.value, case, _ITERS.value, _BATCH.value, _THREADS.value]
        out, rss = _run([_TORCH_PY.value, f.name, *map(str, args)])
    finally:
        os.unlink(f.name)
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])["seconds"], rss


def run_project(case: str) -> tuple[float, float]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if case.startswith("fwd"):
        size = "128x128" if case == "fwd128" else "482x512"
        cmd = [sys.executable, "bench/forward.py", "--sizes", size, "--repeats", str(_ITERS.value)]
        out, rss = _run(cmd, env)
        return float(re.search(r"forward median ([\d.]+) s", out).group(1)), rss
    cmd = [
        sys.executable,
        "bench/train_step.py",
        "--config=configs/gan.py",
        f"--batch_sizes={_BATCH.value}",
        f"--steps={_ITERS.value}",
        "--config.mixed_precision=False",
        f"--r1_step={case == 'train_r1'}",
    ]
    out, rss = _run(cmd, env)
    key = r"with R1 ([\d.]+) ms;" if case == "train_r1" else r"([\d.]+) ms/step without R1"
    return float(re.search(key, out).group(1)) / 1e3, rss


def _fail(message: str) -> None:
    """A user's mistake: one line on stderr, exit status 2 (absl's UsageError would print
    the whole flag help first)."""
    print(f"vs_original: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    if not _SRC.value:
        _fail("--original_src: the folder of the original code (with hsi_model/)")
    src = pathlib.Path(_SRC.value)
    if not (src / "hsi_model").is_dir() or not (src / "configs" / "config.yaml").is_file():
        _fail(
            f"--original_src {src}: no hsi_model/ and configs/config.yaml there; point it at "
            "the original checkout's src/ folder"
        )
    probe = subprocess.run(
        [_TORCH_PY.value, "-c", "import torch, omegaconf, einops; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        _fail(
            f"--torch_python {_TORCH_PY.value}: cannot import torch, omegaconf and einops; "
            "install them there (pip install torch hydra-core einops)"
        )
    unknown = set(_CASES.value) - set(CASES)
    if unknown:
        _fail(f"--cases: unknown {sorted(unknown)}; choose from {CASES}")
    print(
        f"original: torch {probe.stdout.strip()}, {_THREADS.value} threads; this project: "
        f"jax {__import__('jax').__version__}; {os.cpu_count()} CPUs; batch {_BATCH.value}, "
        f"{_ITERS.value} timed runs per case, float32",
        flush=True,
    )
    print(f"{'case':10s} {'original':>20s} {'cswin-jax':>20s}   speed   memory", flush=True)
    for case in _CASES.value:
        t_ref, rss_ref = run_original(case)
        t_jax, rss_jax = run_project(case)
        print(
            f"{case:10s} {t_ref:8.2f} s {rss_ref:6.2f} GB {t_jax:8.2f} s {rss_jax:6.2f} GB "
            f"  {t_ref / t_jax:5.2f}x  {rss_ref / rss_jax:5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
