"""Exception types whose message is meant for the user, not a traceback.

The CLI prints an ``LTAUError`` as one line; the LAMMPS runtime forwards it to ``error->all``.
"""


class LTAUError(Exception):
    """Base class: a user-facing problem (bad input, bad file, bad configuration)."""


class FileFormatError(LTAUError):
    """A file (estimator, error log, model) is missing, truncated, corrupt or inconsistent."""


class ConfigError(LTAUError):
    """An option or configuration value is invalid."""
