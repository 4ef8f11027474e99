"""launch.sh: the environment each local process gets (with stand-ins for python and
nvidia-smi, so nothing is trained)."""

import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _launch(tmp_path, n, gpus):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpus:
        lines = "".join(f"GPU {i}: stand-in\\n" for i in range(gpus))
        _executable(bin_dir / "nvidia-smi", f'#!/usr/bin/env bash\nprintf "{lines}"\n')
    out = tmp_path / "out"
    out.mkdir()
    fake_python = _executable(
        tmp_path / "python",
        "#!/usr/bin/env bash\n"
        f'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES ${{CUDA_VISIBLE_DEVICES-unset}} $*"'
        f" > {out}/$JAX_PROCESS_ID\n",
    )
    env = dict(os.environ, PYTHON=str(fake_python), PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run(
        ["bash", str(ROOT / "launch.sh"), str(n), "--config=configs/quickstart.py"],
        env=env,
        check=True,
        timeout=60,
    )
    return {int(p.name): p.read_text().split() for p in out.iterdir()}


def test_local_processes_share_one_coordinator(tmp_path):
    runs = _launch(tmp_path, 2, gpus=0)
    assert sorted(runs) == [0, 1]
    addresses = {r[0] for r in runs.values()}
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
    for r in runs.values():
        assert r[1] == "2" and r[2] == "unset"  # no GPUs: CPU processes
        assert r[3:] == ["-m", "cswin_jax.main", "--config=configs/quickstart.py"]


def test_gpus_split_evenly_between_processes(tmp_path):
    runs = _launch(tmp_path, 2, gpus=8)
    assert runs[0][2] == "0,1,2,3" and runs[1][2] == "4,5,6,7"
