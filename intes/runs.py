"""A run's checkpoint: what it records besides the weights, how eval and sample load it, and
the checks a resume must pass before anything is written."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from intes.checkpoint import load_checkpoint, resolve_checkpoint
from intes.data import Corpus, load_corpus
from intes.engine import Engine, TrainConfig, params_mismatch
from intes.errors import CheckpointError, ConfigError, DataError
from intes.models import build_model

RUN_META_KEYS = ("config", "step", "tokenizer", "vocab_size")


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # not true, not 3.7, not "3"


def _are_two_counts(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)


# the values a run's metadata holds (None: absent, as in older checkpoints), and their forms
META_FORMS = {
    "step": (_is_count, "a step count"),
    "tokenizer": (lambda v: isinstance(v, str), "a tokenizer spec"),
    "vocab_size": (_is_count, "a count"),
    "data": (lambda v: v is None or isinstance(v, str), "a path"),
    "data_digest": (lambda v: v is None or isinstance(v, str), "a digest"),
    "data_tokens": (lambda v: v is None or _are_two_counts(v), "two token counts"),
    "eval_sample": (lambda v: v is None or _are_two_counts(v), "streams and length"),
    "val_bpb": (lambda v: v is None or type(v) in (int, float), "a number"),
}


def intes_version() -> str:
    """The installed package's version, which every checkpoint records."""
    try:
        return metadata.version("intes")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def run_meta(config: TrainConfig, step: int, corpus: Corpus, val_bpb: float | None,
             eval_sample: tuple[int, int]) -> dict:
    """Everything besides the weights that a resume, eval or sample needs; ``eval_sample``
    is the (streams, length) the run's evaluations asked for, which a resume keeps so that
    its log's figures stay comparable."""
    return {
        "config": config.to_dict(),
        "step": step,
        "seed": config.seed,
        "tokenizer": corpus.tokenizer,
        "vocab_size": corpus.vocab_size,
        "data": corpus.origin,  # where eval and a resume read the run's data again
        "source": corpus.source,
        "data_digest": corpus.digest,
        "data_tokens": [len(corpus.train), len(corpus.valid)],
        "val_bpb": val_bpb,
        "eval_sample": list(eval_sample),
        "intes_version": intes_version(),
    }


def check_meta(meta: dict, where: Path) -> None:
    """Refuse metadata that is not a pretraining run's, or not of the forms a run writes."""
    missing = [key for key in RUN_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{where} is not an intes pretraining checkpoint (its metadata "
                              f"lacks {', '.join(missing)})")
    for key, (fits, form) in META_FORMS.items():
        if not fits(meta.get(key)):
            raise CheckpointError(f"checkpoint {where} is corrupted: its {key} is "
                                  f"{meta.get(key)!r}, not {form}")


def checkpoint_config(meta: dict, where: Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with; a foreign or damaged one is one line."""
    check_meta(meta, where)
    try:
        return TrainConfig.from_dict(meta["config"])
    except ConfigError as err:
        raise CheckpointError(f"{where} is not an intes pretraining checkpoint ({err})") from None


def load_engine(path: str | Path, backend: str = "auto") -> tuple[Engine, dict]:
    """The engine (weights, step, config) of a run directory or .zarr checkpoint, and its meta."""
    store = resolve_checkpoint(path)
    arrays, meta = load_checkpoint(store)
    config = checkpoint_config(meta, store)
    config.validate()
    check_params(config, arrays, store)
    return Engine(config, backend, params=arrays, step=meta["step"]), meta


def load_run(path: str | Path, backend: str = "auto", data: str | None = None
             ) -> tuple[Engine, Corpus]:
    """A checkpoint's engine and the corpus to score it on: ``data``, else the run's own
    (with the run's tokenizer either way)."""
    engine, meta = load_engine(path, backend)
    corpus = (load_corpus(data, tokenizer=meta["tokenizer"]) if data is not None
              else run_corpus(meta, tokenizer=meta["tokenizer"]))
    if data is None and meta.get("data_digest") not in (None, corpus.digest):
        raise DataError(f"the run's data, {meta.get('data') or 'the default corpus'}, has "
                        "changed since the checkpoint (its tokens differ); give the run's data "
                        "with --data")
    if corpus.tokenizer != meta["tokenizer"]:  # a store of another tokenizer, same vocab or not
        raise DataError("the data is tokenized with another tokenizer than the run's (a store "
                        "keeps its own): give text, or a store of the run's tokenizer")
    if corpus.vocab_size != engine.config.model.vocab_size:
        raise DataError(f"the data has vocab {corpus.vocab_size}, the model "
                        f"{engine.config.model.vocab_size}; give data with the run's tokenizer")
    return engine, corpus


def run_corpus(meta: dict, tokenizer: str = "bytes") -> Corpus:
    """The corpus a checkpoint recorded; if it cannot be loaded any more, the error says it is
    the run's data and how to give it."""
    try:
        return load_corpus(meta.get("data"), tokenizer=tokenizer)
    except DataError as err:
        raise DataError(f"the run's data cannot be loaded any more ({err}); give it with "
                        "--data") from None


def check_params(config: TrainConfig, arrays: dict[str, np.ndarray], store: Path) -> None:
    """Refuse weights that do not fit the model the config describes."""
    m = config.model
    wrong = params_mismatch(build_model(m.kind, m.vocab_size, m.dim, m.layers).specs, arrays)
    if wrong:
        raise CheckpointError(f"checkpoint {store} does not match its config: {wrong}")


def first_difference(ours: dict, theirs: dict, prefix: str = "") -> tuple[str, object, object]:
    """The first (dotted field, ours, theirs) where two nested config dicts differ, else ()."""
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return ()


def check_resumable(config: TrainConfig, corpus: Corpus, meta: dict, store: Path,
                    eval_sample: tuple[int, int]) -> None:
    """A resume must continue the same run: same config, same tokens, the same validation
    sample for its log. One line if not."""
    found = first_difference(config.to_dict(), meta.get("config", {}))
    if found:
        field, ours, theirs = found
        raise CheckpointError(f"cannot resume {store}: {field} is {ours!r} here but {theirs!r} "
                              "in the checkpoint; keep the checkpoint's setting or use another "
                              "--out")
    if corpus.tokenizer != meta.get("tokenizer") or corpus.vocab_size != meta.get("vocab_size"):
        how = (f"vocab {corpus.vocab_size}, checkpoint {meta.get('vocab_size')}"
               if corpus.vocab_size != meta.get("vocab_size") else
               f"another tokenizer of the same vocab, {corpus.vocab_size}")
        raise CheckpointError(f"cannot resume {store}: the data is tokenized differently "
                              f"({how}); resume on the checkpoint's data")
    if meta.get("data_digest") not in (None, corpus.digest):  # older checkpoints lack it
        then = meta.get("data_tokens")
        counts = f"; {then[0]:,} / {then[1]:,} then" if then else ""
        raise CheckpointError(f"cannot resume {store}: its data changed since the checkpoint "
                              f"({len(corpus.train):,} train / {len(corpus.valid):,} valid tokens "
                              f"now{counts}); resume on the same data, or start a new run with "
                              "another --out")
    then = meta.get("eval_sample")  # older checkpoints lack it
    if then is not None and tuple(then) != tuple(eval_sample):
        raise CheckpointError(f"cannot resume {store}: its evaluations score {then[0]} x "
                              f"{then[1]} tokens, here {eval_sample[0]} x {eval_sample[1]}; keep "
                              "the run's --eval-streams and --eval-len (intes eval scores "
                              "other windows)")
