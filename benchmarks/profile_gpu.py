"""Where an ES step's time goes on a GPU: every op of bench_gpu.py's model, timed alone.

For one population x width it times each op of one token of ``bench_gpu.Bench``'s model
without noise (what inference runs) and with each pair's noise (what an ES step runs, in both
noise modes), and the work done once per step (hashing the factors, the update of every
matrix). It prints JSON: milliseconds per op, a token's and a step's totals for inference and
ES, the ratio those totals predict, and the ES step's extra time split by where it goes
(the answer to "what keeps ES / inference below 1"). Run on a CUDA machine:

    python benchmarks/profile_gpu.py --population 262144 --width 2048
    python benchmarks/profile_gpu.py --dry-run   # no GPU: the script itself, tiny, on the CPU

Each figure is the median of ``--repeats`` runs after one warm-up run (which compiles and
autotunes), timed with CUDA events (wall clock on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_gpu import Bench, Point, environment


def median_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median milliseconds of fn over ``repeats`` runs after one warm-up run."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def profile(bench: Bench, repeats: int, cuda: bool) -> dict[str, Any]:
    """Per-op milliseconds of one token (inference and ES forms) and of one step's own work."""
    import torch

    k, tk, p, w = bench.k, bench.tk, bench.p, bench.weights
    n, d = p.population, p.width
    dev = bench.device
    x = torch.randint(-127, 128, (n, d), dtype=torch.int8, device=dev)
    hid = torch.randint(-127, 128, (n, 4 * d), dtype=torch.int8, device=dev)
    logits = torch.randint(-127, 128, (n, p.vocab), dtype=torch.int8, device=dev)
    act = torch.randint(0, 127, (n, 4 * d), dtype=torch.int8, device=dev)
    tokens = torch.randint(0, p.vocab, (n,), dtype=torch.int32, device=dev)
    cached, keyed = bench.step_noise(1, cached=True), bench.step_noise(1, cached=False)

    def t(fn: Callable[[], object]) -> float:
        return median_ms(fn, repeats, cuda)

    inputs = {"0.w1": x, "0.w2": act, "head": x}  # every block's layers have these shapes
    ops: dict[str, float] = {
        "embed": t(lambda: k.embed(bench.xp(w["emb"]), bench.xp(tokens), p.sigma_shift)),
        "embed_noise": t(lambda: k.embed(bench.xp(w["emb"]), bench.xp(tokens), p.sigma_shift,
                                         keys=bench.xp(keyed["emb"].keys),
                                         rank=keyed["emb"].rank)),
        "norm": t(lambda: k.norm(bench.xp(x), bench.xp(bench.norm_weight))),
        "relu_sq_lut": t(lambda: k.relu_sq(bench.xp(hid))),
        "sat_add": t(lambda: k.sat_add(bench.xp(x), bench.xp(x))),
        "log_likelihood": t(lambda: k.log_likelihood(bench.xp(logits), bench.xp(tokens))),
    }
    for name, inp in inputs.items():
        def linear(noise: Any, name: str = name, inp: Any = inp) -> Any:
            return tk.linear(inp, w[name], bench.shifts[name], noise, p.sigma_shift)

        ops[name] = t(lambda: linear(None))
        for mode, noise in (("cached", cached), ("kernel", keyed)):
            ops[f"{name}_noise_{mode}"] = t(lambda noise=noise, name=name: linear(noise[name]))
        ops[f"{name}_projection"] = t(lambda name=name, inp=inp: tk.member_projection(
            inp, cached[name], bench.shapes[name][0]))
    step = {"hash_factors": t(lambda: bench.step_noise(2, cached=True))}
    fitness = torch.ones(n // 2, dtype=torch.int32, device=dev)
    for name, (rows, cols) in bench.shapes.items():
        keys = bench.device_keys(7, 1, np.arange(n // 2), 0)

        def update(rows: int = rows, cols: int = cols, name: str = name, keys: Any = keys):
            a, b = k.lowrank_factors(bench.xp(keys), rows, cols, p.rank)
            return tk.update_matrix(w[name], bench.tensor(a), bench.tensor(b), fitness, 10**6)

        step[f"update_{name}"] = t(update)
    return {"ops_ms": ops, "step_ms": step}


def totals(point: Point, timings: dict[str, Any]) -> dict[str, Any]:
    """A token's and a step's milliseconds for inference and ES, and the ES extra by op."""
    ops, step = timings["ops_ms"], timings["step_ms"]
    layers = [f"{i}.w{j}" for i in range(point.layers) for j in (1, 2)] + ["head"]
    shape_of = {name: name if name == "head" else "0." + name.split(".")[1] for name in layers}
    shared = (ops["norm"] * (point.layers + 1) + (ops["relu_sq_lut"] + ops["sat_add"])
              * point.layers + ops["log_likelihood"])
    inference = ops["embed"] + shared + sum(ops[shape_of[n]] for n in layers)
    out: dict[str, Any] = {"token_ms": {"inference": inference}}
    update = sum(v for name, v in step.items() if name.startswith("update_"))
    for mode in ("cached", "kernel"):
        linears = {n: ops[f"{shape_of[n]}_noise_{mode}"] - ops[shape_of[n]] for n in layers}
        token = inference + ops["embed_noise"] - ops["embed"] + sum(linears.values())
        hashing = step["hash_factors"] if mode == "cached" else 0.0
        es_step = point.tokens * token + hashing + update
        extra = es_step - point.tokens * inference
        out["token_ms"][f"es_{mode}"] = token
        out[f"es_{mode}"] = {
            "step_ms": es_step, "predicted_ratio": point.tokens * inference / es_step,
            "extra_share": {  # of the ES step's extra time over inference
                "linear_noise": point.tokens * sum(linears.values()) / extra,
                "embed_noise": point.tokens * (ops["embed_noise"] - ops["embed"]) / extra,
                "hash_factors": hashing / extra, "update": update / extra}}
    out["inference_step_ms"] = point.tokens * inference
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", type=int, default=65536)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per ES step (T)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--sigma-shift", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run the script on the CPU at a tiny size (figures meaningless)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.population, args.width, args.layers, args.vocab = 4, 16, 1, 16
        args.tokens, args.repeats = 2, 1
    kernels, device, gpu, versions, _ = environment(args.dry_run)
    point = Point(args.population, args.width, args.layers, args.vocab, args.tokens, args.rank,
                  args.sigma_shift)
    timings = profile(Bench(point, kernels, device), args.repeats, device == "cuda")
    print(json.dumps({"gpu": gpu, **versions, "point": vars(args), **timings,
                      **totals(point, timings)}, indent=1))


if __name__ == "__main__":
    main()
