"""The loss plot of a run: validation bits per byte against steps and against minutes.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global figure state and
no display needed) and swapped into place by a rename, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_validation(evals: list[dict], references: tuple[float, float], path: Path) -> None:
    """Write ``path``: eval records (step, elapsed_s, val_bpb) with n-gram reference lines.

    The unigram and bigram lines are what a model that ignores context, or sees only one
    token of it, scores on the same validation tokens: the first levels to beat.
    """
    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.95, wspace=0.05)
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    bpb = [e["val_bpb"] for e in evals]
    by_step.plot([e["step"] for e in evals], bpb, marker=".", label="validation")
    by_time.plot([e["elapsed_s"] / 60 for e in evals], bpb, marker=".", label="validation")
    for ax, xlabel in ((by_step, "step"), (by_time, "minutes")):
        for value, name, style in zip(references, ("unigram", "bigram"), (":", "--"),
                                      strict=True):
            if math.isfinite(value):
                ax.axhline(value, color="gray", linestyle=style, label=f"{name} {value:.3f}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    by_step.set_ylabel("bits per byte")
    by_time.legend(loc="best")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as err:  # name the plot, not its temporary copy
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
