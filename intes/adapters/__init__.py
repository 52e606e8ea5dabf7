"""Float models through the ES core (``hf``) and the fine-tuning tasks' rewards (``tasks``).

The settings checks below are shared by the adapter and ``intes finetune``, which runs them
on its flags before importing torch or loading a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from numbers import Integral, Real

from intes.errors import ConfigError

MAX_RANK = 64  # rank of a member's side path
MAX_SEED = 2**32 - 1  # the noise keys use the seed's low 32 bits: larger seeds would alias
SHAPINGS = ("zscore", "rank", "sign")  # fitness shapings, see ``hf.shape_rewards``
RewardFn = Callable[[str, str], float]  # reward(prompt, completion) -> float


def _positive_finite(value: float) -> bool:
    return value > 0 and math.isfinite(value)


# setting -> (valid?, what a valid value is)
RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "population": (lambda v: v >= 2 and v % 2 == 0, "an even number >= 2 (antithetic pairs)"),
    "sigma": (_positive_finite, "a positive finite number"),
    "lr": (_positive_finite, "a positive finite number"),
    "rank": (lambda v: 1 <= v <= MAX_RANK, f"in 1..{MAX_RANK}"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "member_chunk": (lambda v: v >= 1, ">= 1"),
}
REALS = ("sigma", "lr")  # every other setting counts something, so must be an integer


def _name(setting: str, as_flag: bool) -> str:
    return f"--{setting.replace('_', '-')}" if as_flag else setting


def check_settings(as_flags: bool = False, **settings: float | None) -> None:
    """Refuse a fine-tuning setting that makes no sense (``RULES``), in one ConfigError line
    naming it as the Python argument or, ``as_flags``, as ``intes finetune``'s flag. None is
    unset. Counts must be integers (not bool): a 4.0 would otherwise fail deep inside numpy or
    torch with a traceback."""
    for setting, value in settings.items():
        valid, wanted = RULES[setting]
        if value is None:
            continue
        kind, what = (Real, "a number") if setting in REALS else (Integral, "an integer")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{_name(setting, as_flags)} must be {what}, got {value!r}")
        if not valid(value):
            raise ConfigError(f"{_name(setting, as_flags)} must be {wanted}, got {value}")


def target_pattern(target_modules: str | None, as_flag: bool = False) -> re.Pattern | None:
    """The regex over layer names that selects the perturbed layers (None: all of them);
    ConfigError in one line if it is not a regular expression."""
    if not target_modules:
        return None
    try:
        return re.compile(target_modules)
    except re.error as exc:
        raise ConfigError(f"{_name('target_modules', as_flag)} {target_modules!r} is not a "
                          f"valid regular expression: {' '.join(str(exc).split())}") from None
