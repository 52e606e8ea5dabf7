"""What a fused op saves, in one process: rounds of an ES forward (all members' fitness) and
of inference with the op fused and with its parts run one by one, each variant first in
every other round. The JSON gives, per model, the medians over rounds of fused / separate
seconds (each round's pair meets the same machine load) and of each variant's seconds.

- ``activation``: relu and relu^2 in the GEMM epilogue, against each as an op of its own
  after its layer (the cpu backend's ``EPILOGUES`` emptied for the round); rwkv and egg.
- ``token_mixes``: RWKV's token mixes of a layer in one pass over the block
  (``CpuElementwise.token_mixes``), against numpy's shifted copy and one mix per call.
- ``residual``: the residual add after rwkv's time-mix output layer and egg's MLP in the
  GEMM epilogue, against ``sat_add`` after the layer ("residual" left out of the cpu
  backend's ``fused_epilogues`` for the round).

    python benchmarks/fused_ops.py {activation,token_mixes,residual} [--dim 96] [--layers 1]
                                   [--population 8192] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from intes import intmath
from intes.bench import bench_backend, bench_windows, machine_info, make_engine
from intes.kernels import cpu
from intes.kernels.cpu import CpuBackend
from intes.kernels.cpu_elementwise import CpuElementwise


def epilogues(table: dict) -> Callable[[], None]:
    def use() -> None:
        cpu.EPILOGUES.clear()
        cpu.EPILOGUES.update(table)
    return use


def mixes(fn) -> Callable[[], None]:
    def use() -> None:
        CpuElementwise.token_mixes = staticmethod(fn)
    return use


def epilogue_names(names: tuple[str, ...]) -> Callable[[], None]:
    def use() -> None:
        CpuBackend.fused_epilogues = names
    return use


def mixes_one_by_one(x, first, resets, mus):
    prev = intmath.token_shift(x, first, resets)
    return tuple(CpuElementwise.token_mix(x, prev, mu) for mu in mus)


def variants(op: str) -> tuple[tuple[str, ...], dict[str, Callable[[], None]]]:
    """(models, {"fused": set it up, "separate": set it up})."""
    if op == "activation":
        return ("rwkv", "egg"), {"fused": epilogues(dict(cpu.EPILOGUES)),
                                 "separate": epilogues({})}
    if op == "token_mixes":
        return ("rwkv",), {"fused": mixes(CpuElementwise.token_mixes),
                           "separate": mixes(mixes_one_by_one)}
    names = CpuBackend.fused_epilogues
    return ("rwkv", "egg"), {"fused": epilogue_names(names),
                             "separate": epilogue_names(tuple(n for n in names
                                                              if n != "residual"))}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(model: str, setups: dict, args: argparse.Namespace) -> dict:
    engine = make_engine(model, args.dim, args.layers, args.population, 64, 1,
                         bench_backend("auto", None, None))
    windows = bench_windows(engine)
    seconds = {f"{part}_{how}": [] for part in ("es", "inference") for how in setups}
    order = list(setups)
    for r in range(args.rounds + 1):  # round 0 compiles both variants
        for how in order if r % 2 else order[::-1]:  # either goes first in turn
            setups[how]()
            es = timed(lambda: engine.population_fitness(windows))
            inference = timed(lambda: engine.log_likelihood(windows))
            if r:
                seconds[f"es_{how}"].append(es)
                seconds[f"inference_{how}"].append(inference)
    setups["fused"]()
    out = {f"{k}_s_median": round(statistics.median(v), 4) for k, v in seconds.items()}
    for part in ("es", "inference"):
        pairs = zip(seconds[f"{part}_fused"], seconds[f"{part}_separate"], strict=True)
        out[f"{part}_fused_over_separate"] = round(statistics.median(f / s for f, s in pairs), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["activation", "token_mixes", "residual"])
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--population", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    load = os.getloadavg()[0]
    models, setups = variants(args.op)
    results = {model: rounds(model, setups, args) for model in models}
    print(json.dumps({"config": vars(args), "models": results, "machine": machine_info(load)},
                     indent=2))


if __name__ == "__main__":
    main()
