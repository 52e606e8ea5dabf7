"""The ES update on one thread against the backend's threads, alternating in one process, over
model sizes and populations: where threads pay for the update (``intes.engine.update_threads``).

Each round is one of ``update_time.py``'s (a fresh fitness, a short inference so the update
does not start from the previous one's caches, then ``apply_fitness`` with the new weights'
packing, timed), on one thread or on all in turn. The JSON gives per cell the medians in
ms, one thread's over all threads' (above 1: threads faster), and what the engine's rule
picks there.

    python benchmarks/update_threads.py [--model rwkv] [--cells 64x2,96x1,128x2,256x2]
                                        [--populations 64,256,512,1024,2048,4096] [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from update_time import timed_updates  # this directory's script: its rounds

from intes.bench import bench_backend, bench_windows, machine_info, make_engine


def cell(model: str, dim: int, layers: int, population: int, rounds: int) -> dict:
    engine = make_engine(model, dim, layers, population, 16, 1, bench_backend("auto", None, None))
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    picked, many = engine.update_threads, engine.threads
    seconds: dict[int, list[float]] = {1: [], many: []}
    for threads, s in timed_updates(engine, windows, rounds, lambda r: 1 if r % 2 else many):
        seconds[threads].append(s)
    one, all_ = (1e3 * statistics.median(seconds[k]) for k in (1, many))
    return {"dim": dim, "layers": layers, "population": population, "threads": many,
            "one_thread_ms": round(one, 3), "threads_ms": round(all_, 3),
            "one_over_threads": round(one / all_, 3), "rule_picks": picked}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--cells", default="64x2,96x1,128x2,256x2", help="WIDTHxLAYERS, ...")
    p.add_argument("--populations", default="64,256,512,1024,2048,4096")
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2: rounds alternate between one thread and all")
    load = os.getloadavg()[0]
    cells = [tuple(map(int, c.split("x"))) for c in args.cells.split(",")]
    rows = [cell(args.model, dim, layers, int(n), args.rounds)
            for dim, layers in cells for n in args.populations.split(",")]
    print(json.dumps({"config": vars(args), "cells": rows, "machine": machine_info(load)},
                     indent=2))


if __name__ == "__main__":
    main()
