"""``intes pretrain``: parse flags into a TrainConfig and RunOptions, then call the trainer.

Config flag defaults are read from the config dataclasses, so the dataclasses stay the single
source of truth. On --resume the checkpoint's config is the base: only flags given explicitly
override it, and the trainer refuses any override that changes the run.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

from intes import distributed
from intes.checkpoint import CHECKPOINT_NAME, existing_version, load_checkpoint
from intes.data import Corpus, load_corpus
from intes.engine import MAX_SEQ_LEN, ModelConfig, TrainConfig
from intes.errors import ConfigError
from intes.es import FITNESS_KINDS, ESConfig
from intes.kernels import BACKENDS
from intes.models import MODELS
from intes.runs import checkpoint_config, run_corpus
from intes.trainer import RunOptions, no_checkpoint_to_resume
from intes.trainer import pretrain as run_pretraining
from intes.validation import EVAL_LEN, EVAL_STREAMS, FINAL_EVAL_TOKENS

DEFAULT_TIME_LIMIT = 10.0  # minutes, when neither --steps nor --time-limit is given
_M, _E, _T = ModelConfig(), ESConfig(), TrainConfig()

# flag name -> where it lives in TrainConfig.to_dict()
CONFIG_FLAGS = {
    "model": ("model", "kind"),
    "layers": ("model", "layers"),
    "dim": ("model", "dim"),
    "population": ("es", "population"),
    "group_size": ("es", "group_size"),
    "rank": ("es", "rank"),
    "sigma_shift": ("es", "sigma_shift"),
    "noise_reuse": ("es", "noise_reuse"),
    "fitness": ("es", "fitness"),
    "alpha_steps": ("es", "alpha_steps"),
    "alpha_final_log2": ("es", "alpha_final_log2"),
    "seq_len": ("seq_len",),
    "seed": ("seed",),
}


def build_config(base: TrainConfig, flags: dict, names: set[str]) -> TrainConfig:
    """``base`` with the flags in ``names`` written over it."""
    tree = base.to_dict()
    for name in names:
        *parents, key = CONFIG_FLAGS[name]
        node = tree
        for parent in parents:
            node = node[parent]
        node[key] = flags[name]
    return TrainConfig.from_dict(tree)


def default_out(config: TrainConfig) -> Path:
    m = config.model
    return Path("runs") / f"{m.kind}-d{m.dim}-l{m.layers}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_default_out(config: TrainConfig) -> Path:
    """A new directory of ``default_out``'s name, made here so that runs started in the same
    second (a seed sweep in parallel) each get one of their own: -2, -3, ... once taken."""
    base = default_out(config)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def _resume_base(out: str | None) -> tuple[TrainConfig, dict]:
    """The checkpoint config and metadata a --resume continues."""
    if out is None:
        raise ConfigError("--resume needs --out RUN, the run directory to continue")
    if Path(out).name == CHECKPOINT_NAME:
        raise ConfigError(f"--out {out} is a checkpoint; give its run directory, "
                          f"{Path(out).parent}, which the resumed run writes to")
    store = Path(out).expanduser() / CHECKPOINT_NAME
    if existing_version(store) is None:
        raise no_checkpoint_to_resume(Path(out).expanduser())
    _, meta = load_checkpoint(store)
    return checkpoint_config(meta, store), meta


@click.command()
@click.option("--data", default=None, metavar="PATH",
              help="Text file, directory (its text files; hidden entries, .zarr stores and "
                   "intes runs skipped), glob or .zarr token store  [default: Python stdlib "
                   "sources; on --resume: the run's data]")
@click.option("--model", type=click.Choice(sorted(MODELS)), default=_M.kind, show_default=True)
@click.option("--layers", type=int, default=_M.layers, show_default=True)
@click.option("--dim", type=int, default=_M.dim, show_default=True)
@click.option("--population", type=int, default=_E.population, show_default=True,
              help="Members per step (even: antithetic pairs)")
@click.option("--group-size", type=int, default=_E.group_size, show_default=True,
              help="Members that read the same sequence")
@click.option("--seq-len", type=int, default=_T.seq_len, show_default=True,
              help="Tokens scored per member per step")
@click.option("--rank", type=int, default=_E.rank, show_default=True)
@click.option("--sigma-shift", type=int, default=_E.sigma_shift, show_default=True,
              help="Noise scale 2^-SHIFT")
@click.option("--noise-reuse", type=int, default=_E.noise_reuse, show_default=True,
              help="Redraw noise every K steps")
@click.option("--fitness", type=click.Choice(FITNESS_KINDS), default=_E.fitness,
              show_default=True)
@click.option("--alpha-steps", type=int, default=_E.alpha_steps, show_default=True,
              help="Steps over which the share of weights that move decays")
@click.option("--alpha-final-log2", type=int, default=_E.alpha_final_log2, show_default=True,
              help="That share decays from 1 to 2^-K")
@click.option("--seed", type=int, default=_T.seed, show_default=True)
@click.option("--steps", type=int, default=None,
              help="Total steps to reach (counting the resumed ones)")
@click.option("--time-limit", type=float, default=None, metavar="MINUTES",
              help="Stop after this long of steps and evaluations (setup and the final "
                   f"evaluation on top)  [default: {DEFAULT_TIME_LIMIT:g} if no --steps]")
@click.option("--eval-every", type=int, default=None, metavar="STEPS",
              help="Evaluate every STEPS steps  [default: automatic, ~5% of the time]")
@click.option("--eval-streams", type=int, default=EVAL_STREAMS, show_default=True,
              help="Windows of the valid split each evaluation scores (the run's last scores "
                   f"all of them, up to {FINAL_EVAL_TOKENS:,} tokens)")
@click.option("--eval-len", type=click.IntRange(1, MAX_SEQ_LEN), default=EVAL_LEN,
              show_default=True, help="Tokens scored per window")
@click.option("--checkpoint-every", type=int, default=None, metavar="STEPS",
              help="Checkpoint every STEPS steps  [default: at each evaluation]")
@click.option("--chunk-pairs", type=int, default=None,
              help="Evaluate the population this many pairs at a time (less memory)")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--out", default=None, metavar="RUN",
              help="Run directory  [default: runs/MODEL-dDIM-lLAYERS-TIME]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def pretrain(ctx: click.Context, **flags) -> None:
    """Pretrain an integer language model with ES; writes RUN/checkpoint.zarr, metrics, plot.

    With --resume the model, ES, seq-len and seed settings and the validation sample
    (--eval-streams, --eval-len) come from the checkpoint (the defaults below are for new
    runs); a setting given that differs from it is refused.
    """
    given = {n for n in flags if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
    if distributed.launched():  # each process is one worker of a sharded population
        if flags["out"] is None:  # the default is named by each worker's clock
            raise ConfigError("under torchrun give --out RUN, the run directory every worker "
                              "uses")
        distributed.pretrain_from(lambda: _inputs(flags, given), backend=flags["backend"])
        return
    config, corpus, options = _inputs(flags, given)

    def train(out: Path) -> None:
        with distributed.sigterm_as_interrupt():
            run_pretraining(config, corpus, replace(options, out=out), backend=flags["backend"])

    if flags["out"]:
        train(options.out)
        return
    runs_existed = default_out(config).parent.exists()
    out = claim_default_out(config)
    try:
        train(out)
    except BaseException:  # a run that wrote nothing leaves no empty directories behind
        for made in (out, out.parent) if not runs_existed else (out,):
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def _inputs(flags: dict, given: set[str]) -> tuple[TrainConfig, Corpus, RunOptions]:
    """The run's config, corpus and options from the flags (and, on --resume, the checkpoint);
    --out's default is left to the caller."""
    data, meta = flags["data"], None
    if flags["resume"]:
        base, meta = _resume_base(flags["out"])
        config = build_config(base, flags, given & set(CONFIG_FLAGS))
        data = data if data is not None else meta.get("data")
        if "eval_sample" in meta:  # the run's validation sample, unless given
            for name, value in zip(("eval_streams", "eval_len"), meta["eval_sample"], strict=True):
                flags[name] = flags[name] if name in given else value
    else:
        config = build_config(TrainConfig(), flags, set(CONFIG_FLAGS))
    no_budget = flags["steps"] is None and flags["time_limit"] is None
    options = RunOptions(
        out=Path(flags["out"]).expanduser() if flags["out"] else Path("."),
        steps=flags["steps"],
        time_limit=DEFAULT_TIME_LIMIT if no_budget else flags["time_limit"],
        eval_every=flags["eval_every"],
        eval_streams=flags["eval_streams"],
        eval_len=flags["eval_len"],
        checkpoint_every=flags["checkpoint_every"],
        resume=flags["resume"],
        chunk_pairs=flags["chunk_pairs"],
        progress=flags["progress"],
    )
    options.validate()
    config.validate()  # fail fast, before reading a corpus; vocab is checked again below
    from_run = meta is not None and flags["data"] is None  # a resume on the run's own data
    corpus = run_corpus(meta) if from_run else load_corpus(data)
    if not flags["resume"]:
        config = replace(config, model=replace(config.model, vocab_size=corpus.vocab_size))
    return config, corpus, options
