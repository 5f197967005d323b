"""argparse types of the ``ipl`` commands that are not generated from the configs: refuse a bad
number at parse time, with the flag named."""

import argparse


def positive_int(text):
    """argparse type: an integer >= 1 (0 iterations would leave the generator unchanged)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value
