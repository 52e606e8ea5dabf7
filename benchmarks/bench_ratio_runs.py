"""The ES/inference ratio over repeated ``intes bench`` runs, each in its own process.

On a shared machine one run's ratio moves by several percent with the neighbours' load (each
run already takes the best of its interleaved repeats), so a single figure says little; this
prints every run's figures and the median, min and max as JSON.

    python benchmarks/bench_ratio_runs.py [--runs 6] [--models rwkv,egg] [--population 1024]
                                          [--dim 256] [--seq-len 64]
                                          [--gemm vnni|int8|avx2|float32] [--naive]

With ``--naive`` each run also times naive ES (as ``intes bench`` does by default) and the
JSON gives the speedups, the speedup ceiling (naive ES over inference) and how many runs met
both the ratio and the speedup goal.
``--pool A.json B.json`` runs nothing and summarizes saved passes' runs together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

FIELDS = ("es_tokens_per_s", "inference_tokens_per_s", "ratio", "update_fraction")
NAIVE_FIELDS = ("naive_es_tokens_per_s", "speedup", "speedup_ceiling", "speedup_low_rank")
GOALS = {"ratio": 0.95, "speedup": 20.0}  # the targets the README quotes


def bench_command(model: str, population: int, dim: int, seq_len: int, gemm: str | None,
                  naive: bool) -> list[str]:
    return ["intes", "bench", "--model", model, "--dim", str(dim), "--layers", "2",
            "--population", str(population), "--seq-len", str(seq_len),
            *([] if naive else ["--no-naive"]), *(["--gemm", gemm] if gemm else [])]


def one_run(cmd: list[str], naive: bool) -> dict:
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    fields = FIELDS + (NAIVE_FIELDS if naive else ())
    return {k: result[k] for k in fields} | {"machine": result["machine"]}


def summary(runs: list[dict], naive: bool) -> dict:
    """Medians and ranges over runs, and how many met both goals."""
    ratios = [r["ratio"] for r in runs]
    out = {"runs_count": len(runs), "ratio_median": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios),
           "ratio_at_goal": sum(r >= GOALS["ratio"] for r in ratios),
           "es_tokens_per_s_median": statistics.median(r["es_tokens_per_s"] for r in runs)}
    if naive:
        speedups = [r["speedup"] for r in runs]
        out |= {"speedup_median": statistics.median(speedups),
                "speedup_min": min(speedups), "speedup_max": max(speedups),
                "speedup_low_rank_median": statistics.median(
                    r["speedup_low_rank"] for r in runs),
                # runs saved before the field was added have no ceiling
                "speedup_ceiling_median": statistics.median(
                    r["speedup_ceiling"] for r in runs) if all(
                    "speedup_ceiling" in r for r in runs) else None,
                "runs_meeting_both_goals": sum(
                    r["ratio"] >= GOALS["ratio"] and r["speedup"] >= GOALS["speedup"]
                    for r in runs)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--models", default="rwkv,egg")
    p.add_argument("--population", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--gemm", default=None, help="the cpu GEMM engine (default: bench's auto)")
    p.add_argument("--naive", action="store_true", help="time naive ES too (slower)")
    p.add_argument("--pool", nargs="+", type=Path,
                   help="run nothing: summarize the runs of these saved passes together")
    args = p.parse_args()
    if args.pool:
        missing = [path for path in args.pool if not path.is_file()]
        if missing:
            p.error(f"--pool: no file {missing[0]}")
        passes = [json.loads(path.read_text())["models"] for path in args.pool]
        pooled = {m: [r for models in passes for r in models[m]["runs"]] for m in passes[0]}
        print(json.dumps({"passes": [str(path) for path in args.pool],
                          "models": {m: summary(runs, "speedup" in runs[0])
                                     for m, runs in pooled.items()}}, indent=2))
        return
    shape = (args.population, args.dim, args.seq_len, args.gemm, args.naive)
    out = {"command": " ".join(bench_command("MODEL", *shape)), "models": {}}
    for model in args.models.split(","):
        runs = [one_run(bench_command(model, *shape), args.naive) for _ in range(args.runs)]
        out["models"][model] = summary(runs, args.naive) | {"runs": runs}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
