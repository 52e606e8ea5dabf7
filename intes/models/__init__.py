"""Integer language models. Each exposes ``specs``, ``init_state(rows)`` and ``forward``."""

from __future__ import annotations

from intes.models.egg import EGG
from intes.models.rwkv import RWKV

MODELS = {"rwkv": RWKV, "egg": EGG}


def build_model(kind: str, vocab_size: int, dim: int, layers: int):
    """The model of this kind and size (raises KeyError for an unknown kind)."""
    return MODELS[kind](vocab_size=vocab_size, dim=dim, layers=layers)
