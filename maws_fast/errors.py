"""Errors a user can cause and fix.

Everything raised as a :class:`UserError` reaches the user as one line (the CLI prints the
message and exits with status 2, no traceback). The message names the thing that is wrong and
says how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, paths), not a bug."""


class ConfigError(UserError, ValueError):
    """Unknown config key or a value outside its allowed range."""


class DataError(UserError, FileNotFoundError):
    """Missing, unreadable or corrupt data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, torn, or does not fit the model."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose own files are missing, truncated, unreadable or fail their checksum (not one
    made under another config, nor one that does not fit the model): a resume moves it aside and
    falls back to the previous complete checkpoint."""
