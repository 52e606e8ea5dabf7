"""The ES forward by member rows per forward call: the population in chunks of each size
(run on the backend's threads as ``intes pretrain --chunk-pairs`` would: give sizes whose
chunk count is a multiple of the threads, or cores wait), timed in interleaved rounds in one
process; the measure behind the cpu backend's ``CHUNK_ROWS``.

The JSON gives, per rows-per-chunk, the median seconds of ``population_fitness`` (noise,
forward and fitness of every member) over the rounds, and the chunk count the engine picks
by default.

    python benchmarks/chunk_rows.py [--model rwkv] [--dim 96] [--layers 1] [--population 8192]
                                    [--rows 1024,2048,4096] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from intes.bench import bench_backend, bench_windows, machine_info, make_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--population", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", default="1024,2048,4096")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    load = os.getloadavg()[0]
    engine = make_engine(args.model, args.dim, args.layers, args.population, args.seq_len, 1,
                         bench_backend("auto", None, None))
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    sizes = [int(r) for r in args.rows.split(",") if r.strip()]
    for rows in sizes:
        if rows < 2 or rows % 2 or args.population % rows:
            p.error(f"rows per chunk must be even and divide the population, got {rows}")
    seconds: dict[int, list[float]] = {rows: [] for rows in sizes}
    for r in range(args.rounds):
        for rows in (sizes if r % 2 == 0 else sizes[::-1]):
            start = time.perf_counter()
            engine.population_fitness(windows, rows // 2)
            seconds[rows].append(time.perf_counter() - start)
    print(json.dumps({
        "config": vars(args), "threads": engine.threads,
        "default_chunks": len(engine.chunks(engine.config.es.pairs, 2)),
        "forward_s_median": {str(rows): statistics.median(s) for rows, s in seconds.items()},
        "machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
