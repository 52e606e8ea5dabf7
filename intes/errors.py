"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class IntesError(Exception):
    """Base class: the message is one clear line saying what is wrong and what to do."""


class DataError(IntesError):
    """A corpus path or token store that cannot be used."""


class CheckpointError(IntesError):
    """A checkpoint that is missing, corrupted or does not match the run."""


class ConfigError(IntesError):
    """A configuration value out of its valid range."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that was already reported (a run says where its checkpoint is): the CLI exits
    130 without a second message."""
