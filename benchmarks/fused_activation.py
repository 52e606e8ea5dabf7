"""What applying relu and relu^2 in the GEMM epilogue saves, in one process: rounds of an ES
forward (all members' fitness) and of inference with the activations in the tiles, and
with each as an op of its own after its layer (the cpu backend's ``EPILOGUES`` emptied for
the round), each variant first in every other round. The JSON gives, per model, the
medians over rounds of fused / separate seconds (each round's pair meets the same machine
load) and of each variant's seconds.

    python benchmarks/fused_activation.py [--dim 96] [--layers 1] [--population 8192]
                                          [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from intes.bench import bench_backend, bench_windows, machine_info, make_engine
from intes.kernels import cpu


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(model: str, args: argparse.Namespace) -> dict:
    engine = make_engine(model, args.dim, args.layers, args.population, 64, 1,
                         bench_backend("auto", None, None))
    windows = bench_windows(engine)
    fused, separate = dict(cpu.EPILOGUES), {}
    seconds = {f"{part}_{how}": [] for part in ("es", "inference")
               for how in ("fused", "separate")}
    variants = [("fused", fused), ("separate", separate)]
    for r in range(args.rounds + 1):  # round 0 compiles both variants
        for how, table in variants if r % 2 else variants[::-1]:  # either goes first in turn
            cpu.EPILOGUES.clear()
            cpu.EPILOGUES.update(table)
            es = timed(lambda: engine.population_fitness(windows))
            inference = timed(lambda: engine.log_likelihood(windows))
            if r:
                seconds[f"es_{how}"].append(es)
                seconds[f"inference_{how}"].append(inference)
    cpu.EPILOGUES.clear()
    cpu.EPILOGUES.update(fused)
    out = {f"{k}_s_median": round(statistics.median(v), 4) for k, v in seconds.items()}
    for part in ("es", "inference"):
        pairs = zip(seconds[f"{part}_fused"], seconds[f"{part}_separate"], strict=True)
        out[f"{part}_fused_over_separate"] = round(statistics.median(f / s for f, s in pairs), 4)
    out["fused_activations"] = sorted(fused)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--population", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    load = os.getloadavg()[0]
    models = {model: rounds(model, args) for model in ("rwkv", "egg")}
    print(json.dumps({"config": vars(args), "models": models, "machine": machine_info(load)},
                     indent=2))


if __name__ == "__main__":
    main()
