"""cswin-jax: JAX/Flax CSWIN v2 for RGB-to-hyperspectral reconstruction."""

import os
import platform
import sys

__version__ = "0.1.0"


def _default_xla_flags() -> None:
    """Turns off XLA CPU's concurrency-optimised scheduler unless XLA_FLAGS already sets it.

    That scheduler orders a program for parallelism and ignores memory: it hoists the
    recomputation of rematerialised blocks back into the forward pass, so `model.remat` saves
    nothing, and the larger working set makes the step slower too (bench/memory.py run with
    `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true` shows the difference in
    XLA temporaries). It only affects CPU programs, and only takes effect when set before JAX
    starts its CPU backend (the first computation), hence here: any `import cswin_jax...`
    sets it.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
        os.environ["XLA_FLAGS"] = flags.strip()


_default_xla_flags()

_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


def restart_with_huge_pages() -> None:
    """Restarts this program once with glibc's malloc asking for transparent huge pages.

    Call it first thing in an entry point's `__main__` block. XLA's CPU runtime allocates the
    temporaries of a training step afresh on every execution (gigabytes at default width), and
    with 4 KiB pages the kernel zero-fills each page on first touch: millions of page faults
    per generator forward+backward, a large share of the step spent in the kernel. With
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc marks its large mappings for 2 MiB
    transparent huge pages, and the faults all but vanish (bench/train_step.py prints the
    effect). The tunable is read only when a process starts, hence the restart: `os.execve`
    keeps the process id, arguments and environment, so launchers, signals and `time` see one
    process. Nothing happens when GLIBC_TUNABLES already names the tunable (set
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out), off Linux, with a glibc older than
    2.35 (which lacks it) or where transparent huge pages are disabled.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or _HUGE_PAGES_TUNABLE in tunables:
        return
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return
    except (OSError, ValueError):
        return
    tunables = f"{tunables}:{_HUGE_PAGES_TUNABLE}=1" if tunables else f"{_HUGE_PAGES_TUNABLE}=1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable,
        [sys.executable, *sys.orig_argv[1:]],
        {**os.environ, "GLIBC_TUNABLES": tunables},
    )


def release_freed_memory() -> None:
    """Hands the heap memory this process has freed back to the kernel (glibc `malloc_trim`).

    Compiling or loading a program, and running the initialiser, leave gigabytes of freed
    memory in glibc's arenas, which keeps it for reuse by the same threads; the training step
    runs on other threads and maps its temporaries afresh, so that memory only adds to the
    process's resident size while it steps. Call it once the programs are compiled and the
    state is initialised; elsewhere it does nothing (another libc, another OS).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes  # noqa: PLC0415

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
