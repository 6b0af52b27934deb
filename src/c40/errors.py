"""User-facing errors: the CLI turns any `C40Error` into a one-line message and exit code 2."""


class C40Error(Exception):
    """A problem with the user's input (data, flags, files) rather than a bug in c40."""


class DataError(C40Error):
    """A dataset folder or file is missing, corrupt, unsafe or of the wrong shape."""


class ConfigError(C40Error):
    """A configuration value is out of range or unknown."""


class CheckpointError(C40Error):
    """A checkpoint cannot be read or does not match what it is loaded into."""


class TrainingDiverged(C40Error):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def first_line(e: BaseException) -> str:
    """An exception as one short line (for one-line error messages)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
