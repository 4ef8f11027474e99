"""The GPU benchmark script cannot rot: its dry run (the same commands, tiny sizes, CPU)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_dry_run():
    env = dict(os.environ, GPU_BENCH_DRY_RUN="1", PYTHON=sys.executable)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one device; fast compiles
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert any(line.startswith("16x16: compile") for line in out.splitlines()), out
    assert "-- model.remat=block" in out and "compiled in" in out
    assert out.count("ms/step") == 1 and "steps/s" in out, out
    assert "== quick start step" in out


def test_vs_original_names_a_wrong_checkout(tmp_path):
    """Pointed at a folder without the original code: one line naming it and the fix."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vs_original.py"), f"--original_src={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"--original_src {tmp_path}: no hsi_model/" in result.stderr
    assert "Traceback" not in result.stderr
