"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from dataclasses import fields
from numbers import Integral


class IntesError(Exception):
    """Base class: the message is one clear line saying what is wrong and what to do."""


class DataError(IntesError):
    """A corpus path or token store that cannot be used."""


class CheckpointError(IntesError):
    """A checkpoint that is missing, corrupted or does not match the run."""


class ConfigError(IntesError):
    """A configuration value out of its valid range."""


INTERRUPTED = 130  # the exit status after Ctrl-C: 128 + SIGINT, what shells report


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that was already reported (a run says where its checkpoint is): the CLI exits
    130 without a second message."""


def check_integers(**values: object) -> None:
    """Refuse a count or setting that is not an integer (bool is not one), in one line: a
    16.0 or "16" passes a range check and then fails deep inside numpy or a kernel."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(f"{name.replace('_', ' ')} must be an integer, got {value!r}")


def plain_integers(config: object) -> None:
    """Store a frozen dataclass's numpy integer fields as Python ints, which its checks,
    the exact arithmetic they feed and its JSON form (checkpoints) expect."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Integral) and not isinstance(value, int):
            object.__setattr__(config, f.name, int(value))
