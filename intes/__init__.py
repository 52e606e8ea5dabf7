"""intes: integer-native evolution strategies for language models.

The public API is small: configure a run (``TrainConfig``, ``ModelConfig``, ``ESConfig``),
step an ``Engine`` yourself (ask/tell over integer weights), or call ``pretrain`` for the whole
loop with checkpoints; ``load_corpus`` and ``load_checkpoint`` bring data and weights in.
"""

from intes.checkpoint import load_checkpoint, save_checkpoint
from intes.data import Corpus, load_corpus
from intes.engine import Engine, ModelConfig, TrainConfig
from intes.es import ESConfig
from intes.trainer import RunOptions, pretrain

__version__ = "0.1.0"

__all__ = [
    "Corpus", "ESConfig", "Engine", "ModelConfig", "RunOptions", "TrainConfig", "load_checkpoint",
    "load_corpus", "pretrain", "save_checkpoint",
]
