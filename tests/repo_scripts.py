"""Importing the repository's scripts (examples/, benchmarks/) in tests, by path: they are not
part of the installed package."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path):
    """The module of ``REPO / relative_path`` (e.g. ``"benchmarks/table1.py"``), named after the
    file and registered in ``sys.modules`` (dataclasses look their module up while it executes)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
