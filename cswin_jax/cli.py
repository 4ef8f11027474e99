"""What every command-line entry point shares: a user's mistake is one line, not a traceback.

`run(main)` replaces `absl.app.run(main)`. It prints a user error (a bad path, file, key or
value) as one line on stderr, `error: <what is wrong and the fix>`, and exits with status 2.
Programming errors keep their traceback, and `--debug` shows the traceback of a user error too.

Two kinds of programs: `cswin_jax.main` and `cswin_jax.convert` define their flags on absl's
global `flags.FLAGS` (each runs alone in its process). The programs that tests import side by
side (predict, evaluate, floor, viz, data.synthetic, which share names such as `--checkpoint`,
`--output`, `--data_dir`) each define theirs on a `FlagValues` of their own (`program_flags()`)
and parse them in `main(argv)` (`parse_flags`), so `main([...])` runs in-process, and
`run(main, flag_values=...)` runs it as a program.

What counts as a user error: `UserError`; absl's `UsageError`; a missing, existing or
unwritable path, a full or read-only disk (`OSError`s that name the path); and a `ValueError`
(or the `FloatingPointError` of a diverged run) raised by this package's own checks, whose
messages name the file or key and the fix.

Unknown `--config.<key>` overrides name the closest valid keys ("did you mean ...?") instead
of ml_collections' nested `KeyError`/`AttributeError` tracebacks.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import importlib.util
import logging
import os
import pathlib
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_REPO_CONFIGS = _PACKAGE_DIR.parent / "configs"
_OS_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES,
              errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}  # fmt: skip

_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)  # fmt: skip

_DEBUG_HELP = "Show the full traceback of a user error (bad path, key, file)."
flags.DEFINE_bool("debug", False, _DEBUG_HELP)


class UserError(ValueError):
    """A mistake in what the user gave (path, file, key, value); the message names the fix."""


def is_user_error(exc: BaseException) -> bool:
    """True for errors that are the user's input, not a defect of the program."""
    if isinstance(exc, (UserError, app.UsageError)):
        return True
    if isinstance(exc, _PATH_ERRORS):
        return True
    if isinstance(exc, OSError) and exc.errno in _OS_ERRNOS:
        return True
    if type(exc) in (ValueError, FloatingPointError):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and _is_ours(frames[-1].filename)
    return False


def _is_ours(filename: str) -> bool:
    path = pathlib.Path(filename).resolve()
    return path.is_relative_to(_PACKAGE_DIR) or path.is_relative_to(_REPO_CONFIGS)


def one_line(exc: BaseException) -> str:
    """The message of `exc` as printed: its text, or the path and reason of an OSError."""
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = exc.strerror or str(exc)
        text = f"{exc.filename}: {reason}"
        if exc.errno == errno.ENOSPC:
            text += "; free space on that disk or point the run at another folder"
        elif exc.errno == errno.EROFS:
            text += "; the folder is read-only: choose a writable --workdir"
        return text
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return " ".join(text.split()) or type(exc).__name__


def fail(message: str) -> NoReturn:
    """Prints `error: message` on stderr and exits with status 2."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def _debug_requested(argv: Sequence[str], flag_values: flags.FlagValues) -> bool:
    if "debug" in flag_values and flag_values.is_parsed() and flag_values.debug:
        return True
    return any(arg in ("--debug", "--debug=true", "--debug=True") for arg in argv)


def _guarded(
    main: Callable[..., Any], argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
) -> Callable[..., Any]:
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is the user's mistake
            if _debug_requested(argv, flag_values) or not is_user_error(exc):
                raise
            fail(one_line(exc))

    return guarded


# --------------------------------------------------------------------------------------------
# absl programs
# --------------------------------------------------------------------------------------------


def run(
    main: Callable[[list[str]], Any],
    *,
    config_flag: str | None = "config",
    flag_values: flags.FlagValues | None = None,
) -> None:
    """`absl.app.run(main)` with one-line user errors and a check of `--<config_flag>.<key>`
    (None: the program has no ml_collections config flag; a plain `--config` string, say).

    With `flag_values` (a program's own `program_flags()`), runs `main(sys.argv[1:])`, which
    parses them itself (`parse_flags`); an int it returns is the exit status. Its console keeps
    this package's INFO lines and every warning (`_OwnInfoOnly`), as `run` without it does
    unless `--verbosity` is given."""
    if flag_values is not None:
        _run_own_flags(main, flag_values)

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            if config_flag is not None and config_flag in flags.FLAGS:
                # A file that failed to load leaves a stand-in whose first attribute access
                # raises the load error: raise it here, before main, to report it in one line.
                config = flags.FLAGS[config_flag].value
                _ = config.keys if config is not None else None
            return rest
        except flags.Error as exc:
            fail(f"{one_line(exc)} (see --help)")
        except (KeyError, AttributeError) as exc:
            fail(unknown_override_message(argv, config_flag) or f"bad --{config_flag}: {exc}")
        except OSError as exc:
            spec = _config_file(argv, config_flag) or ""
            if spec and not os.path.exists(spec.partition(":")[0]):
                fail(f"--{config_flag}={spec}: no such file; pass a recipe such as configs/gan.py")
            fail(f"--{config_flag}: {one_line(exc.__cause__ or exc)}")

    def quiet_libraries(argv: list[str]) -> Any:
        if not flags.FLAGS["verbosity"].present:
            from absl import logging as absl_logging  # noqa: PLC0415

            absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
        return _guarded(main, sys.argv)(argv)

    app.run(quiet_libraries, flags_parser=parse)


class _OwnInfoOnly(logging.Filter):
    """Lets through this package's INFO lines (progress, validation, files written) and every
    library's warnings and errors, not the libraries' INFO chatter (Orbax's save/restore
    internals, JAX's backend probing). `--verbosity=0` (or higher) shows everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _is_own_file(record.pathname)


@functools.lru_cache(maxsize=512)
def _is_own_file(pathname: str) -> bool:
    path = pathlib.Path(pathname).resolve()
    return path.is_relative_to(_PACKAGE_DIR) or path.is_relative_to(_REPO_CONFIGS)


@contextlib.contextmanager
def without_compile_alarm() -> Iterator[None]:
    """Drops XLA's "Very slow compile?" banner from stderr while the block runs.

    XLA prints it (an error-level line and a starred box asking for a bug report) whenever one
    compilation passes two minutes, which is every first compile of a training step on CPU.
    Callers log their own line instead ("compiling ..., later runs load it from the cache").
    Everything else written to stderr meanwhile passes through unchanged, line by line.
    """
    stderr_fd = 2  # where XLA writes, whatever `sys.stderr` is
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, stderr_fd)
    os.close(write_fd)
    pump = threading.Thread(target=_drop_alarm_banners, args=(read_fd, saved), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, stderr_fd)  # closes the pipe's last write end: the pump sees EOF
        pump.join()
        os.close(saved)


_ALARM_SOURCE = b"slow_operation_alarm"
_BANNER_RULE = b"*****"


def _drop_alarm_banners(read_fd: int, out_fd: int) -> None:
    """Copies lines from `read_fd` to `out_fd`, leaving out each starred alarm banner (the
    alarm's log line, blank lines, a rule, the message, a rule)."""
    held: list[bytes] = []  # an alarm line and what followed it, until its shape is known
    with os.fdopen(read_fd, "rb") as source:
        for line in source:
            if not held:
                if _ALARM_SOURCE in line:
                    held = [line]
                else:
                    os.write(out_fd, line)
                continue
            held.append(line)
            rules = sum(h.startswith(_BANNER_RULE) for h in held)
            if rules == 0 and line.strip():  # another alarm (constant folding): keep it
                os.write(out_fd, b"".join(held))
                held = []
            elif rules == 2:
                held = []
        if held:
            os.write(out_fd, b"".join(held))


def recipes_and_keys() -> str:
    """The `--help` text listing configs/*.py (first docstring line each) and the most used
    `--config.<key>` overrides with their defaults (configs/base.py)."""
    import ast  # noqa: PLC0415

    from configs import base  # noqa: PLC0415

    lines = ["Recipes (--config=...):"]
    for path in sorted(_REPO_CONFIGS.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.stem != "__init__" and doc:
            lines.append(f"  configs/{path.name:<20} {doc.splitlines()[0]}")
    lines += ["", "Most used overrides (--config.<key>=<value>; all keys: configs/base.py):"]
    defaults = base.get_config()
    for key, text in base.MOST_USED_KEYS:
        value = functools.reduce(getattr, key.split("."), defaults)
        lines.append(f"  {key:<22} {text} [base: {value!r}]")
    return "\n".join(lines) + "\n"


def _overrides(argv: Sequence[str], config_flag: str) -> Iterator[str]:
    prefixes = (f"--{config_flag}.", f"--no{config_flag}.")
    for arg in argv:
        for prefix in prefixes:
            if arg.startswith(prefix):
                yield arg[len(prefix) :].split("=", 1)[0]


def _config_file(argv: Sequence[str], config_flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{config_flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{config_flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str):
    """`get_config(arg)` of `path[:arg]`, as ml_collections' config flag loads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config={spec}: no such file; pick one of configs/*.py")
    module_spec = importlib.util.spec_from_file_location("_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict, nested dicts included."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if hasattr(value, "items") and not isinstance(value, (str, bytes)):
            keys.extend(config_keys(value, key + "."))
    return keys


def unknown_override_message(
    argv: Sequence[str], config_flag: str = "config", default_config: str | None = None
) -> str | None:
    """The line for the first `--config.<key>` override that names no key of the config."""
    spec = _config_file(argv, config_flag) or default_config
    if spec is None:
        return f"--{config_flag}.<key> overrides need --{config_flag}=configs/<recipe>.py first"
    try:
        config = load_config_file(spec)
    except UserError as exc:
        return str(exc)
    known = config_keys(config)
    for key in _overrides(argv, config_flag):
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        leaf = key.rsplit(".", 1)[-1]
        close += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in close]
        hint = f"did you mean {' or '.join(close[:3])}?" if close else f"see {spec} for the keys"
        return f"--{config_flag}.{key}: no such key in {spec}; {hint}"
    return None


# --------------------------------------------------------------------------------------------
# programs with flags of their own
# --------------------------------------------------------------------------------------------

_HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def program_flags() -> flags.FlagValues:
    """A new flag set for one program (`flag_values=` of its `flags.DEFINE_*` calls), holding
    `--debug`. absl's global `flags.FLAGS` takes each flag name once, and several programs
    define `--checkpoint`, `--output`, `--data_dir`, ...; with a set each they can all be
    imported into one process (the tests do) and parse their flags there."""
    flag_values = flags.FlagValues()
    flags.DEFINE_bool("debug", False, _DEBUG_HELP, flag_values=flag_values)
    return flag_values


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str | None) -> None:
    """Parses `argv` (the arguments without the program name; None: `sys.argv[1:]`) into
    `flag_values`, from the defaults on every call (a process may run `main` several times).

    `--help` (or `-h`, `--helpfull`) prints `doc` and every flag with its help text and exits
    with status 0. An unknown flag, a bad value, a missing required flag or a stray positional
    argument prints one line, `error: ... (see --help)`, and exits with status 2. argparse's
    `--no-<name>` of a boolean flag is read as absl's `--no<name>` (the canonical spelling)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in _HELP_ARGS for arg in argv):
        print(program_help(flag_values, doc))
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values(["program", *_absl_spellings(flag_values, argv)])
    except flags.Error as exc:
        missing = re.findall(r"Flag --(\S+) must have a value other than None", str(exc))
        if missing:
            fail(f"{', '.join(f'--{name}' for name in missing)}: required (see --help)")
        fail(f"{one_line(exc)} (see --help)")
    if rest[1:]:
        fail(f"unexpected arguments {rest[1:]}: values go with a --flag (see --help)")


def program_help(flag_values: flags.FlagValues, doc: str | None) -> str:
    """`doc` (the program's module docstring), then every flag with its help and default."""
    blocks: list[list[str]] = []  # one per flag: its line and the indented lines after it
    for line in flag_values.get_help(include_special_flags=False).splitlines():
        if line.startswith("  --"):
            blocks.append([line])
        elif line.startswith(" ") and blocks:
            blocks[-1].append(line)  # absl's per-module headings are left out
    blocks.sort(key=lambda block: block[0].replace("--[no]", "--").split(":")[0])
    return "\n".join([(doc or "").strip(), "", "Flags:", *(line for b in blocks for line in b)])


def _absl_spellings(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """argv with argparse's `--no-<name>` of each boolean flag turned into `--no<name>`."""
    spelled = []
    for arg in argv:
        name = arg[len("--no-") :] if arg.startswith("--no-") else ""
        if name in flag_values and flag_values[name].boolean:
            arg = f"--no{name}"
        spelled.append(arg)
    return spelled


def _run_own_flags(main: Callable[[list[str]], Any], flag_values: flags.FlagValues) -> NoReturn:
    from absl import logging as absl_logging  # noqa: PLC0415

    flags.FLAGS.mark_as_parsed()  # absl's own flags (logging) keep their defaults: no
    # "Logging before flag parsing" warning; the program's flags are in `flag_values`
    absl_logging.use_absl_handler()  # absl's line format, as the absl programs print
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    argv = sys.argv[1:]
    status = _guarded(main, argv, flag_values)(argv)
    raise SystemExit(status if isinstance(status, int) else 0)
