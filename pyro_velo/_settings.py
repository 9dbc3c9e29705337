"""Package-wide settings, in the style of ``scanpy.settings``: how much pyro_velo prints."""

from __future__ import annotations

from ._checks import InputError


class Settings:
    """Settings of the package, read when output is written (``pyro_velo.settings``).

    Attributes
    ----------
    verbosity
        How much progress output training, posterior sampling and export write to
        standard error:

        - ``0``: nothing;
        - ``1``: one line per training stage (its name, epochs, final train and
          validation loss, seconds), also in a terminal;
        - ``2`` (default): live progress bars in a terminal or a notebook; in a log that
          is not a terminal (CI, batch jobs, captured output) one line per stage, as
          with ``1``, instead of a line per epoch.

        A method's own ``progress_bar=False`` turns its output off at any verbosity.

    Examples
    --------
    >>> import pyro_velo as pv
    >>> pv.settings.verbosity = 0  # silent
    """

    def __init__(self) -> None:
        self._verbosity = 2

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
            raise InputError(f"verbosity must be 0, 1 or 2, got {value!r}")
        self._verbosity = value

    def __repr__(self) -> str:
        return f"Settings(verbosity={self._verbosity})"


settings = Settings()
