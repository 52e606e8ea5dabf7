"""intes: integer-native evolution strategies for language models.

The public API is small: configure a run (``TrainConfig``, ``ModelConfig``, ``ESConfig``),
step an ``Engine`` yourself (``engine.step(windows)``: score every member, then the update
rebuilt from seeds; ``member_windows`` gives each member its window), or call ``pretrain`` for
the whole loop with checkpoints. ``load_corpus`` brings data in (``sample_windows`` draws a
step's sequences from it), ``load_engine`` a run's engine, ``load_checkpoint`` raw weights.
"""

from intes.checkpoint import load_checkpoint, save_checkpoint
from intes.data import Corpus, load_corpus, sample_windows
from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
from intes.es import ESConfig
from intes.runs import load_engine
from intes.trainer import RunOptions, pretrain

__version__ = "0.1.0"

__all__ = [
    "Corpus", "ESConfig", "Engine", "ModelConfig", "RunOptions", "TrainConfig", "load_checkpoint",
    "load_corpus", "load_engine", "member_windows", "pretrain", "sample_windows",
    "save_checkpoint",
]
