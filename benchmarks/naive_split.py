"""Where one naive-ES member's time goes: materializing its perturbed weights
(``intes.bench.member_params``), packing them for the GEMM engine (``prepare``) and its
batch-1 forward over T tokens (``score``); medians over members, one thread, as JSON.

Beside them, ``fullrank_materialize_ms``: the same weights made with full-rank noise instead,
every matrix entry its own hash value (``intes.bench.full_rank_params``), what ES with
full-rank perturbations pays per member in place of the rank-r product. Not in ``member_ms``.

It uses only what every version of ``intes bench``'s naive baseline used, so running it from
two checkouts in turn compares their baselines. ``INTES_CPU_TOKEN_BLOCK`` fixes the tokens
per forward call (the default is the backend's rule).

    python benchmarks/naive_split.py [--model rwkv] [--dim 256] [--seq-len 64] [--members 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from intes.bench import bench_windows, full_rank_params, machine_info, make_engine, member_params
from intes.engine import score
from intes.kernels.cpu import CpuBackend
from intes.models.base import Ops, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--members", type=int, default=40)
    args = p.parse_args()
    load = os.getloadavg()[0]
    engine = make_engine(args.model, args.dim, 2, 16, args.seq_len, 1, CpuBackend(1))
    windows = bench_windows(engine)
    cfg, backend = engine.config, engine.backend
    parts: dict[str, list[float]] = {"materialize_ms": [], "prepare_ms": [], "forward_ms": []}
    full_rank: list[float] = []
    for m in range(args.members + 2):  # the first two compile
        start = time.perf_counter()
        params = member_params(engine, m % 16)
        made = time.perf_counter()
        packed = prepare(backend, engine.specs, params)
        ready = time.perf_counter()
        ops = Ops(backend, engine.specs, params, None, cfg.es.sigma_shift, packed)
        score(engine.model, ops, windows[m % 16:m % 16 + 1])
        done = time.perf_counter()
        full_rank_params(engine, m % 16)
        full_rank_done = time.perf_counter()
        if m >= 2:
            full_rank.append(1e3 * (full_rank_done - done))
            for key, seconds in zip(parts, (made - start, ready - made, done - ready),
                                    strict=True):
                parts[key].append(1e3 * seconds)
    medians = {key: statistics.median(v) for key, v in parts.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"config": vars(args) | {"token_block": backend.token_block(1, args.dim),
                                              "commit": commit},
                      **medians, "member_ms": sum(medians.values()),
                      "fullrank_materialize_ms": statistics.median(full_rank),
                      "machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
