"""The ES update alone (``apply_fitness`` and the new weights' packing), timed over many
steps in one process, from the checkout this script lies in: the measure that separates two
versions of the update, which is 1-3% of a step and lost in a whole step's noise.

Each round draws a fresh fitness (the step's raw fitness plus noise, so the pairs' |f| grouping
is made anew), runs a short inference first so the update does not start from the caches the
previous one left, and times the update. The JSON gives the median and the fastest round, in
ms, and the file ``intes`` was imported from. To compare an older version, copy this script
into its checkout and run it there, in turn with this one.

    python benchmarks/update_time.py [--model rwkv] [--dim 256] [--population 1024] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's intes

import intes  # noqa: E402
from intes.bench import bench_backend, bench_windows, machine_info, make_engine  # noqa: E402


def timed_updates(engine, windows: np.ndarray, rounds: int,
                  threads_of_round: Callable[[int], int] | None = None
                  ) -> list[tuple[int, float]]:
    """(threads, seconds) of ``rounds`` updates with the new weights' packing, each on a fresh
    fitness after a short inference (see the module docstring); ``threads_of_round(r)``, if
    given, sets the update's threads for round r."""
    raw = engine.population_fitness(windows)
    rng = np.random.default_rng(0)
    spread = max(1, int(np.abs(raw).mean()) // 100)
    timed = []
    for r in range(rounds):
        if threads_of_round is not None:
            engine.update_threads = threads_of_round(r)
        fitness = (raw + rng.integers(-spread, spread + 1, raw.shape)).astype(np.int32)
        engine.log_likelihood(windows[:256, :9])
        start = time.perf_counter()
        engine.apply_fitness(fitness)
        _ = engine.prepared
        # an older checkout, where this script may be copied, has no update_threads
        timed.append((getattr(engine, "update_threads", engine.threads),
                      time.perf_counter() - start))
    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    load = os.getloadavg()[0]
    engine = make_engine(args.model, args.dim, 2, args.population, args.seq_len, 1,
                         bench_backend("auto", args.threads, None))
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    seconds = [s for _, s in timed_updates(engine, windows, args.rounds)]
    print(json.dumps({"config": vars(args), "threads": engine.threads,
                      "update_ms_median": 1e3 * statistics.median(seconds),
                      "update_ms_min": 1e3 * min(seconds), "intes": intes.__file__,
                      "machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
