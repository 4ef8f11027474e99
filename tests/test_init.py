"""Package start-up settings (cswin_jax/__init__.py)."""

import os
import platform
import subprocess
import sys

import pytest

_SCRIPT = """
import os, sys
import cswin_jax
print("start", os.getpid(), flush=True)
cswin_jax.restart_with_huge_pages()
print("tunables", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])
"""


def _run(env):
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "--flag=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [line.split() for line in out.stdout.splitlines()]


def _thp_available() -> bool:
    lib, version = platform.libc_ver()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = "[never]" not in f.read()
    except OSError:
        return False
    major, minor = (int(v) for v in version.split(".")[:2])
    return sys.platform == "linux" and lib == "glibc" and (major, minor) >= (2, 35) and enabled


@pytest.mark.skipif(not _thp_available(), reason="needs Linux, glibc >= 2.35 and THP")
def test_restart_with_huge_pages_restarts_once_in_the_same_process_with_its_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    lines = _run(env)
    assert [line[0] for line in lines] == ["start", "start", "tunables"]
    assert len({line[1] for line in lines}) == 1  # execve keeps the process id
    assert lines[2][2] == "glibc.malloc.hugetlb=1"
    assert lines[2][3:] == ["['--flag=1']"]


def test_restart_with_huge_pages_keeps_a_tunable_the_user_set():
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    lines = _run(env)
    assert [line[0] for line in lines] == ["start", "tunables"]
    assert lines[1][2] == "glibc.malloc.hugetlb=0"
