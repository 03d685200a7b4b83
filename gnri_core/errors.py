"""Errors the core raises; messages name the input and what is expected."""


class InversionInputError(ValueError):
    """An input to ``invert``/``reconstruct`` is not usable (names the input)."""


class InversionError(RuntimeError):
    """The inversion could not produce a finite result (model returned NaN/inf)."""
