"""`intes finetune`: ES fine-tuning of a local Hugging Face causal LM on a text reward.

Only parses arguments, loads things and calls ``intes.adapters.hf.ESFineTuner``. Everything is
written to a temporary folder next to --out and renamed into place at the end, so an
interrupted or failed run never leaves a half-written model. torch and transformers are
imported inside the functions that need them, so `intes --help` stays fast.

Under torchrun (``torchrun --nproc-per-node N intes finetune ...``) every process is one
worker: it joins the process group (gloo, for its small host-side collectives), generates for its
shard of the population, and all apply the same update (see ``intes.adapters.hf``): the
replicas stay bit-identical (and equal one process's model where the float forward does not
depend on the batch size). Rank 0 alone shows progress and writes --out.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from intes.adapters import MAX_RANK, MAX_SEED, SHAPINGS, check_settings, target_pattern
from intes.adapters.tasks import DEFAULT_TARGET_CHARS, load_task
from intes.errors import ConfigError, DataError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line (errors are printed as one line)."""
    return " ".join(str(exc).split())[:limit]


def _read_prompts(path: Path) -> list[str]:
    """Non-blank lines of the prompts file, trailing whitespace removed (a trailing space
    changes the tokens and is almost always accidental)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts file {path}: {exc}") from None
    lines = [line.rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"prompts file {path} has no prompts (one per line)")
    return lines


def _import_reward(spec: str):
    """The callable named by 'package.module:function' or 'path/to/file.py:function'."""
    module_name, colon, attr = spec.rpartition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"--reward must look like module:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location("intes_user_reward", module_name)
            if loader is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a console script's path lacks the cwd
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed to import: say so in one line
        raise ConfigError(f"cannot import reward module {module_name!r}: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}")
    return fn


def _require_hf() -> None:
    """Refuse in one line where torch or transformers is not installed: they are optional
    (the package's ``hf`` extra), and the command imports them only when it runs."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"intes finetune needs {' and '.join(missing)}, not installed here: "
                          "pip install torch transformers")


def _resolve_device(device: str | None) -> str:
    """The torch device to use, refused in one line if it does not exist or is not here.

    CUDA is checked without touching a GPU, so torchrun workers bind theirs first."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device; use e.g. cpu, cuda or "
                          "cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no GPU is visible")
            raise ConfigError(f"--device {device}: CUDA is not available here ({why}); "
                              "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif dev.type == "meta":
        raise ConfigError("--device meta holds no weights; use cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # whichever backend it is, it does not work here
            raise ConfigError(f"--device {device} is not available here "
                              f"({type(exc).__name__}: {_one_line(exc, 100)})") from None
    return device


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise DataError(f"model path {path} is not a folder made by save_pretrained")


def _load_model(path: Path, dtype: str, device: str):
    """Tokenizer and causal LM from a save_pretrained folder, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except Exception as exc:  # whatever is wrong with the folder, the user must fix the folder
        raise DataError(f"cannot load a causal LM and tokenizer from {path}: "
                        f"{type(exc).__name__}: {_one_line(exc)}") from None
    return model.to(device), tokenizer


def _plot(history: list[dict], path: Path) -> None:
    """Reward per step: population mean with the min..max band (an Agg canvas, as
    ``intes.plot``: no pyplot, so no global backend or figure state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.fill_between(steps, [h["reward_min"] for h in history], [h["reward_max"] for h in history],
                    alpha=0.25, label="population min..max")
    ax.plot(steps, [h["reward_mean"] for h in history], label="population mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ES step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _check_out(out: Path) -> None:
    """Refuse an --out that already holds files (checked before any slow work)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder")


def _staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside --out, renamed onto it once everything is written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)  # the only way to read it: set it and put it straight back
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a plain mkdir's mode, not mkdtemp's 0700
    return tmp


@click.command("finetune")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Folder made by save_pretrained (model + tokenizer); loaded offline.")
@click.option("--task", type=str,
              help="Built-in reward: conciseness (prompt lines 'prompt<TAB>target', rewarding "
                   "answers as long as the target; a line without a tab asks for "
                   f"{DEFAULT_TARGET_CHARS} characters) or countdown (the last number of a "
                   "line is the target, the others the numbers to use).")
@click.option("--reward", "reward_spec", type=str,
              help="Own reward module:function or file.py:function: f(prompt, completion)->float.")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(path_type=Path),
              help="Text file, one prompt per line, trailing whitespace removed (conciseness: "
                   "prompt<TAB>target; without a tab the target is "
                   f"{DEFAULT_TARGET_CHARS} characters). Every step scores every prompt with "
                   "every member, so the file sets the work per step.")
@click.option("--population", default=8, show_default=True, help="Members per step (even, >= 2).")
@click.option("--sigma", default=1e-3, show_default=True,
              help="Perturbation scale (> 0): each weight's perturbation has std sigma * "
                   "sqrt(rank) (rank-r factors of N(0, 1) entries, no 1/sqrt(rank)).")
@click.option("--lr", default=5e-7, show_default=True,
              help="Step (> 0) of W += lr/(N sigma) sum f_m eps_m; the paper's alpha times sigma.")
@click.option("--rank", default=1, show_default=True,
              help=f"Rank of each perturbation, 1..{MAX_RANK}.")
@click.option("--shaping", type=click.Choice(SHAPINGS), default="zscore",
              show_default=True, help="Fitness shaping.")
@click.option("--steps", default=100, show_default=True, help="ES steps.")
@click.option("--max-new-tokens", default=64, show_default=True, help="New tokens per prompt.")
@click.option("--seed", default=0, show_default=True, help=f"Noise seed, 0..{MAX_SEED}.")
@click.option("--target-modules", default=None,
              help="Regex over the names of the Linear (and GPT-2 Conv1D) layers to perturb "
                   "(default: all). Weights stored as bare parameters, such as fused MoE "
                   "experts, are never perturbed.")
@click.option("--member-chunk", default=None, type=int,
              help="Members per generate() call, >= 1 (default: the whole population).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Weights' dtype (auto: as saved). Bfloat16 / float16 weights (chosen or "
                   "saved) that are perturbed each get a float32 master copy, 4 more bytes per "
                   "weight, so that small updates are not rounded away.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="New folder for the fine-tuned model, metrics.jsonl and reward.png.")
def finetune(model_path: Path, task: str | None, reward_spec: str | None, prompts_path: Path,
             population: int, sigma: float, lr: float, rank: int, shaping: str, steps: int,
             max_new_tokens: int, seed: int, target_modules: str | None,
             member_chunk: int | None, dtype: str, device: str | None, out: Path) -> None:
    """Fine-tune a Hugging Face causal LM with low-rank evolution strategies."""
    _require_hf()
    if (task is None) == (reward_spec is None):
        raise ConfigError("give exactly one of --task NAME or --reward module:function")
    check_settings(as_flags=True, population=population, sigma=sigma, lr=lr, rank=rank,
                   steps=steps, max_new_tokens=max_new_tokens, seed=seed,
                   member_chunk=member_chunk)  # before anything slow is loaded
    target_pattern(target_modules, as_flag=True)
    es_args = dict(population=population, sigma=sigma, lr=lr, rank=rank, seed=seed,
                   shaping=shaping, max_new_tokens=max_new_tokens,
                   target_modules=target_modules, member_chunk=member_chunk)
    from intes import distributed

    def inputs() -> tuple[str, list[str], object]:
        """What each machine reads for itself: its device, the prompts, the reward (and it
        checks its copy of the model folder is there)."""
        resolved = _resolve_device(device)
        _check_model_folder(model_path)
        _check_out(out)
        lines = _read_prompts(prompts_path)
        if task is not None:
            return resolved, *load_task(task, lines)
        return resolved, lines, _import_reward(reward_spec)

    launched = distributed.launched()  # one of several torchrun workers
    if launched:
        import torch

        distributed.init_from_env("cuda" if torch.cuda.is_available() else "cpu")
    else:
        torch_device, prompts, reward_fn = inputs()
    try:
        # torchrun stops the other workers when one fails: say so in one line and clean up
        with distributed.sigterm_as_error() if launched else contextlib.nullcontext():
            if launched:  # read after joining: one machine's missing file stops all at once
                torch_device, prompts, reward_fn = distributed.read_together(inputs)
            is_main = _agree(prompts, task or reward_spec, dtype, steps, es_args)
            history = _train(model_path, prompts, reward_fn, dtype, torch_device, steps, out,
                             es_args, is_main)
            distributed.shutdown(finished=True)
    finally:
        distributed.shutdown()
    if not is_main:
        return
    first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
    click.echo(f"saved {out}: mean reward {first:.4g} -> {last:.4g} over {len(history)} steps")


def _agree(prompts: list[str], reward: str, dtype: str, steps: int, es_args: dict) -> bool:
    """Whether this is the main process; under torchrun, first stop every worker unless all
    were given the same settings and prompts (the weights are compared before step 0)."""
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    import numpy as np

    from intes import distributed

    settings = json.dumps({"prompts": prompts, "reward": reward, "dtype": dtype, "steps": steps,
                           distributed.VERIFY_ENV: distributed.verify_every(),  # checks in step
                           **es_args}, sort_keys=True).encode()
    distributed.assert_same(distributed.digest([("settings", np.frombuffer(settings, np.uint8))]),
                            "the settings and prompts", diverged=False)
    return torch.distributed.get_rank() == 0


def _train(model_path: Path, prompts: list[str], reward_fn, dtype: str, device: str,
           steps: int, out: Path, es_args: dict, is_main: bool = True) -> list[dict]:
    """Run the ES steps with a progress bar, then write model, metrics and plot atomically.

    Only the main process (rank 0 under torchrun) shows progress and writes; every worker
    checks the final weights agree first."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from intes.adapters.hf import ESFineTuner

    hf_logging.set_verbosity_error()  # keep the terminal to our progress bar and errors
    hf_logging.disable_progress_bar()
    model, tokenizer = _load_model(model_path, dtype, device)
    tuner = ESFineTuner(model, tokenizer, reward_fn, **es_args)
    if not is_main:
        for _ in range(steps):
            tuner.step(prompts)
        tuner.verify()
        return []
    tmp = _staging_dir(out)
    try:
        history = []
        with tqdm(range(steps), desc="finetune", unit="step") as bar:
            for _ in bar:
                history.append(tuner.step(prompts))
                bar.set_postfix(reward=f"{history[-1]['reward_mean']:.4g}")
                if len(history) == 1 and tuner.batching():  # known from the first step on
                    bar.write(f"{type(model).__name__}: {tuner.batching()}")
        tuner.verify()  # the weights every worker ends with (a no-op in one process)
        tuner.save(tmp)
        with open(tmp / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        _plot(history, tmp / "reward.png")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return history

