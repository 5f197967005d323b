"""argparse types of the ``ipl`` commands that are not generated from the configs: refuse a bad
number at parse time, with the flag named."""

import argparse
import math


def _whole_number(text, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}; got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1 (0 iterations would leave the generator unchanged)."""
    return _whole_number(text, 1)


def nonnegative_int(text):
    """argparse type: an integer >= 0 (e.g. ``--max_steps 0``: a warm start copied, not trained)."""
    return _whole_number(text, 0)


def positive_float(text):
    """argparse type: a finite number > 0 (a learning rate, a time or image budget)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {value}")
    return value


def positive_int_list(text):
    """argparse type: comma-separated whole numbers >= 1 (``--channel_mult 1,2,2``); returns the
    text itself, as the scripts record it."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas (e.g. 1,2,2); got {text!r}")
    return text


def nonempty_text(text):
    """argparse type: a path or name that is not empty or blank (``--init_from ''`` would
    otherwise read as "not given" and start from a fresh network)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder (or leave the option out)")
    return text
