"""Score finished runs' checkpoints on the whole valid split, and on a smaller sample of it for
comparison, beside the n-gram figures of the same tokens; prints JSON.

Runs logged before ``intes pretrain`` ended on the whole split (their figures came from a
32-window sample) are re-scored here from their final checkpoints, with the same code as
``intes eval``.

    python benchmarks/eval_runs.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--sample-streams 32]
"""

from __future__ import annotations

import argparse
import json

from intes.errors import IntesError
from intes.runs import load_run
from intes.validation import Validation, validation_bpb


def score(run: str, sample_streams: int) -> dict:
    engine, corpus = load_run(run)
    whole = Validation.whole_split(corpus)
    sample = Validation.of(corpus, sample_streams, whole.shape[1])

    def figures(v: Validation) -> dict:
        return {"windows": v.shape[0], "length": v.shape[1],
                "val_bpb": validation_bpb(engine, corpus, v.windows),
                "unigram_bpb": v.unigram, "bigram_bpb": v.bigram}

    return {"step": engine.step_index, "whole_split": figures(whole), "sample": figures(sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    parser.add_argument("--sample-streams", type=int, default=32)
    args = parser.parse_args()
    bad = [spec for spec in args.runs if not all(spec.partition("=")[::2])]
    if bad:
        parser.error(f"{bad[0]!r} is not NAME=RUN_DIR")
    result = {}
    for spec in args.runs:
        name, _, run = spec.partition("=")
        try:
            result[name] = score(run, args.sample_streams)
        except IntesError as err:  # a missing or unreadable run: one line, as intes eval
            raise SystemExit(f"error: {name}: {err}") from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
