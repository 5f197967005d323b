"""argparse types shared by the ``ipl`` commands: refuse a bad number at parse time, with the flag named."""

import argparse
import math


def positive_int(text):
    """argparse type: an integer >= 1 (0 iterations would leave the generator unchanged)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0 (a learning rate)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
    return value


def non_negative_float(text):
    """argparse type: a finite number >= 0 (a loss weight)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value

