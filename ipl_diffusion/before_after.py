"""The before/after grid of an adaptation run: its file name and the labels of its rows.

An adapted pipeline's ``sample_grid`` (``ipl adapt`` writes it as ``before_after.png``,
``save_pretrained`` as ``sample_grid.png``) has one labelled row per stage. The trainers draw
the labels from :data:`ROWS` and ``ipl adapt --help`` lists them from it, so the help names the
rows the picture shows. No imports: ``ipl --help`` reads this module.
"""

__all__ = ["FILE_NAME", "ROWS", "TRAINING_SOURCE_ROW", "row_labels", "rows_help"]

FILE_NAME = "before_after.png"

# The rows, top to bottom, per backend; "{target}" is the run's target label.
ROWS = {
    "diffae": ("held-out source", "DDIM round trip", "adapted ({target})"),
    "stylegan2": ("source G_s(z)", "adapted g_ema ({target})"),
}
# DiffAE's first row when the grid shows training images (the run was given no held-out ones).
TRAINING_SOURCE_ROW = "source"


def row_labels(backend: str, target, held_out: bool = True) -> list[str]:
    """The row labels of ``backend``'s grid for ``target``; ``held_out=False`` (DiffAE): the
    grid shows training images."""
    labels = [row.format(target=target) for row in ROWS[backend]]
    if not held_out:
        labels[0] = TRAINING_SOURCE_ROW
    return labels


def rows_help(backend: str) -> str:
    """The rows as ``--help`` lists them: ``held-out source | DDIM round trip | adapted (TARGET)``."""
    return " | ".join(row_labels(backend, "TARGET"))
