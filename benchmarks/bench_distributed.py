"""Distributed pretraining on this machine: steps/s with 1 and 2 workers, bytes per step.

    python benchmarks/bench_distributed.py                 # default model, population, seq len
    python benchmarks/bench_distributed.py --steps 5 --population 64 --seq-len 16   # quick

Prints one JSON object. Each setting runs real worker processes on 127.0.0.1 with gloo,
exactly what ``torchrun ... intes pretrain`` runs per step (``ShardFitness``: score this
worker's pairs, all-gather the int32 fitness, check replicas every INTES_DIST_VERIFY_EVERY
steps; then ``Engine.apply_fitness``), minus evaluation and checkpoints.

Three settings, each with its threads set (INTES_CPU_THREADS, OMP_NUM_THREADS,
NUMBA_NUM_THREADS): 1 worker on 1 thread, the baseline; 1 worker on every core, a plain
``intes pretrain`` (the cpu backend runs a thread per core, the population in slices of at
most 2,048 rows); and 2 workers on
half the cores each, what ``torchrun --nproc-per-node 2`` gives them, so they do not fight
over cores.

- steps_per_s: timed steps / their wall time on rank 0 (ranks run in lockstep). Lockstep
  workers are as slow as the slowest, so other load on the machine (the machine's
  load_average_1min, before and after) costs them more than one process: compare on an idle
  machine.
- speedup_vs_1_worker_1_thread, and for 2 workers speedup_vs_1_worker_all_cores: whether
  workers on one machine gain anything over the threads of one process.
- all_gather_us: mean latency of one fitness all-gather alone (200 after training).
- bytes: the fitness payload 4 N; what one worker's all-gather moves (shards padded to the
  longest); the replica check (8 bytes per worker every k steps); and, for scale, what
  data-parallel backprop would move per worker per step (a ring all-reduce of fp32
  gradients: 2 (W - 1) / W x 4 bytes x params).
- same_weights: every setting ends with the same weight hash (1 worker == 2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from intes import distributed
from intes.bench import machine_info
from intes.data import load_corpus, sample_windows
from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
from intes.es import ESConfig

GATHER_REPS = 200


def parse() -> argparse.Namespace:
    m, e, t = ModelConfig(), ESConfig(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=m.kind)
    p.add_argument("--dim", type=int, default=m.dim)
    p.add_argument("--layers", type=int, default=m.layers)
    p.add_argument("--population", type=int, default=e.population)
    p.add_argument("--seq-len", type=int, default=t.seq_len)
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT, caches)")
    p.add_argument("--data", default=None, help="corpus  [default: Python stdlib sources]")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def build(args: argparse.Namespace) -> tuple[Engine, np.ndarray]:
    corpus = load_corpus(args.data)
    config = TrainConfig(model=ModelConfig(args.model, corpus.vocab_size, args.dim, args.layers),
                         es=ESConfig(population=args.population), seq_len=args.seq_len)
    return Engine(config, "cpu"), corpus.train


def worker(args: argparse.Namespace) -> None:
    """One worker: warm up, time the steps, time the all-gather alone; rank 0 prints JSON."""
    if distributed.launched():
        distributed.init_from_env("cpu")
    engine, train = build(args)
    cfg = engine.config
    fitness = distributed.ShardFitness(cfg.es.population)
    began = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            began = time.perf_counter()
        windows = member_windows(sample_windows(train, cfg.seed, engine.step_index,
                                                cfg.es.population // cfg.es.group_size,
                                                cfg.seq_len), cfg.es.group_size)
        engine.apply_fitness(fitness(engine, windows))
    took = time.perf_counter() - began
    fitness.verify()
    record = {"steps_per_s": args.steps / took, "all_gather_us": all_gather_s(cfg) * 1e6,
              "weights": distributed.digest(sorted(engine.params.items()))}
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(record))
    distributed.shutdown()


def all_gather_s(config: TrainConfig) -> float:
    """Mean latency of one fitness all-gather with nothing else running."""
    start, stop = distributed.shard_range(config.es.population)
    local = np.zeros(stop - start, dtype=np.int32)
    t0 = time.perf_counter()
    for _ in range(GATHER_REPS):
        distributed.all_gather_fitness(local, config.es.population)
    return (time.perf_counter() - t0) / GATHER_REPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(world: int, threads: int) -> dict:
    """Start ``world`` workers of this script with ``threads`` threads each; rank 0's record."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    base.update(INTES_CPU_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                NUMBA_NUM_THREADS=str(threads))
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]],
                                      env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed in setting world={world}, threads={threads}")
    return {"workers": world, "threads_per_worker": threads,
            **json.loads(outputs[0].strip().splitlines()[-1])}


def bytes_per_step(engine: Engine, world: int) -> dict:
    """What crosses the network per step with ``world`` workers, next to data-parallel SGD."""
    n = engine.config.es.population
    longest = 2 * max(b - a for a, b in (distributed.shard_pairs(n // 2, r, world)
                                         for r in range(world)))
    params = sum(int(p.size) for p in engine.params.values())
    return {
        "workers": world,
        "fitness_payload_bytes": 4 * n,
        "all_gather_bytes_per_worker": 4 * longest * world,
        "replica_check_bytes_per_worker": 8 * world,
        "replica_check_every_steps": distributed.verify_every(),
        "params": params,
        "data_parallel_fp32_allreduce_bytes_per_worker": int(2 * (world - 1) / world * 4
                                                              * params),
    }


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    cores = len(os.sched_getaffinity(0))
    settings = [(1, 1), (1, cores), (2, max(1, cores // 2))]
    load_before = os.getloadavg()[0]
    results = [run_setting(world, threads) for world, threads in settings]
    engine, _ = build(args)
    one_thread, all_cores, two_workers = results
    for r in results:
        r["speedup_vs_1_worker_1_thread"] = r["steps_per_s"] / one_thread["steps_per_s"]
    two_workers["speedup_vs_1_worker_all_cores"] = (two_workers["steps_per_s"]
                                                    / all_cores["steps_per_s"])
    print(json.dumps({
        "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(load_before),
        "config": engine.config.to_dict(),
        "usable_cores": cores,
        "timed_steps": args.steps,
        "settings": results,
        "same_weights": len({r.pop("weights") for r in results}) == 1,
        "bytes_per_step": bytes_per_step(engine, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
