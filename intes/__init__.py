"""intes: integer-native evolution strategies for language models.

The public API is small: configure a run (``TrainConfig``, ``ModelConfig``, ``ESConfig``),
step an ``Engine`` yourself (``engine.step(windows)``: score every member, then the update
rebuilt from seeds; ``member_windows`` gives each member its window), or call ``pretrain`` for
the whole loop with checkpoints. ``load_corpus`` brings data in (``sample_windows`` draws a
step's sequences from it), ``load_engine`` a run's engine, ``load_checkpoint`` raw weights.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and its module, imported on first use: ``import intes`` stays light, so the
# ``intes`` command can catch Ctrl-C during the heavy imports (``intes.__main__``).
_EXPORTS = {
    "Corpus": "intes.data", "ESConfig": "intes.es", "Engine": "intes.engine",
    "ModelConfig": "intes.engine", "RunOptions": "intes.trainer", "TrainConfig": "intes.engine",
    "load_checkpoint": "intes.checkpoint", "load_corpus": "intes.data",
    "load_engine": "intes.runs", "member_windows": "intes.engine", "pretrain": "intes.trainer",
    "sample_windows": "intes.data", "save_checkpoint": "intes.checkpoint",
}
__all__ = [  # what _EXPORTS names
    "Corpus", "ESConfig", "Engine", "ModelConfig", "RunOptions", "TrainConfig", "load_checkpoint",
    "load_corpus", "load_engine", "member_windows", "pretrain", "sample_windows",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from intes.checkpoint import load_checkpoint, save_checkpoint
    from intes.data import Corpus, load_corpus, sample_windows
    from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
    from intes.es import ESConfig
    from intes.runs import load_engine
    from intes.trainer import RunOptions, pretrain


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'intes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
