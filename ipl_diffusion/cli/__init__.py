"""The ``ipl`` command line.

Each sub-command lives in its own module of this package and exposes
``add_parser(subparsers)`` (registers its ``argparse`` parser) and ``run(args) -> int``.
``main`` only builds the parser and dispatches. It turns the errors a user can fix (bad
paths, bad labels, bad images, missing weights: every :class:`ipl_diffusion.errors.UserError`)
into one line on stderr; anything else is a bug in this package and keeps its traceback, so a
``ValueError`` or ``KeyError`` from deep inside is never mistaken for a user's mistake. Set
``IPL_TRACEBACK=1`` to see the traceback of a ``UserError`` too. A warning this package (or the
running example script) issues is one line too, ``ipl <command>: warning: <message>``; other
libraries' warnings keep Python's format. Every parser is an
:class:`~ipl_diffusion.cli.parser.IplArgumentParser`: an unknown flag is one line naming the
nearest valid ones, and boolean options show as plain switches in ``--help``.
"""

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from pathlib import Path

from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.errors import UserError

# Order is the order shown by ``ipl --help``.
SUBCOMMANDS = ("adapt", "translate", "sample", "convert", "push", "evaluate", "demo")


def build_parser() -> argparse.ArgumentParser:
    # Sub-parsers are made with the class of their parent, so every command gets IplArgumentParser.
    parser = IplArgumentParser(
        prog="ipl",
        description="Zero-shot generative model adaptation with Image-specific Prompt Learning (IPL).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"ipl_diffusion.cli.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def check_device(device):
    """Refuse a ``--device`` this machine cannot use before any model is loaded.

    torch reports these deep inside ``.to(device)`` (an ``AssertionError`` for CUDA on a
    CPU-only build, a ``RuntimeError`` for a misspelt device), which would be a traceback.
    """
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with one_line_warnings(f"ipl {args.command}"):
            check_device(getattr(args, "device", None))
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"ipl {args.command}: interrupted", file=sys.stderr)
        return 130
    except UserError as err:  # only the library's refusals; every other exception is a bug
        return _refusal(f"ipl {args.command}", err)


@contextlib.contextmanager
def one_line_warnings(prog, also_from=None):
    """Within the block, print a warning raised from this package's code (or from the file
    ``also_from``, an example script) as one line, ``<prog>: warning: <message>``, the form of
    the refusals.

    Python's default format adds the warning's file, line and category and echoes that source
    line, which tells a command-line user nothing and reads as a crash. Warnings from other
    libraries (torch, diffusers) keep that format: their location is what a bug report needs.
    The previous ``warnings.showwarning`` is restored on exit (``warnings.catch_warnings``).
    """
    package = Path(__file__).parents[1]
    # pipelines/ is a symlink into the package in a source checkout: resolve both.
    # Not the script's folder: a virtual environment may live beside it (the README's layout).
    roots = [package.resolve(), (package / "pipelines").resolve(), *([Path(also_from).resolve()] if also_from else [])]
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not any(Path(filename).resolve().is_relative_to(root) for root in roots):
                return default(message, category, filename, lineno, file, line)
            print(f"{prog}: warning: {message}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


def _refusal(prog, err) -> int:
    if os.environ.get("IPL_TRACEBACK"):
        raise err
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def run_script(script_main, errors=(UserError,)) -> None:
    """Run an example script's ``main()`` and exit as ``ipl`` does: a refusal (an exception in
    ``errors``, by default :class:`~ipl_diffusion.errors.UserError`) is one line on stderr,
    ``<script>: error: <message>``, with argparse's exit status 2 (``IPL_TRACEBACK=1`` shows
    its traceback); Ctrl-C is one line and status 130; any other exception is a bug and keeps
    its traceback."""
    prog = os.path.basename(sys.argv[0])
    try:
        with one_line_warnings(prog, also_from=sys.argv[0]):
            script_main()
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, as `ipl`
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except errors as err:
        sys.exit(_refusal(prog, err))


if __name__ == "__main__":
    sys.exit(main())
