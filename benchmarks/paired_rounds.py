"""ES step against inference in paired rounds, from the checkout this script lies in: the
measure that separates two versions on a noisy host, run from each checkout in turn.

Each round times one ES step (all members' fitness, the update and the new weights'
packing, as ``intes bench`` counts it) and then inference on the same windows; the JSON gives
the median over rounds of inference / ES (each round's pair meets the same machine load),
the median seconds of each, and the file ``intes`` was imported from. To compare an older
version, copy this script into its checkout and run it there.

    python benchmarks/paired_rounds.py [--model rwkv] [--dim 256] [--layers 2] [--rounds 15]

Token blocks are compared with ``INTES_CPU_TOKEN_BLOCK=k python benchmarks/paired_rounds.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's intes

import intes  # noqa: E402
from intes.bench import bench_backend, bench_windows, make_engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    engine = make_engine(args.model, args.dim, args.layers, args.population, args.seq_len, 1,
                         bench_backend("auto", None, None))
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    engine.log_likelihood(windows[:, :3])
    es_s, inference_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        engine.apply_fitness(engine.population_fitness(windows))
        _ = engine.prepared
        middle = time.perf_counter()
        engine.log_likelihood(windows)
        es_s.append(middle - start)
        inference_s.append(time.perf_counter() - middle)
    med = statistics.median
    print(json.dumps({
        "config": vars(args), "intes": intes.__file__,
        "ratio_median": med(i / e for e, i in zip(es_s, inference_s, strict=True)),
        "es_s_median": med(es_s), "inference_s_median": med(inference_s)}, indent=2))


if __name__ == "__main__":
    main()
