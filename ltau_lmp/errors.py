"""Exception types whose message is meant for the user, not a traceback.

The CLI prints an ``LTAUError`` as one line; the LAMMPS runtime forwards it to ``error->all``.
"""


class LTAUError(Exception):
    """Base class: a user-facing problem (bad input, bad file, bad configuration)."""


class FileFormatError(LTAUError):
    """A file (estimator, error log, model) is missing, truncated, corrupt or inconsistent."""


class ConfigError(LTAUError):
    """An option or configuration value is invalid."""


def check_file_format(header, file_format: str, version: int | tuple[int, ...], where, what: str) -> None:
    """The format tag and version of a file header, checked the same way for every file kind.

    ``version``: the one version read, or a tuple of them (a format whose earlier versions still
    load). ``where`` names the file in the message, ``what`` the kind ("estimator", "error log").
    """
    found = header.get("format") if isinstance(header, dict) else None
    if found != file_format:
        raise FileFormatError(f"{where}: not an ltau {what} (format {found!r})")
    readable = version if isinstance(version, tuple) else (version,)
    if header.get("version") not in readable:
        names = " or ".join(str(v) for v in readable)
        raise FileFormatError(f"{where}: {what} version {header.get('version')} is not supported "
                              f"(this ltau_lmp reads version {names})")
