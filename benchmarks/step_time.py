"""Fastest ES step (forward + update) and inference pass of one configuration, interleaved.

For comparing two versions of intes on a shared machine: run this alternately against each
checkout (``PYTHONPATH=/path/to/checkout python benchmarks/step_time.py ...``) a few times and
compare the ES seconds; one process measures one version, the machine's drift shows up as the
spread between alternations.

    python benchmarks/step_time.py [--model rwkv] [--dim 256] [--population 1024]
                                   [--threads 2] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import time

import intes
from intes.bench import bench_windows, make_engine
from intes.kernels.cpu import CpuBackend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    engine = make_engine(args.model, args.dim, 2, args.population, args.seq_len, 1,
                         CpuBackend(args.threads))
    windows = bench_windows(engine)
    engine.step(windows)  # warm-up at full size: compiles, and sizes every buffer
    engine.log_likelihood(windows)
    best = {"es_s": float("inf"), "forward_s": float("inf"), "update_s": float("inf"),
            "inference_s": float("inf")}
    for _ in range(args.repeats):
        start = time.perf_counter()
        raw = engine.population_fitness(windows)
        mid = time.perf_counter()
        engine.apply_fitness(raw)
        end = time.perf_counter()
        engine.log_likelihood(windows)
        after = time.perf_counter()
        for key, value in (("es_s", end - start), ("forward_s", mid - start),
                           ("update_s", end - mid), ("inference_s", after - end)):
            best[key] = min(best[key], value)
    print(json.dumps({"intes": intes.__file__, "config": vars(args), **best,
                      "ratio": best["inference_s"] / best["es_s"]}))


if __name__ == "__main__":
    main()
