"""User-facing errors.

Every error a user can cause (bad path, bad value, bad file) is raised as an
:class:`FSSError` whose message is one sentence that names the file or value and says
what to do. The CLI prints it on one line and exits non-zero, without a traceback.
"""


class FSSError(Exception):
    """An error caused by user input; its message is shown to the user as is."""


class ConfigError(FSSError, ValueError):
    """An unknown, mistyped or out-of-range configuration value (knob, option, name)."""


class DataError(FSSError):
    """A missing, unreadable or inconsistent dataset file or directory."""


class CheckpointError(FSSError):
    """A missing, corrupt, truncated or wrong-format checkpoint or weight file."""


class StorageError(FSSError):
    """A write that failed for lack of space (the file's previous version is kept)."""
