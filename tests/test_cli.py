"""A user's mistake is one line on stderr with exit status 2; `--debug` shows the traceback."""

import errno
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cswin_jax import cli, cubes


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_unknown_config_key_is_one_line_with_the_nearest_keys(tmp_path):
    result = _run(
        "cswin_jax.main", "--config=configs/quickstart.py", "--config.data.datadir=/x",
        f"--workdir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result)
    assert line.startswith("error: --config.data.datadir: no such key in configs/quickstart.py")
    assert "did you mean data.data_dir" in line


@pytest.mark.parametrize("which", ["missing", "raising"])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, which):
    path = tmp_path / "recipe.py"
    if which == "raising":
        path.write_text("def get_config():\n    raise OSError('no such recipe data')\n")
    result = _run("cswin_jax.main", f"--config={path}", f"--workdir={tmp_path}")
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result)
    expected = "no such file" if which == "missing" else "no such recipe data"
    assert line.startswith("error: --config") and expected in line


def test_a_bad_value_in_the_run_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ("cswin_jax.main", "--config=configs/quickstart.py", "--config.data.source=hf",
            f"--workdir={tmp_path}")  # fmt: skip
    result = _run(*args)
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    assert _error_lines(result) == ["error: unknown data.source 'hf': use one of "
                                    "('arad', 'synthetic', 'tfds')"]  # fmt: skip
    debug = _run(*args, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_own_flag_programs_print_one_line(tmp_path):
    result = _run(
        "cswin_jax.predict", "--checkpoint", str(tmp_path), "--input", str(tmp_path / "no.png"),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    assert len(_error_lines(result)) == 1 and "no.png" in _error_lines(result)[0]


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("--config.batchsize=4", "did you mean batch_size"),
        ("--config.model.base_channel=8", "did you mean model.base_channels"),
        ("--config.loss.r1gamma=1", "did you mean loss.r1_gamma"),
        ("--config.zzz=1", "see configs/gan.py for the keys"),
    ],
)
def test_unknown_override_message(override, hint):
    argv = ["main", "--config=configs/gan.py", "--config.batch_size=2", override]
    message = cli.unknown_override_message(argv)
    assert message.startswith(f"{override.split('=')[0]}: no such key in configs/gan.py; ")
    assert hint in message
    assert cli.unknown_override_message(argv[:3]) is None


def test_user_errors_are_told_apart_from_programming_errors(tmp_path):
    def raised(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError("no exception")

    # A check of this package, with its message for the user.
    ours = raised(lambda: cubes.check_finite(np.array([np.nan]), "scene.mat"))
    assert cli.is_user_error(ours)
    # The same type raised outside the package (a bug in a caller, a library's internals).
    assert not cli.is_user_error(raised(lambda: int("x")))
    assert not cli.is_user_error(RuntimeError("boom"))
    assert cli.is_user_error(raised(lambda: open(tmp_path / "missing.txt")))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))
    assert cli.is_user_error(full)
    assert cli.one_line(full) == (
        f"{tmp_path / 'ckpt'}: No space left on device; free space on that disk or point the "
        "run at another folder"
    )


def test_library_info_lines_are_filtered_out_and_ours_and_warnings_kept():
    import logging  # noqa: PLC0415

    def record(path, level):
        return logging.LogRecord("x", level, path, 1, "message", None, None)

    own = str(pathlib.Path(cli.__file__).parent / "loop.py")
    library = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    keep = cli._OwnInfoOnly()
    assert keep.filter(record(own, logging.INFO))
    assert not keep.filter(record(library, logging.INFO))
    assert keep.filter(record(library, logging.WARNING))


def test_own_flag_programs_filter_library_info_lines_too():
    code = (
        "import logging\n"
        "from absl import flags, logging as absl_logging\n"
        "from cswin_jax import cli\n"
        "FLAGS = cli.program_flags()\n"
        "flags.DEFINE_string('name', 'x', 'A name.', flag_values=FLAGS)\n"
        "def main(argv):\n"
        "    cli.parse_flags(FLAGS, argv, 'doc')\n"
        "    absl_logging.set_verbosity(absl_logging.INFO)\n"
        "    logging.getLogger('orbax').info('library chatter')\n"
        "    logging.getLogger('orbax').warning('library warning')\n"
        "    print('name', FLAGS.name)\n"
        "cli.run(main, flag_values=FLAGS)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--name=y"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "name y\n"
    assert "library chatter" not in result.stderr
    assert "library warning" in result.stderr


# The programs with flags of their own (cli.program_flags), all imported into this process:
# absl's global FLAGS would refuse their shared names (--checkpoint, --output, --data_dir, ...).
def _programs():
    from cswin_jax import evaluate, floor, predict, viz  # noqa: PLC0415
    from cswin_jax.data import synthetic  # noqa: PLC0415

    return {"predict": predict, "evaluate": evaluate, "floor": floor, "viz": viz,
            "synthetic": synthetic}  # fmt: skip


def test_every_program_flag_has_help_and_help_lists_them(capsys):
    for name, module in _programs().items():
        defined = module._FLAGS.flags_by_module_dict()
        own = {flag.name: flag for flags in defined.values() for flag in flags}
        assert {"debug"} < set(own), name
        for flag in own.values():
            assert flag.help and flag.help.strip(), f"{name} --{flag.name} has no help"
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(module.__doc__.strip().splitlines()[0]), name
        for flag in own.values():
            shown = f"--[no]{flag.name}:" if flag.boolean else f"--{flag.name}:"
            assert shown in out, (name, flag.name)


@pytest.mark.parametrize(
    ("program", "argv", "message"),
    [
        ("evaluate", ["--bogus=1"], "error: Unknown command line flag 'bogus' (see --help)"),
        ("predict", ["--input", "x"], "error: --checkpoint, --output: required (see --help)"),
        ("evaluate", ["--checkpoint=c", "--data_dir=d", "--split=x"],
         "error: flag --split=x: value should be one of <train|valid|test> (see --help)"),
        ("synthetic", ["--out=o", "--train=many"], "error: flag --train=many: invalid literal"),
        ("viz", ["--pred=p", "stray"], "error: unexpected arguments ['stray']"),
        ("viz", ["--pred=p", "--pixels=3;4"], "--pixels must look like '120,200;300,50'"),
    ],
)  # fmt: skip
def test_flag_mistakes_are_one_line_with_status_2(capsys, program, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _programs()[program].main(argv)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err


def test_flags_start_from_their_defaults_and_take_the_argparse_spellings():
    evaluate = _programs()["evaluate"]
    required = ["--checkpoint=c", "--data_dir=d"]
    cli.parse_flags(evaluate._FLAGS, [*required, "--nofloor", "--tiled", "--raw_weights"], None)
    assert (evaluate._FLOOR.value, evaluate._TILED.value, evaluate._RAW_WEIGHTS.value) == (
        False, True, True)  # fmt: skip
    cli.parse_flags(evaluate._FLAGS, required, None)  # a second run: nothing carried over
    assert (evaluate._FLOOR.value, evaluate._TILED.value, evaluate._RAW_WEIGHTS.value) == (
        True, None, False)  # fmt: skip
    cli.parse_flags(evaluate._FLAGS, [*required, "--no-floor", "--no-tiled"], None)
    assert (evaluate._FLOOR.value, evaluate._TILED.value) == (False, False)


_ALARM = (  # as jaxlib 0.10 prints it
    b"E1207 15:17:23.923969    5439 slow_operation_alarm.cc:140] The operation took 3m8.29s\n"
    b"\n"
    b"********************************\n"
    b"[Compiling module jit_train_step for CPU] Very slow compile? If you want to file a bug, "
    b"run with envvar XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.\n"
    b"********************************\n"
)
_FOLDING = (
    b"E1207 15:00:01.100000 1 slow_operation_alarm.cc:73] Constant folding an instruction is "
    b"taking > 1s:\n  %x = f32[] add(a, b)\n"
)


def test_the_slow_compile_banner_is_dropped_and_everything_else_passes(capfd):
    import os  # noqa: PLC0415

    with cli.without_compile_alarm():
        os.write(2, b"before\n")
        os.write(2, _ALARM)
        os.write(2, b"a python line\n")
        os.write(2, _ALARM.replace(b"\n\n", b"\n"))  # the older form, without the blank line
        os.write(2, _FOLDING)
        os.write(2, b"no newline at the end")
    err = capfd.readouterr().err
    assert err == ("before\na python line\n" + _FOLDING.decode() + "no newline at the end")
    os.write(2, b"stderr is back\n")
    assert capfd.readouterr().err == "stderr is back\n"


def test_help_lists_every_recipe_and_the_most_used_keys():
    text = cli.recipes_and_keys()  # resolves every listed key in configs/base.py
    recipes = sorted(
        p.name for p in (pathlib.Path(cli.__file__).parents[1] / "configs").glob("[!_]*.py")
    )
    for name in recipes:
        assert f"configs/{name}" in text
    from configs import base  # noqa: PLC0415

    assert len(base.MOST_USED_KEYS) == 10
    for key, _ in base.MOST_USED_KEYS:
        assert f"  {key} " in text
