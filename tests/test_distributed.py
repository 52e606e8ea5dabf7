"""Distributed pretraining: 2 gloo workers on 127.0.0.1 give the weights of 1 process.

Workers are real processes: torchrun for the runs a user would launch, and for the failure
tests two processes given torchrun's environment variables by hand (this process hosts their
store, as torchrun's agent does), so the test can make one die or stall and watch the other.
Tiny configs keep each run to seconds; most of the time is importing torch in every process.
No assertion is on elapsed time: a stalled worker waits for the test to release it, and the
timeouts here only bound a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from intes import distributed  # noqa: E402
from intes.cli import cli  # noqa: E402
from intes.engine import Engine, ModelConfig, TrainConfig  # noqa: E402
from intes.errors import ConfigError  # noqa: E402
from intes.es import ESConfig  # noqa: E402
from intes.runs import load_engine  # noqa: E402
from intes.validation import log_likelihood_total  # noqa: E402

BIN = Path(sys.executable).parent
INTES = str(BIN / "intes") if (BIN / "intes").exists() else shutil.which("intes")
TORCHRUN = str(BIN / "torchrun") if (BIN / "torchrun").exists() else shutil.which("torchrun")
# population 10 = 5 pairs: uneven shards (3 + 2) over 2 workers
TINY = ["--model", "rwkv", "--dim", "32", "--layers", "1", "--population", "10", "--group-size",
        "2", "--seq-len", "8", "--seed", "5", "--eval-streams", "2", "--eval-len", "16",
        "--no-progress"]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")

needs_cli = pytest.mark.skipif(INTES is None or TORCHRUN is None,
                               reason="the intes and torchrun commands are not installed")
slow = pytest.mark.slow  # starts worker processes, each importing torch: seconds apiece


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def port() -> Iterator[int]:
    """The port of a TCP store this process hosts for hand-started workers, as torchrun's agent
    hosts one (TORCHELASTIC_USE_AGENT_STORE): the OS picks the port and the store holds it
    throughout, so no other process can take it between picking and binding."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store.port
    del store


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (a single process), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, **extra}


def worker_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    """What torchrun gives worker ``rank`` of 2 on this machine, its agent's store at ``port``."""
    return clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     TORCHELASTIC_USE_AGENT_STORE="True", **extra)


def single(args: list[str]) -> None:
    """``intes pretrain *args`` in this process (no launcher variables: one worker)."""
    assert not distributed.launched()
    cli.main(args=["pretrain", *args], standalone_mode=False)


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``intes pretrain *args`` on 2 workers; --standalone: torchrun's store takes a free port
    itself (no port picked here and raced for)."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", INTES, "pretrain", *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=180)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def checkpoint_digest(run: Path) -> str:
    """sha256 of the latest checkpoint's array files (zarr JSON metadata left out)."""
    store = run / "checkpoint.zarr"
    h = hashlib.sha256()
    for p in sorted(q for q in store.rglob("*") if q.is_file() and not q.name.endswith(".json")):
        h.update(p.relative_to(store).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in records(run) if r["event"] == "step"]


def figures(run: Path) -> list[dict]:
    """The evaluation and final records of a run, less their clock readings."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records(run)
            if r["event"] != "step"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    words = "a quick brown fox jumps over the lazy dog while odd wizards quietly hex it".split()
    lines = (" ".join(words[(i * 7 + j * j * 3 + i // 5) % len(words)] for j in range(11))
             for i in range(300))
    path = tmp_path_factory.mktemp("dist") / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


# ---------------------------------------------------------------------------------------------
# in-process pieces


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_cover_every_pair_once_and_evenly(world: int) -> None:
    for pairs in range(13):
        shards = [distributed.shard_pairs(pairs, r, world) for r in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == pairs
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))  # contiguous
        sizes = [stop - start for start, stop in shards]
        assert max(sizes) - min(sizes) <= 1


def test_digest_sees_every_byte_dtype_and_name() -> None:
    a = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    base = distributed.digest([("w", a)])
    assert base == distributed.digest([("w", a.copy())])
    flipped = a.copy()
    flipped[7, 14] += 1
    assert len({base, distributed.digest([("w", flipped)]), distributed.digest([("v", a)]),
                distributed.digest([("w", a.astype(np.int16))]),
                distributed.digest([("w", a.reshape(15, 8))])}) == 5


@pytest.mark.parametrize("cuda_status", [None, "cuda backend unavailable: no CUDA GPU"])
def test_only_work_on_cuda_counts_as_using_a_gpu(monkeypatch, cuda_status) -> None:
    """A named backend is taken as named ("cuda" is also the HF adapter's torch device, whose
    run needs no triton or cupy); 'auto' as the compute backends resolve it (the cpu one)."""
    from intes import kernels

    monkeypatch.setattr(kernels, "available", lambda: {"reference": None, "cpu": None,
                                                       "cuda": cuda_status})
    assert distributed._uses_cuda("cuda") and not distributed._uses_cuda("cpu")
    assert not distributed._uses_cuda("auto")


@pytest.mark.parametrize("name, raw, ok", [
    ("INTES_DIST_TIMEOUT", "", 60.0), ("INTES_DIST_TIMEOUT", "2.5", 2.5),
    ("INTES_DIST_TIMEOUT", "0", None), ("INTES_DIST_TIMEOUT", "-3", None),
    ("INTES_DIST_TIMEOUT", "inf", None), ("INTES_DIST_TIMEOUT", "nan", None),
    ("INTES_DIST_TIMEOUT", "soon", None), ("INTES_DIST_TIMEOUT", "2592000", 2592000.0),
    ("INTES_DIST_TIMEOUT", "1e10", None), ("INTES_DIST_TIMEOUT", "1e15", None),
    ("INTES_DIST_VERIFY_EVERY", "", 10), ("INTES_DIST_VERIFY_EVERY", "3", 3),
    ("INTES_DIST_VERIFY_EVERY", "0", None), ("INTES_DIST_VERIFY_EVERY", "2.5", None),
])
def test_distributed_settings_are_checked(monkeypatch, name, raw, ok) -> None:
    """The two settings from the environment: their defaults, a good value, and one clear
    error for a value that would hang a run or never check it."""
    monkeypatch.setenv(name, raw)
    read = (distributed.timeout_seconds if name == "INTES_DIST_TIMEOUT"
            else distributed.verify_every)
    if ok is None:
        with pytest.raises(ConfigError, match=name):
            read()
    else:
        assert read() == ok


def test_collectives_are_no_ops_in_one_process() -> None:
    local = np.arange(6, dtype=np.int32)
    assert distributed.shard_range(6) == (0, 6)
    assert (distributed.all_gather_fitness(local, 6) == local).all()
    assert distributed.agree_step(True, False) == (True, False)
    assert distributed.agree_step(False, True) == (False, True)
    assert distributed.sum_ranks(-7) == -7
    distributed.assert_same(3, "anything")


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_sharded_evaluation_adds_up_to_one_process_s(world: int) -> None:
    """Each worker scores a contiguous share of the validation windows (none if there are
    fewer windows than workers); their integer totals sum to one process's exactly."""
    cfg = TrainConfig(model=ModelConfig(vocab_size=16, dim=8), es=ESConfig(population=8),
                      seq_len=4, seed=3)
    engine = Engine(cfg, "reference")
    windows = np.random.default_rng(0).integers(0, 16, (5, 9)).astype(np.int32)
    parts = [distributed.shard_total(engine, windows, r, world) for r in range(world)]
    assert sum(parts) == log_likelihood_total(engine, windows)
    assert parts.count(0) == max(world - len(windows), 0)  # each window scored once


@pytest.mark.parametrize("gpus, local_rank", [(0, 0), (1, 1)])
def test_cuda_workers_without_a_gpu_of_their_own_are_refused(monkeypatch, gpus: int,
                                                            local_rank: int) -> None:
    """No usable GPU, or more workers on a machine than GPUs: one line, before torch is asked
    to use a GPU it does not have."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    want = (r"torch sees no GPU on this machine; compute on the CPU" if gpus == 0 else
            rf"local rank {local_rank}\) has no GPU .* sees {gpus}")
    with pytest.raises(ConfigError, match=want):
        distributed.init_from_env("cuda")


def test_torchrun_needs_an_explicit_out(monkeypatch, text: Path) -> None:
    """The default run directory is named from each worker's own clock, so workers could
    disagree on it: under torchrun --out is required, in one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["pretrain", *TINY, "--data", str(text), "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == ("error: under torchrun give --out RUN, the run directory "
                                     "every worker uses")


def start_together(procs: list[subprocess.Popen]) -> list[str]:
    """Release workers that said "ready" and wait for a line on stdin, all at once; returns
    what each printed before. Importing torch takes seconds, unevenly on a busy machine, so
    this keeps a short INTES_DIST_TIMEOUT from also bounding the skew of their start-up."""
    before = []
    for p in procs:
        lines = []
        for line in p.stdout:  # line by line: nothing after "ready" is read ahead here
            if line == "ready\n":
                break
            lines.append(line)
        else:
            pytest.fail(f"a worker exited before it was ready:\n{''.join(lines)}")
        before.append("".join(lines))
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return before


COLLECTIVES = textwrap.dedent("""
    import os, sys, numpy as np
    import torch.distributed
    from intes import distributed as d
    print("ready", flush=True)
    sys.stdin.readline()  # the test starts both workers together
    d._bind_gpu = lambda local_rank: None  # no GPU here: the cuda backend's compute is not run
    d.init_from_env("cuda")
    assert torch.distributed.get_backend() == "gloo"  # whatever the compute backend
    r = int(os.environ["RANK"])
    a, b = d.shard_range(10)
    assert (a, b) == [(0, 6), (6, 10)][r], (a, b)
    full = d.all_gather_fitness(np.arange(a, b, dtype=np.int32) * 7, 10)
    assert full.dtype == np.int32 and (full == np.arange(10) * 7).all(), full
    rewards = d.all_gather_fitness(np.arange(a, b)[:, None] * np.array([0.5, 1.5]), 10)
    assert rewards.shape == (10, 2) and (rewards[:, 1] == np.arange(10) * 1.5).all()
    a, b = d.shard_range(2)  # fewer pairs than workers: rank 1 scores nothing
    assert (d.all_gather_fitness(np.arange(a, b, dtype=np.int32), 2) == [0, 1]).all()
    assert d.agree_step(r == 1, r == 1) == (True, False)  # anyone's stop, rank 0's evaluation
    assert d.agree_step(False, r == 0) == (False, True)
    assert d.sum_ranks([-5, 2**40][r]) == 2**40 - 5  # int64, exact
    d.assert_same(42, "the answer")
    try:
        d.assert_same(r, "the rank")
    except d.DistributedError as err:
        assert "rank(s) 1 differ" in str(err), err
    else:
        raise SystemExit("a divergence went unnoticed")
    if r == 1:  # stalls until the test closes its stdin, which it does once rank 0 has
        sys.stdin.read()  # exited: rank 0 must give up after INTES_DIST_TIMEOUT, not hang
    try:
        d.agree_step(False, False)
    except d.DistributedError as err:  # rank 1 finds rank 0 gone, or times out itself
        assert r == 1 or "Timed out" in str(err), err
    else:
        raise SystemExit("a stalled worker went unnoticed")
    if r == 0:  # a finished run's closing barrier, its peer still silent: one error line too
        try:
            d.shutdown(finished=True)
        except d.DistributedError as err:
            assert "during the end of the run" in str(err), err
        else:
            raise SystemExit("the closing barrier passed without its peer")
    d.shutdown()  # leave the group as the trainer does on an error path
""")


@slow
def test_collectives_between_two_workers(port: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVES],
                              env=worker_env(r, port, INTES_DIST_TIMEOUT="2"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        before = start_together(procs)
        # rank 0 first: it can only finish by giving up on rank 1, whose stdin communicate()
        # then closes, letting it find rank 0 gone (timeouts: hang guards only)
        outputs = [b + p.communicate(timeout=120)[0] for b, p in zip(before, procs, strict=True)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs


DIVERGE = textwrap.dedent("""
    import os, numpy as np
    from intes import distributed as d
    from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
    from intes.es import ESConfig
    d.init_from_env("reference")
    r = int(os.environ["RANK"])
    cfg = TrainConfig(model=ModelConfig(vocab_size=16, dim=8), es=ESConfig(population=8),
                      seq_len=4, seed=3)
    engine, fitness = Engine(cfg, "reference"), d.ShardFitness(8)
    rng = np.random.default_rng(0)
    try:
        for step in range(6):
            if step == 2 and r == 1:  # a silent fault on one replica
                engine._params["head"][0, 0] ^= 1  # the fault: a flipped bit in memory
            engine.apply_fitness(fitness(engine, member_windows(rng.integers(0, 16, (4, 5)), 2)))
    except d.DistributedError as err:
        print(f"stopped before step {engine.step_index}: {err}")
        d.shutdown()  # leave the group as the trainer does on an error path
        raise SystemExit(3)
    raise SystemExit("the diverged replica went unnoticed")
""")


@slow
def test_a_replica_that_diverges_stops_every_worker(port: int) -> None:
    """The replica check (every INTES_DIST_VERIFY_EVERY steps, here 1) sees one worker's weights
    change behind the others' backs and stops both with one line naming the rank."""
    procs = [subprocess.Popen([sys.executable, "-c", DIVERGE],
                              env=worker_env(r, port, INTES_DIST_VERIFY_EVERY="1",
                                             INTES_DIST_TIMEOUT="60"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outputs
    for out in outputs:
        assert "stopped before step 2: workers diverged: the weights at step 2 on rank(s) 1" in (
            out), out


# ---------------------------------------------------------------------------------------------
# torchrun == one process


@pytest.fixture(scope="module")
def two_steps(text: Path, runs: Path) -> tuple[Path, Path]:
    """The same 2 steps, evaluated after each, by one process and by 2 torchrun workers."""
    one, two = runs / "one", runs / "two"
    args = [*TINY, "--data", str(text), "--steps", "2", "--eval-every", "1"]
    single([*args, "--out", str(one)])
    ok(torchrun([*args, "--out", str(two)]))
    return one, two


@slow
@needs_cli
def test_two_workers_give_the_weights_and_figures_of_one(two_steps: tuple[Path, Path]) -> None:
    """Same checkpoint, and the same validation figures to the bit: the workers score shares
    of the windows and sum integers, the whole valid split's at the end too."""
    one, two = two_steps
    assert checkpoint_digest(two) == checkpoint_digest(one)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert steps_logged(two) == [1, 2]  # rank 0 alone writes the metrics
    assert [(r["event"], r["step"]) for r in figures(two)] == [
        ("eval", 0), ("eval", 1), ("eval", 2), ("final", 2)]
    assert figures(two) == figures(one)


@slow
@needs_cli
def test_resume_under_torchrun_is_bit_exact(two_steps: tuple[Path, Path], text: Path,
                                            runs: Path) -> None:
    _, two = two_steps
    ok(torchrun(["--out", str(two), "--resume", "--steps", "4", "--no-progress"]))
    straight = runs / "four"
    single([*TINY, "--data", str(text), "--steps", "4", "--out", str(straight)])
    assert checkpoint_digest(two) == checkpoint_digest(straight)
    assert steps_logged(two) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# failures: one line, no hang, nothing broken on disk


def launch(commands: list[list[str]], port: int, logs: Path,
           **extra: str) -> list[subprocess.Popen]:
    """Worker r runs ``commands[r]`` as torchrun would start it; output in logs/rank{r}.log."""
    procs = []
    for r, cmd in enumerate(commands):
        with (logs / f"rank{r}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, env=worker_env(r, port, **extra), stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(timeout=120) for p in procs]


def last_line(path: Path) -> str:
    return path.read_text().strip().splitlines()[-1]


# ``intes pretrain`` (argv after -c) that SIGKILLs itself after 2 steps, before it scores step 3:
# a worker that dies at a known step, with no chance to say goodbye
DIES_AFTER_2_STEPS = textwrap.dedent("""
    import os, signal, sys
    from intes import distributed
    from intes.cli import main
    score = distributed.ShardFitness.__call__
    def dying(self, engine, windows):
        if engine.step_index == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return score(self, engine, windows)
    distributed.ShardFitness.__call__ = dying
    main(sys.argv[1:])
""")


@slow
@needs_cli
def test_dead_worker_stops_the_other_with_one_line(text: Path, tmp_path: Path, port: int) -> None:
    timeout = 30  # a dead peer's sockets close, so it is noticed long before the timeout
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--data", str(text), "--steps", "100000", "--checkpoint-every",
            "1", "--eval-every", "100000", "--out", str(out)]
    procs = launch([[INTES, *args], [sys.executable, "-c", DIES_AFTER_2_STEPS, *args]], port,
                   tmp_path, INTES_DIST_TIMEOUT=str(timeout))
    try:
        assert finish(procs) == [1, -signal.SIGKILL], last_line(tmp_path / "rank0.log")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    line = last_line(tmp_path / "rank0.log")
    assert line.startswith("error: worker 0 lost the other workers during"), line
    assert f"INTES_DIST_TIMEOUT={timeout} s" in line and "continue with --resume" in line, line
    assert steps_logged(out) == [1, 2]
    engine, _ = load_engine(out)  # the last checkpoint rank 0 wrote is whole
    assert engine.step_index == 2


# ``intes pretrain`` (argv after -c) whose rank 1 flips a weight before it scores step 3: a
# replica that silently diverges
DIVERGES_AFTER_2_STEPS = textwrap.dedent("""
    import os, sys
    from intes import distributed
    from intes.cli import main
    score = distributed.ShardFitness.__call__
    def faulty(self, engine, windows):
        if engine.step_index == 2 and os.environ["RANK"] == "1":
            engine._params["head"][0, 0] ^= 1  # the fault: a flipped bit in memory
        return score(self, engine, windows)
    distributed.ShardFitness.__call__ = faulty
    main(sys.argv[1:])
""")


@slow
@needs_cli
def test_diverged_workers_do_not_offer_their_checkpoint(text: Path, tmp_path: Path,
                                                        port: int) -> None:
    """Rank 0's checkpoint may hold the diverged weights, so the error names no --resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", DIVERGES_AFTER_2_STEPS, "pretrain", *TINY, "--data", str(text),
           "--steps", "100000", "--checkpoint-every", "1", "--eval-every", "100000", "--out",
           str(out)]
    procs = launch([cmd, cmd], port, tmp_path, INTES_DIST_VERIFY_EVERY="1",
                   INTES_DIST_TIMEOUT="30")
    assert finish(procs) == [1, 1], last_line(tmp_path / "rank0.log")
    for r in range(2):
        line = last_line(tmp_path / f"rank{r}.log")
        assert line.startswith("error: workers diverged: the weights at step 2 on rank(s) 1"), (
            line)
        assert "--resume" not in line, line
    assert load_engine(out)[0].step_index == 2  # there was a checkpoint it could have named


@slow
@needs_cli
def test_workers_with_different_time_limits_stop_together(text: Path, tmp_path: Path,
                                                          port: int) -> None:
    """Only rank 1 has a time limit, spent after its first step: every worker votes after
    every step whatever its own limit, so both stop after step 1 and finish the run."""
    out = tmp_path / "run"
    cmd = [INTES, "pretrain", *TINY, "--data", str(text), "--steps", "50", "--out", str(out)]
    procs = launch([cmd, [*cmd, "--time-limit", "1e-9"]], port, tmp_path,
                   INTES_DIST_TIMEOUT="30")
    assert finish(procs) == [0, 0], last_line(tmp_path / "rank0.log")
    assert steps_logged(out) == [1]
    assert figures(out)[-1]["event"] == "final" and figures(out)[-1]["step"] == 1


# ``intes pretrain`` (argv after -c) with a replica check interval of its own
VERIFIES_EVERY_3_STEPS = textwrap.dedent("""
    import os, sys
    os.environ["INTES_DIST_VERIFY_EVERY"] = "3"
    from intes.cli import main
    main(sys.argv[1:])
""")


@slow
@needs_cli
@pytest.mark.parametrize("differ", ["data", "verify every", "eval sample", "seed"])
def test_workers_refuse_to_start_on_different_data_or_settings(differ: str, text: Path,
                                                               tmp_path: Path,
                                                               port: int) -> None:
    """Other data, another INTES_DIST_VERIFY_EVERY (it decides when a worker joins the
    replica check, so workers would call different collectives), another validation sample
    (each worker scores a shard of its own, so the sum would mix two samples) or another
    seed: refused before any step, naming the setting that differs."""
    other = tmp_path / "other.txt"
    other.write_text(text.read_text().replace("fox", "cat"), encoding="utf-8")
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--steps", "2", "--out", str(out)]
    second = {"data": [INTES, *args, "--data", str(other)],
              "verify every": [sys.executable, "-c", VERIFIES_EVERY_3_STEPS, *args, "--data",
                               str(text)],
              "eval sample": [INTES, *args, "--data", str(text), "--eval-len", "8"],
              "seed": [INTES, *args, "--data", str(text), "--seed", "7"]}[differ]
    assert finish(launch([[INTES, *args, "--data", str(text)], second], port, tmp_path)) == [1, 1]
    want = {"data": "error: worker 1's data differ from worker 0's",
            "verify every": "error: INTES_DIST_VERIFY_EVERY is 3 on worker 1 but 10 on worker 0",
            "eval sample": "error: eval_sample is [2, 8] on worker 1 but [2, 16] on worker 0",
            "seed": "error: config.seed is 7 on worker 1 but 5 on worker 0"}[differ]
    for r in range(2):
        line = last_line(tmp_path / f"rank{r}.log")
        assert line.startswith(want), line
    assert not out.exists()  # every worker checked before rank 0 wrote anything


@slow
@needs_cli
@pytest.mark.parametrize("missing", ["data", "checkpoint"])
def test_inputs_missing_on_one_machine_stop_every_worker_at_once(missing: str, text: Path,
                                                                  tmp_path: Path,
                                                                  port: int) -> None:
    """On several machines each reads its own copy of the data (and, on --resume, of the run
    directory): one whose copy is missing failed before joining, and the others waited out
    INTES_DIST_TIMEOUT, then reported only that a worker was lost."""
    args = ["pretrain", *TINY, "--steps", "2"]
    if missing == "data":
        commands = [[INTES, *args, "--data", str(text), "--out", str(tmp_path / "run")],
                    [INTES, *args, "--data", str(tmp_path / "absent.txt"), "--out",
                     str(tmp_path / "run")]]
        reason = "does not exist"
    else:
        single([*TINY, "--data", str(text), "--steps", "1", "--out", str(tmp_path / "a")])
        commands = [[INTES, *args, "--resume", "--out", str(tmp_path / "a")],
                    [INTES, *args, "--resume", "--out", str(tmp_path / "b")]]
        reason = "no checkpoint at"
    codes = finish(launch(commands, port, tmp_path, INTES_DIST_TIMEOUT="20"))
    assert codes == [1, 1]
    first, second = (last_line(tmp_path / f"rank{r}.log") for r in range(2))
    assert first.startswith("error: worker 1 cannot start: ") and reason in first, first
    assert second.startswith("error: ") and reason in second, second
    assert not (tmp_path / "run").exists()


@slow
@needs_cli
def test_sigterm_to_torchrun_saves_the_last_finished_step(text: Path, tmp_path: Path) -> None:
    """A scheduler stops a torchrun job with SIGTERM, which torchrun passes to its workers:
    they ended with nothing saved past the last checkpoint and a line blaming a worker that
    had not failed. Now rank 0 saves the last finished step, as on Ctrl-C."""
    out = tmp_path / "run"
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", INTES, "pretrain", *TINY,
           "--data", str(text), "--steps", "100000", "--eval-every", "100000",
           "--checkpoint-every", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r["event"] == "step" and r["step"] >= 3 for r in records(out)):
            assert time.monotonic() < deadline and proc.poll() is None, "no steps"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    saved = load_engine(out)[1]["step"]
    assert saved >= 3, output
    assert (f"interrupted: checkpoint at step {saved} in {out}; continue with: torchrun [its "
            f"options] intes pretrain --out {out} --resume") in output, output
    assert "was stopped (SIGTERM)" not in output


@slow
@needs_cli
@pytest.mark.parametrize("missing", ["prompts", "model"])
def test_finetune_inputs_missing_on_one_machine_stop_every_worker_at_once(missing: str,
                                                                          tmp_path: Path,
                                                                          port: int) -> None:
    """As for pretraining: a machine whose prompts file is missing failed before joining,
    and the others waited out INTES_DIST_TIMEOUT to learn only that a worker was lost; one
    without the model folder was found only after the start check."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                        eos_token="<eos>")
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                       vocab_size=tokenizer.vocab_size))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("the quick\n")
    args = [INTES, "finetune", "--model", str(tmp_path / "model"), "--task", "conciseness",
            "--population", "2", "--steps", "1", "--max-new-tokens", "2", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--prompts"]
    good = [*args, str(tmp_path / "prompts.txt")]
    bad, reason = {
        "prompts": ([*args, str(tmp_path / "absent.txt")], "cannot read prompts file"),
        "model": ([a.replace("/model", "/absent") for a in good],
                  "model path .*absent is not a folder made by save_pretrained")}[missing]
    assert finish(launch([good, bad], port, tmp_path, INTES_DIST_TIMEOUT="20")) == [1, 1]
    first, second = (last_line(tmp_path / f"rank{r}.log") for r in range(2))
    assert re.match(f"error: worker 1 cannot start: {reason}", first), first
    assert re.match(f"error: {reason}", second), second
    assert not (tmp_path / "out").exists()
