"""Where one naive-ES member's time goes: materializing its perturbed weights, packing them
for the GEMM engine (``prepare``) and its batch-1 forward over T tokens (``score``); medians
over pairs, per member, one thread, as JSON.

A pair's two members are made together, as ``intes bench``'s naive baselines make them:
``materialize_ms`` with full-rank noise, every matrix entry its own hash value
(``intes.bench.full_rank_pair_params``, the baseline of ``speedup``), and, not in
``member_ms``, ``low_rank_materialize_ms`` with the ES step's own A_p B_p^T written out
(``intes.bench.low_rank_pair_params``, the baseline of ``speedup_low_rank``).
``INTES_CPU_TOKEN_BLOCK`` fixes the tokens per forward call (the default is the backend's
rule).

    python benchmarks/naive_split.py [--model rwkv] [--dim 256] [--seq-len 64] [--pairs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from intes.bench import (
    bench_windows,
    full_rank_pair_params,
    low_rank_pair_params,
    machine_info,
    make_engine,
)
from intes.engine import score
from intes.kernels.cpu import CpuBackend
from intes.models.base import Ops, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=20)
    args = p.parse_args()
    load = os.getloadavg()[0]
    engine = make_engine(args.model, args.dim, 2, 16, args.seq_len, 1, CpuBackend(1))
    windows = bench_windows(engine)
    cfg, backend = engine.config, engine.backend
    parts: dict[str, list[float]] = {"materialize_ms": [], "prepare_ms": [], "forward_ms": []}
    low_rank: list[float] = []
    for n in range(args.pairs + 1):  # the first compiles
        pair = n % 8
        start = time.perf_counter()
        members = full_rank_pair_params(engine, pair)
        made = time.perf_counter()
        packed = [prepare(backend, engine.specs, params) for params in members]
        ready = time.perf_counter()
        for m, params, prepared in zip((2 * pair, 2 * pair + 1), members, packed, strict=True):
            ops = Ops(backend, engine.specs, params, None, cfg.es.sigma_shift, prepared)
            score(engine.model, ops, windows[m:m + 1])
        done = time.perf_counter()
        low_rank_pair_params(engine, pair)
        low_rank_done = time.perf_counter()
        if n >= 1:  # per member: half the pair's seconds
            low_rank.append(500 * (low_rank_done - done))
            for key, seconds in zip(parts, (made - start, ready - made, done - ready),
                                    strict=True):
                parts[key].append(500 * seconds)
    medians = {key: statistics.median(v) for key, v in parts.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"config": vars(args) | {"token_block": backend.token_block(1, args.dim),
                                              "commit": commit},
                      **medians, "member_ms": sum(medians.values()),
                      "low_rank_materialize_ms": statistics.median(low_rank),
                      "machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
