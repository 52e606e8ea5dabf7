"""The ES/inference ratio over repeated ``intes bench`` runs, each in its own process.

On a shared machine one run's ratio moves by several percent with the neighbours' load (each
run already takes the best of its interleaved repeats), so a single figure says little; this
prints every run's figures and the median, min and max as JSON.

    python benchmarks/bench_ratio_runs.py [--runs 6] [--models rwkv,egg] [--population 1024]
                                          [--gemm vnni|int8|float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

FIELDS = ("es_tokens_per_s", "inference_tokens_per_s", "ratio", "update_fraction")


def one_run(model: str, population: int, dim: int, seq_len: int, gemm: str | None) -> dict:
    cmd = ["intes", "bench", "--model", model, "--dim", str(dim), "--layers", "2",
           "--population", str(population), "--seq-len", str(seq_len), "--no-naive",
           *(["--gemm", gemm] if gemm else [])]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {k: result[k] for k in FIELDS} | {"machine": result["machine"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--models", default="rwkv,egg")
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--gemm", default=None, help="the cpu GEMM engine (default: bench's auto)")
    args = p.parse_args()
    out = {"command": f"intes bench --model MODEL --dim {args.dim} --layers 2 --population "
                      f"{args.population} --seq-len {args.seq_len} --no-naive"
                      + (f" --gemm {args.gemm}" if args.gemm else ""), "models": {}}
    for model in args.models.split(","):
        runs = [one_run(model, args.population, args.dim, args.seq_len, args.gemm)
                for _ in range(args.runs)]
        ratios = [r["ratio"] for r in runs]
        speeds = [r["es_tokens_per_s"] for r in runs]
        out["models"][model] = {"ratio_median": statistics.median(ratios),
                                "ratio_min": min(ratios), "ratio_max": max(ratios),
                                "es_tokens_per_s_median": statistics.median(speeds),
                                "runs": runs}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
