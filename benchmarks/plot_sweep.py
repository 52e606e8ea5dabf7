"""Plot tokens/s against population from ``sweep_cpu.py``'s JSON: ES, inference and naive ES.

One colour per width; solid = ES step, dashed = inference, dotted = naive ES
(``naive_es_tokens_per_s``: each member's weights under full-rank noise, evaluated on their
own; in sweeps of ``intes bench`` before the full-rank baseline, the low-rank perturbation
written out instead).

It also prints the README's table per width (Markdown).

    python benchmarks/plot_sweep.py [benchmarks/results/cpu_sweep.json] [--out PATH.png]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

RESULTS = Path(__file__).resolve().parent / "results"
SERIES = (("es_tokens_per_s", "ES step", "-"), ("inference_tokens_per_s", "inference", "--"),
          ("naive_es_tokens_per_s", "naive ES", ":"))


def by_width(results: list[dict]) -> dict[int, list[dict]]:
    """Successful runs grouped by width, each group sorted by population."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if "error" not in r:
            groups[r["config"]["dim"]].append(r)
    return {w: sorted(g, key=lambda r: r["config"]["population"])
            for w, g in sorted(groups.items())}


def plot(sweep: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for i, (width, runs) in enumerate(by_width(sweep["results"]).items()):
        pops = [r["config"]["population"] for r in runs]
        for key, label, style in SERIES:
            if all(key in r for r in runs):
                ax.plot(pops, [r[key] for r in runs], style, marker="o", color=f"C{i}",
                        label=f"{label}, width {width}")
    cfg = sweep["sweep"]
    ax.set(xscale="log", yscale="log", xlabel="population N", ylabel="tokens / s",
           title=f"intes cpu backend: {cfg['model']}, {cfg['layers']} layers, "
                 f"T={cfg['seq_len']}, rank {cfg['rank']}")
    ax.set_xticks(sorted({r["config"]["population"] for r in sweep["results"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # clear of the lines
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def span(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def markdown(sweep: dict) -> str:
    """The README's table per width: ratio, speedups over both naive baselines, the update's
    share and the peak RSS from the smallest population to the largest."""
    pops = sorted({r["config"]["population"] for r in sweep["results"]})
    lines = ["| width | ES / inference | speedup vs naive ES (low-rank naive) "
             f"| update share of the step | peak RSS, N = {pops[0]} → {pops[-1]} |",
             "|---|---|---|---|---|"]
    for width, runs in by_width(sweep["results"]).items():
        full = [r["speedup"] for r in runs if "speedup" in r]  # none in a --no-naive sweep
        low = [r["speedup_low_rank"] for r in runs if "speedup_low_rank" in r]
        lines.append(
            f"| {width} | {span([r['ratio'] for r in runs], '.2f')} | "
            f"{span(full, '.1f') + '×' if full else '-'} "
            f"({span(low, '.1f') + '×' if low else '-'}) | "
            f"{100 * runs[0]['update_fraction']:.0f}% → {100 * runs[-1]['update_fraction']:.0f}% | "
            f"{runs[0]['peak_rss_mb']:,.0f} → {runs[-1]['peak_rss_mb']:,.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="?", default=RESULTS / "cpu_sweep.json")
    p.add_argument("--out", type=Path, default=RESULTS / "cpu_sweep.png")
    args = p.parse_args()
    sweep = json.loads(args.results.read_text())
    plot(sweep, args.out)
    print(markdown(sweep))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
