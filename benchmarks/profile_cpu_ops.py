"""Where an ES step's extra cost over inference goes on the cpu backend: seconds per kernel.

Wraps every numba kernel the cpu backend and its elementwise ops call (``intes.kernels.cpu``,
``intes.kernels.cpu_elementwise``) and the GEMM engine's product with a timer,
runs the ES forward (all members' fitness), the update (``apply_fitness``) and inference on
the same windows, best of ``--repeats``, and prints JSON: per-kernel seconds for the ES
forward and for inference, their difference, and the update's and noise's seconds. With
``--threads`` > 1 kernel seconds add up over threads; use ``--threads 1`` (the default) to
read them against wall time.

    python benchmarks/profile_cpu_ops.py [--model rwkv] [--dim 256] [--population 1024]
                                         [--seq-len 64] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

from intes.bench import bench_windows, machine_info, make_engine
from intes.kernels import cpu, cpu_elementwise
from intes.kernels.cpu import CpuBackend

KERNELS = ("_linear_plain", "_project_rank1", "_correct_rank1", "_linear_lowrank", "_fused_plain",
           "_fused_rank1", "_fused_lowrank", "_fused_buffered",
           "_embed_plain", "_embed_rank1", "_embed_lowrank", "_member_vectors",
           "_log_likelihood", "_norm", "_token_mix", "_token_mixes", "sigmoid_gate_flat",
           "_relu_sq", "_wkv_step", "_wkv_scan", "_sat_add2", "_sat_add3", "_gru_blend", "_relu",
           "_gru_scan_plain", "_gru_scan_es")


def timed(seconds: defaultdict, name: str, fn):
    def wrapper(*args):
        start = time.perf_counter()
        result = fn(*args)
        seconds[name] += time.perf_counter() - start
        return result
    return wrapper


def run(fn, seconds: defaultdict) -> tuple[float, dict]:
    """(wall seconds, per-kernel seconds) of one call of fn."""
    seconds.clear()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, dict(seconds)


def faster(a: tuple | None, b: tuple) -> tuple:
    return b if a is None or b[0] < a[0] else a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    seconds: defaultdict = defaultdict(float)
    if args.model == "egg":  # EGG's fused recurrences call the layer kernels from inside
        warm = make_engine("egg", 64, 1, 4, 4, 1, CpuBackend(1))  # numba: compile them first
        warm.step(bench_windows(warm)[:, :3])
        warm.log_likelihood(bench_windows(warm)[:, :3])
    for module in (cpu, cpu_elementwise):  # where the backend and its ops call them from
        for name in KERNELS:
            if hasattr(module, name):
                setattr(module, name, timed(seconds, name, getattr(module, name)))
    backend = CpuBackend(args.threads)
    backend.gemm.product = timed(seconds, "gemm", backend.gemm.product)
    engine = make_engine(args.model, args.dim, args.layers, args.population, args.seq_len, 1,
                         backend)
    windows = bench_windows(engine)
    engine.step(windows[:, :3])  # warm-up: compiles every kernel
    engine.log_likelihood(windows[:, :3])
    pairs, load_before = engine.config.es.pairs, os.getloadavg()[0]
    fitness = {}

    def forward() -> None:
        fitness["raw"] = engine.population_fitness(windows)

    # in a training loop's order, step after step: forwards repeated without their updates
    # allocate differently, and the ES forward's later ops then page-fault on fresh memory
    es = inf = upd = noise = None
    for _ in range(args.repeats):
        noise = faster(noise, run(lambda: engine.member_ops(0, pairs), seconds))
        es = faster(es, run(forward, seconds))
        upd = faster(upd, run(lambda: engine.apply_fitness(fitness["raw"]), seconds))
        inf = faster(inf, run(lambda: engine.log_likelihood(windows), seconds))
    (es_wall, es_kernels), (inf_wall, inf_kernels) = es, inf
    update_wall, noise_wall = upd[0], noise[0]
    names = sorted(set(es_kernels) | set(inf_kernels), key=lambda k: -es_kernels.get(k, 0.0))
    print(json.dumps({
        "config": vars(args), "gemm": backend.gemm.description,
        "machine": machine_info(load_before),
        "es_forward_s": es_wall, "inference_s": inf_wall, "update_s": update_wall,
        "noise_and_member_vectors_s": noise_wall,
        "kernels_s": {k: {"es": es_kernels.get(k, 0.0), "inference": inf_kernels.get(k, 0.0),
                          "extra": es_kernels.get(k, 0.0) - inf_kernels.get(k, 0.0)}
                      for k in names},
    }, indent=2))


if __name__ == "__main__":
    main()
