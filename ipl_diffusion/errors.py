"""The one exception type for mistakes a user can fix.

:class:`UserError` is raised where the library refuses an input or an output location it cannot
use safely (an occupied or read-only output folder, a folder another run holds, a corrupt
checkpoint, images in the wrong range, a misspelt model-config key, ...). The ``ipl`` command
line prints it as one line (``ipl <command>: error: <message>``) with exit status 2.

It subclasses ``ValueError`` so that code written against the library's earlier, documented
``ValueError`` keeps catching it. Its two subclasses below do the same for the library's
earlier ``FileNotFoundError`` (a path the user gave does not exist) and ``FileExistsError`` (an
output the user named already holds a result): they are both a ``UserError`` and the builtin.
"""

import math

__all__ = ["UserError", "UserFileExistsError", "UserFileNotFoundError", "NonFiniteLossError", "check_finite"]


class UserError(ValueError):
    """A problem with the caller's input or environment, described in one line (what was
    wrong, and what to do instead)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or infinite during training (Stage 1 or Stage 2, either
    backend); raised before any update is made with it. The message names the term and the
    iteration; the usual remedy is a lower learning rate or turning mixed precision off."""


def check_finite(terms: dict, stage: str, iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first NaN / inf term of ``terms``
    (``{name: scalar tensor or float}``)."""
    for name, value in terms.items():
        value = float(value.detach()) if hasattr(value, "detach") else float(value)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"{stage} loss term {name} is {value} at iteration {iteration}; "
                "lower the learning rate or turn mixed precision off"
            )


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what was asked for)."""


class UserFileExistsError(UserError, FileExistsError):
    """An output the user named already holds something this run would replace."""
