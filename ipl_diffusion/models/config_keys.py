"""Refuse model configs with keys the model does not know (a misspelt ``chanel_multiplier``).

diffusers' ``ConfigMixin`` only logs unknown ``config.json`` keys and builds the model with the
default for the key that was meant, so a typo silently changes the architecture (or, for keys
that shape no weight, the behaviour). We make it an error, not a warning: when the default
changes a weight's shape, loading would fail later with a size mismatch that does not name the
typo; when it changes no shape, nothing would fail at all.
"""

from __future__ import annotations

import difflib

from ipl_diffusion.errors import UserError

__all__ = ["StrictConfigMixin", "check_config_keys"]


def check_config_keys(cls, config: dict) -> None:
    """Raise for keys of ``config`` that are not ``cls.__init__`` arguments.

    Keys starting with ``_`` (diffusers' ``_class_name``, ``_diffusers_version``, ...) are
    bookkeeping and allowed.

    Raises:
        UserError: naming the first unknown key, the class and the nearest valid name.
    """
    expected = set(cls._get_init_keys(cls)) - {"self", "kwargs"} - set(cls.ignore_for_config)
    for key in config:
        if key.startswith("_") or key in expected or key == "quantization_config":
            continue
        nearest = difflib.get_close_matches(key, sorted(expected), n=1)
        hint = f"did you mean {nearest[0]!r}?" if nearest else f"valid keys: {', '.join(sorted(expected))}"
        raise UserError(
            f"{cls.__name__} config has an unknown key {key!r} ({hint}); it would be ignored and its default "
            "used instead -- fix or remove it in config.json"
        )


class StrictConfigMixin:
    """Put before ``ConfigMixin`` in a model's bases: ``from_config`` / ``from_pretrained``
    then refuse unknown config keys (:func:`check_config_keys`)."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        check_config_keys(cls, config_dict)
        return super().extract_init_dict(config_dict, **kwargs)
