"""`ipl` tells a user's mistake from a bug: only a ``UserError`` becomes one line (exit 2);
any other exception raised inside a command -- a ``ValueError`` or ``KeyError`` from a bug
deep in the library included -- keeps its traceback, so it can be reported and fixed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipl_diffusion.errors import UserError, UserFileExistsError, UserFileNotFoundError

REPO = Path(__file__).resolve().parents[1]

# `ipl sample` with its work replaced by a function raising the exception named on the command
# line, as a bug (or a refusal) inside the command would.
SCRIPT = """
import sys
import ipl_diffusion.cli.sample as sample
from ipl_diffusion.cli import main
from ipl_diffusion.errors import UserError

kind, output = sys.argv[1:3]
errors = {"ValueError": ValueError, "KeyError": KeyError, "OSError": OSError, "UserError": UserError}

def broken(args):
    raise errors[kind]("boom inside the command")

sample._sample = broken
sys.exit(main(["sample", "--output", output, "--device", "cpu"]))
"""


def run_ipl(kind, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("IPL_TRACEBACK", None)
    return subprocess.run([sys.executable, "-c", SCRIPT, kind, str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("kind", ["ValueError", "KeyError", "OSError"])
def test_a_bug_inside_a_command_shows_its_traceback(kind, tmp_path):
    result = run_ipl(kind, tmp_path)
    assert result.returncode not in (0, 2), result.stderr  # not the exit status of a user error
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert f"{kind}: " in result.stderr and "boom inside the command" in result.stderr
    assert "ipl sample: error:" not in result.stderr


def test_a_user_error_is_one_line(tmp_path):
    result = run_ipl("UserError", tmp_path)
    assert result.returncode == 2
    assert result.stderr == "ipl sample: error: boom inside the command\n"


def test_file_errors_are_user_errors_and_keep_their_builtin_type():
    """Code that caught the library's earlier FileNotFoundError / FileExistsError still does."""
    missing, taken = UserFileNotFoundError("no such folder"), UserFileExistsError("already there")
    assert isinstance(missing, UserError) and isinstance(missing, FileNotFoundError)
    assert isinstance(taken, UserError) and isinstance(taken, FileExistsError)
    assert str(missing) == "no such folder" and isinstance(UserError("x"), ValueError)


@pytest.mark.parametrize(
    "argv, line",
    [
        (["adapt", "--learnin_rate", "1e-3", "--target", "sketch"],
         "ipl adapt: error: unrecognized option --learnin_rate (did you mean --learning_rate or --stage1_learning_rate?)"),
        (["translate", "--model", "m", "--input", "i", "--output", "o", "--batch_siz=2"],
         "ipl translate: error: unrecognized option --batch_siz (did you mean --batch-size?)"),
        (["convert", "diffae", "--checkpoint", "c", "--output", "o", "--wieghts", "raw", "--zzz"],
         "ipl convert diffae: error: unrecognized options --wieghts (did you mean --weights?), --zzz"),
        (["sample", "--output", "o", "--qqqqqq"], "ipl sample: error: unrecognized option --qqqqqq; see ipl sample --help"),
    ],
)
def test_a_misspelt_flag_is_one_line_naming_the_nearest_valid_ones(argv, line, capsys):
    from ipl_diffusion.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # as argparse
    assert capsys.readouterr().err == line + "\n"


def test_other_parse_errors_are_argparses_message_in_one_line(capsys):
    from ipl_diffusion.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--output", "o", "stray"])  # a stray value, no flag
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["ipl: error: unrecognized arguments: stray"]
    with pytest.raises(SystemExit) as exit_info:  # a bad value: the usage block went before it
        main(["translate", "--model", "m", "--input", "i", "--output", "o", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["ipl translate: error: argument --batch-size: must be >= 1; got 0"]
