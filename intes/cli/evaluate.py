"""``intes eval``, ``intes sample`` and ``intes info``: read a checkpoint, report or generate.

CHECKPOINT is a run directory or a .zarr checkpoint. A damaged checkpoint fails its checksums
in ``load_checkpoint`` and is reported in one line.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable, Iterator

import click
import numpy as np

from intes.checkpoint import resolve_checkpoint
from intes.engine import MAX_SEQ_LEN
from intes.errors import DataError
from intes.kernels import BACKENDS, available
from intes.kernels.gemm import gemm_summary
from intes.runs import load_engine, load_run
from intes.sampling import stream
from intes.tokenizer import BYTE_VOCAB, decode, encode
from intes.trainer import counted
from intes.validation import EVAL_LEN, FINAL_EVAL_TOKENS, Validation, validation_bpb

# Below this many scored tokens the figure is rough: 32 windows of 256 tokens read 0.025-0.064
# off the whole valid split (docs/pretraining.md, the re-scored runs).
FEW_TOKENS = 10_000

backend_option = click.option("--backend", type=click.Choice(BACKENDS), default="auto",
                              show_default=True)


def describe_tokenizer(tokenizer: str, vocab_size: int) -> str:
    return "bytes" if tokenizer == "bytes" else f"BPE, vocab {vocab_size}"


@click.command("eval")
@click.argument("checkpoint")
@click.option("--data", default=None, metavar="PATH",
              help="Corpus whose validation split to score  [default: the run's own data]")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="Score this many evenly spread windows  [default: the whole valid split, "
                   f"up to {FINAL_EVAL_TOKENS:,} tokens]")
@click.option("--length", type=click.IntRange(1, MAX_SEQ_LEN), default=EVAL_LEN,
              show_default=True, help="Tokens scored per window")
@backend_option
def evaluate(checkpoint: str, data: str | None, streams: int | None, length: int,
             backend: str) -> None:
    """Validation bits per byte of a checkpoint, beside a unigram and a bigram model's on the
    same tokens."""
    engine, corpus = load_run(checkpoint, backend, data)
    sample = (Validation.whole_split(corpus, length) if streams is None
              else Validation.of(corpus, streams, length))
    bpb = validation_bpb(engine, corpus, sample.windows)
    scored = sample.windows[:, 1:].size
    few = f"; only {counted(scored, 'token')} scored, a rough figure" if scored < FEW_TOKENS else ""
    click.echo(f"validation bits per byte: {bpb:.4f} (step {engine.step_index}, "
               f"{sample.describe()} of {corpus.source}; on the same tokens unigram "
               f"{sample.unigram:.4f}, bigram {sample.bigram:.4f}{few})")


@click.command()
@click.argument("checkpoint")
@click.option("--prompt", default="", help="Text to continue")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=0), default=200,
              show_default=True, help="How many tokens to generate")
@click.option("--greedy/--sample", default=False, show_default=True,
              help="Most likely token, or an integer-only random draw")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--temperature-shift", type=click.IntRange(-8, 8), default=0, show_default=True,
              help="Sample at temperature 2^SHIFT (negative: sharper)")
@backend_option
def sample(checkpoint: str, prompt: str, n_tokens: int, greedy: bool, seed: int,
           temperature_shift: int, backend: str) -> None:
    """Print the --prompt text and the model's continuation of it, token by token."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("the prompt is not valid UTF-8 text") from None
    engine, meta = load_engine(checkpoint, backend)
    tokenizer = meta["tokenizer"]
    prompt_tokens = encode(prompt, tokenizer).astype(np.int32)
    shown = CONTROLS_SHOWN if on_terminal() else SEPARATOR_AS_NEWLINE
    click.echo(decode(prompt_tokens, tokenizer).translate(shown), nl=False)
    tokens = stream(engine, prompt_tokens, n_tokens, greedy=greedy, seed=seed,
                    temperature_shift=temperature_shift)
    for text in printable(tokens, tokenizer, context=prompt_tokens.tolist()):
        click.echo(text.translate(shown), nl=False)
    click.echo()


SEPARATOR_AS_NEWLINE = {0: "\n"}  # a document boundary reads as a line break
# On a terminal a model's control characters are shown escaped (ESC, say, would start an
# escape sequence the terminal obeys); newlines and tabs stay, piped output stays as made
CONTROLS_SHOWN = SEPARATOR_AS_NEWLINE | {
    c: f"\\x{c:02x}" for c in [*range(1, 32), *range(127, 160)] if chr(c) not in "\n\t"}


def on_terminal() -> bool:
    """Whether the sample goes to a terminal (stdout is a tty)."""
    return sys.stdout.isatty()


def printable(tokens: Iterable[int], tokenizer: str, hold: int = 64,
              context: Iterable[int] = ()) -> Iterator[str]:
    """The text of ``tokens`` in pieces, each as soon as it is whole; joined after ``decode``
    of ``context`` (the prompt), ``decode`` of all of them. Bytes go through an incremental
    UTF-8 decoder. A BPE piece is what its tokens add to the decoded text of everything before
    them, as decoders that join tokens with spaces, mark word starts or fuse byte tokens need
    (each decode is of the whole text: fine for a sample's length); a piece that ends inside a
    character (in U+FFFD) waits for the next token, up to ``hold`` tokens (past that, a
    character split there prints as U+FFFD)."""
    if tokenizer == "bytes":
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in tokens:
            yield utf8.decode(bytes([token if 0 <= token < BYTE_VOCAB else 0xFF]))
        yield utf8.decode(b"", final=True)
        return
    ids = list(context)
    shown, waited = decode(ids, tokenizer), 0
    for token in tokens:
        ids.append(token)
        text, waited = decode(ids, tokenizer), waited + 1
        if text.startswith(shown) and (not text.endswith("\ufffd") or waited >= hold):
            yield text[len(shown):]
            shown, waited = text, 0
    yield decode(ids, tokenizer)[len(shown):]


@click.command()
@click.argument("checkpoint")
def info(checkpoint: str) -> None:
    """What a checkpoint holds: config, step, size, data, last validation bpb, backends."""
    store = resolve_checkpoint(checkpoint)
    engine, meta = load_engine(store, "reference")  # refused as eval would refuse it
    config, arrays = engine.config, engine.params
    m = config.model
    n_params = sum(int(a.size) for a in arrays.values())
    n_bytes = sum(int(a.nbytes) for a in arrays.values())
    val = meta.get("val_bpb")
    backends = ", ".join(name if why is None else f"{name} (no: {why})"
                         for name, why in available().items())
    lines = [
        f"checkpoint: {store}",
        f"step: {meta.get('step')}",
        f"model: {m.kind}, dim {m.dim}, {counted(m.layers, 'layer')}, vocab {m.vocab_size}",
        f"parameters: {n_params:,} ({n_bytes:,} bytes)",
        f"es: {config.es.describe()}",
        f"seq len: {config.seq_len}, seed: {config.seed}",
        f"tokenizer: {describe_tokenizer(meta['tokenizer'], meta['vocab_size'])}",
        f"data: {meta.get('source')}" + (f" [{meta['data']}]" if meta.get("data") else ""),
        f"last validation: {'-' if val is None else f'{val:.4f} bits per byte'} (the run's "
        "sample of the valid split; `intes eval` scores all of it, up to "
        f"{FINAL_EVAL_TOKENS:,} tokens)",
        f"intes version: {meta.get('intes_version', 'unknown')}",
        f"backends: {backends}",
        f"cpu GEMM: {gemm_summary()}",
    ]
    click.echo("\n".join(lines))
