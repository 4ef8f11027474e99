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


_TRIM_SCRIPT = """
import cswin_jax

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))

# 400 MiB of heap blocks (below malloc's mmap threshold), all freed but the last, which pins
# the freed space below it inside the heap: glibc keeps it resident.
blocks = [bytearray(b"x") * 100_000 for _ in range(4200)]
keep = blocks[-1]
del blocks
before = rss_mib()
cswin_jax.release_freed_memory()
print(before, rss_mib())
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="needs Linux and glibc"
)
def test_release_freed_memory_returns_the_freed_heap_to_the_kernel():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _TRIM_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    before, after = (int(v) for v in out.stdout.split())
    assert before - after > 300, (before, after)  # MiB
