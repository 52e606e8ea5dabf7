"""An ES step's two halves against inference, on one thread and on all cores, interleaved in
one process: where the ratio of ``intes bench`` is lost, and whether the cores keep pace.

Each round times the forward of all members (``population_fitness``), the update with the
new weights' packing, and inference on the same windows, in turn; the JSON gives, per
thread count, the medians over rounds of forward / inference, update / inference and
inference / (forward + update), and the medians of the slowest and fastest population
slice's seconds in the forward (the step waits for the slowest).

    python benchmarks/step_split.py [--model rwkv] [--dim 256] [--layers 2] [--population 1024]
                                    [--seq-len 64] [--rounds 10] [--threads 1,CORES]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from intes.bench import bench_backend, bench_windows, machine_info, make_engine
from intes.kernels.cpu import usable_cores


def rounds(threads: int, args: argparse.Namespace) -> dict:
    engine = make_engine(args.model, args.dim, args.layers, args.population, args.seq_len, 1,
                         bench_backend("auto", threads, None))
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    engine.log_likelihood(windows[:, :3])
    slices: list[float] = []
    evaluate = engine.evaluate_members

    def timed_slice(*a):
        start = time.perf_counter()
        result = evaluate(*a)
        slices.append(time.perf_counter() - start)
        return result

    engine.evaluate_members = timed_slice
    forward, update, inference, slowest, fastest = [], [], [], [], []
    for _ in range(args.rounds):
        slices.clear()
        start = time.perf_counter()
        raw = engine.population_fitness(windows)
        forward.append(time.perf_counter() - start)
        slowest.append(max(slices))
        fastest.append(min(slices))
        start = time.perf_counter()
        engine.apply_fitness(raw)
        _ = engine.prepared
        update.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.log_likelihood(windows)
        inference.append(time.perf_counter() - start)
    med = statistics.median
    return {
        "forward_over_inference": med(f / i for f, i in zip(forward, inference, strict=True)),
        "update_over_inference": med(u / i for u, i in zip(update, inference, strict=True)),
        "ratio": med(i / (f + u) for f, u, i in zip(forward, update, inference, strict=True)),
        "inference_s": med(inference),
        "slowest_slice_s": med(slowest), "fastest_slice_s": med(fastest),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", default=f"1,{usable_cores()}",
                   help="thread counts, comma-separated  [default: 1 and every usable core]")
    args = p.parse_args()
    load = os.getloadavg()[0]
    result = {"config": vars(args),
              "threads": {t: rounds(int(t), args) for t in args.threads.split(",")}}
    print(json.dumps(result | {"machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
