"""Plot validation bits per byte against minutes (or steps) for runs' metrics.jsonl files.

    python benchmarks/plot_pretrain.py benchmarks/results/pretrain_rwkv_10min.jsonl \
        benchmarks/results/pretrain_egg_10min.jsonl --unigram 4.7441 --bigram 3.5998

The curves are the runs' periodic evaluations; a run that ended scored on the whole valid
split (a "final" record) is labelled with that figure. The reference lines are the n-gram
figures `intes pretrain` prints for its evaluation sample.

``--x steps`` plots against training steps instead, and prints as JSON each run's sample
figure interpolated at the last step all runs reached: runs of one configuration on hosts of
different speed make different numbers of steps in the same minutes, and compare at equal
steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def evals(path: Path, x: str = "minutes") -> tuple[list[float], list[float], float | None]:
    """(minutes or steps, val_bpb) of every evaluation in a metrics.jsonl file, and the whole
    split's figure at the end (None for runs logged without one)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = next((r["val_bpb"] for r in rows if r.get("event") == "final"), None)
    rows = [r for r in rows if r.get("event") == "eval"]
    xs = [r["elapsed_s"] / 60 if x == "minutes" else r["step"] for r in rows]
    return xs, [r["val_bpb"] for r in rows], final


def at_common_step(runs: dict[str, tuple[list[float], list[float], float | None]]) -> dict:
    """Each run's sample figure linearly interpolated at the last step every run reached."""
    step = min(xs[-1] for xs, _, _ in runs.values())
    return {"step": step, "sample_bpb": {label: round(float(np.interp(step, xs, bpb)), 4)
                                         for label, (xs, bpb, _) in runs.items()}}


def default_label(path: Path) -> str:
    """A committed copy's name without its prefix, or a run directory's name."""
    name = path.parent.name if path.stem == "metrics" else path.stem
    return name.removeprefix("pretrain_").replace("_", " ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", type=Path)
    p.add_argument("--unigram", type=float, required=True)
    p.add_argument("--bigram", type=float, required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_10min.png"))
    p.add_argument("--title",
                   default="intes pretrain --time-limit 10 (default config, stdlib corpus)")
    p.add_argument("--ymax", type=float, help="clip the plot above this (to compare near the end)")
    p.add_argument("--ymin", type=float, help="extend the plot down to this (room for the legend)")
    p.add_argument("--labels", help="comma-separated, one per metrics file (default: file names)")
    p.add_argument("--legend", default="upper right",
                   help="the legend's matplotlib location, or 'outside' (right of the plot)")
    p.add_argument("--x", choices=("minutes", "steps"), default="minutes",
                   help="the horizontal axis (steps also prints the runs at a common step)")
    args = p.parse_args()
    outside = args.legend == "outside"
    fig, ax = plt.subplots(figsize=(11 if outside else 7, 4.2))
    labels = args.labels.split(",") if args.labels else [default_label(path)
                                                         for path in args.metrics]
    if len(labels) != len(args.metrics):
        p.error(f"{len(labels)} labels for {len(args.metrics)} metrics files")
    if len(set(labels)) != len(labels):
        p.error(f"labels repeat ({', '.join(labels)}): name the runs with --labels")
    runs = {label: evals(path, args.x) for path, label in zip(args.metrics, labels, strict=True)}
    for label, (xs, bpb, final) in runs.items():
        end = f"{bpb[-1]:.3f}" if final is None else f"{final:.3f} on the whole split"
        ax.plot(xs, bpb, marker=".", label=f"{label}: {end}")
    ax.axhline(args.unigram, ls=":", c="gray", label=f"unigram {args.unigram:.3f}")
    ax.axhline(args.bigram, ls="--", c="gray", label=f"bigram {args.bigram:.3f}")
    xlabel = "minutes (2-core CPU, cpu backend)" if args.x == "minutes" else "steps"
    ax.set(xlabel=xlabel, ylabel="validation bits per byte", title=args.title)
    ax.set_ylim(bottom=args.ymin, top=args.ymax)
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(loc=args.legend)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    if args.x == "steps":
        print(json.dumps({"plot": str(args.out), **at_common_step(runs)}, indent=1))
    else:
        print(args.out)


if __name__ == "__main__":
    main()
