"""Float Hugging Face causal LMs fine-tuned by the same low-rank ES core as the integer engine.

Every selected linear layer (``nn.Linear`` with Linear's own forward, and GPT-2's ``Conv1D``
whose weight is stored transposed) gets a member-aware side path during evaluation::

    y = x W^T + sigma * s_m * (x B_p) A_p^T        member m = 2p or 2p+1, s_m = +1 / -1

The factors A_p, B_p come from ``intes.noise.lowrank_factors`` keyed by
(seed, step, pair, tensor_id), with tensor_id the index of the layer in the sorted list of
selected layer names; the int8 values are divided by 16, so they are ~N(0, 1). With no
1/sqrt(r), each weight's perturbation sigma * (A_p B_p^T)_ij has std sigma * sqrt(r) at rank r.
The batch of one ``generate()`` is members x prompts (member-major), so the whole population
shares every base matmul and only the rank-r side path differs per member (HF's RWKV, whose
cached steps mix a batch's rows and whose pads change its output, generates without its cache
and in one batch per prompt length: see ``probes``). The side path lives in forward hooks
that exist only inside ``LowRankAdapter.perturbed``: base weights are never written while
members are evaluated, so unlike the perturb / generate / restore loop of "Evolution
Strategies at Scale" nothing drifts, even in bf16.

The update is rebuilt from seeds alone (no stored noise, no optimizer state)::

    W += lr / (N * sigma) * sum_m f_m s_m A_p B_p^T

with f the shaped rewards, computed per layer as one float32 matmul (A^T diag(c)) B over the
pairs (c_p = f_2p - f_2p+1). ``lr`` multiplies the textbook ES gradient estimate (hence the
1/sigma), so it does not change meaning when sigma does. "Evolution Strategies at Scale"
absorbs sigma into its step size alpha (5e-4 with sigma 1e-3); the same update here is
``lr = alpha * sigma``, hence the default lr of 5e-7. Taking lr = 5e-4 literally would move
each weight by ~0.1 per step and wreck a pretrained model.

At those defaults most per-weight changes are below half a bf16 ulp: added to a bf16 weight
they would be rounded away at every step. So each selected bf16 / fp16 weight has a float32
master copy (4 bytes per selected weight, allocated with the adapter) that takes the update,
and the weight is the master rounded to its dtype. float32 weights are updated in place.

Under torchrun (a process group is up, see ``intes.distributed``) each worker generates for a
contiguous shard of whole antithetic pairs only, the float64 reward matrix (members x prompts)
is all-gathered, and every worker applies the same seed-rebuilt update, so the replicas stay
bit-identical without sending a weight. The result is one process's only where the model's
float forward gives the same bits at any batch size (a worker generates for its shard, a
batch of its own, and kernels may reduce in another order per batch size). The workers compare
a hash of their weights before step 0, every ``INTES_DIST_VERIFY_EVERY`` steps (default 10) and
whenever ``ESFineTuner.verify`` is called (at the end). Without a process group nothing of
this runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig
from transformers.pytorch_utils import Conv1D

from intes import distributed
from intes.adapters import SHAPINGS, RewardFn, check_settings, probes, target_pattern
from intes.errors import ConfigError, DataError, IntesError
from intes.noise import lowrank_factors, member_signs

Encoding = dict[str, torch.Tensor]  # input_ids and attention_mask, one row per prompt

NOISE_UNIT = 16.0  # int8 noise is N(0, 1) in x16 fixed point; a power of two, so /16 is exact


def _in_group() -> bool:
    """Whether this process is one worker of several (torch's default process group is up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a Conv1D (whose weight is (in, out))."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weight tensors owned by more than one module (e.g. an lm_head tied to wte)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def select_layers(model: nn.Module, target_modules: str | None) -> list[tuple[str, nn.Module]]:
    """The perturbed layers, sorted by name (the order defines each layer's tensor_id).

    A tied weight (GPT-2's lm_head shares the input embedding) is skipped: the side path would
    only perturb its output role, while the update would also move the embedding. So is a
    Linear subclass with a forward of its own that does not compute y = x Wᵀ + b, the output
    the side path adds to (a MoE router returning a tuple, a quantized or grouped linear);
    Falcon's FalconLinear, which does, is kept.
    """
    pattern = target_pattern(target_modules)
    tied = _shared_weights(model)
    layers = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (Conv1D, nn.Linear)) and id(m.weight) not in tied
        and (pattern is None or pattern.search(name))
        and (not isinstance(m, nn.Linear) or _computes_linear(m))
    ]
    if not layers:
        which = f" matching {target_modules!r}" if target_modules else ""
        raise ConfigError(f"the model has no (untied) Linear layers{which} to perturb")
    return sorted(layers, key=lambda item: item[0])


@torch.no_grad()
def _computes_linear(module: nn.Linear) -> bool:
    """Whether the layer computes x Wᵀ + b: Linear's own forward does; a subclass's forward is
    tried on a small input (it may return a tuple, dequantize, ...), hooks left out."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return True
    w = module.weight
    if w.device.type == "meta" or not w.is_floating_point():  # offloaded, or quantized
        return False
    x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(w.device, w.dtype)
    try:
        y = forward(module, x)
    except Exception:  # a forward that needs more than one tensor
        return False
    expected = nn.functional.linear(x, w, module.bias)
    return (isinstance(y, torch.Tensor) and y.shape == expected.shape
            and probes.about_equal(y.float(), expected.float()))


def shape_rewards(rewards: np.ndarray, kind: str) -> np.ndarray:
    """Per-member shaped fitness f (float64, N) from per-member rewards.

    zscore: (r - mean) / std; rank: centred ranks in [-0.5, 0.5] (ties share their average
    rank); sign: +1 for the better member of its antithetic pair, -1 for the worse, 0 on a tie.
    Ties must give equal fitness: otherwise a pair whose two members scored the same would
    still push the weights along its (uninformative) noise direction.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if kind == "zscore":
        if np.ptp(r) == 0:  # exact ties: no signal (a rounding-level std would blow it up)
            return np.zeros_like(r)
        return (r - r.mean()) / r.std()
    if kind == "rank":
        order = np.argsort(r, kind="stable")
        ranks = np.empty(len(r))
        ranks[order] = np.arange(len(r))
        _, inverse = np.unique(r, return_inverse=True)
        ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
        return ranks / max(len(r) - 1, 1) - 0.5
    if kind == "sign":
        d = np.sign(r[0::2] - r[1::2])
        return np.stack([d, -d], axis=1).reshape(-1)
    raise ConfigError(f"shaping must be one of {SHAPINGS}, got {kind!r}")


def pair_coefficients(fitness: np.ndarray) -> np.ndarray:
    """c_p = sum over pair p's members of f_m * s_m: the weight of A_p B_p^T in the update."""
    f = np.asarray(fitness, dtype=np.float64)
    signed = f * member_signs(np.arange(len(f)))
    return signed.reshape(-1, 2).sum(axis=1)


def _side_path(a: torch.Tensor, b: torch.Tensor, called: list[bool], tid: int) -> Callable:
    """A forward hook adding (x B_m) (sigma s_m A_m)^T to each member's rows, in float32, and
    setting ``called[tid]``.

    a: (M, out, r) already scaled by sigma * s_m; b: (M, in, r). The batch must be
    member-major with the same number of rows per member, so one reshape groups the rows and
    two batched matmuls (rank r in the middle) cover all members.
    """
    members = a.shape[0]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        called[tid] = True
        x = args[0]
        if x.shape[0] % members:
            raise ConfigError(f"a perturbed layer got activations of shape {tuple(x.shape)}, "
                              f"whose first dimension is no multiple of the {members} members: "
                              "ES needs a model that puts the batch (members x prompts) first")
        xs = x.reshape(members, -1, x.shape[-1]).float()
        delta = torch.bmm(torch.bmm(xs, b), a.transpose(1, 2))
        return (output.float() + delta.reshape(output.shape)).to(output.dtype)

    return hook


class LowRankAdapter:
    """Member-aware rank-r perturbations of a model's linear layers, and the seeded update.

    ``masters[i]`` is the float32 master of layer i's weight when that weight is bf16 / fp16
    (None for float32): 4 bytes per selected weight, so small updates accumulate instead of
    being rounded away. The masters are the truth: the next update overwrites any other write
    to those weights.
    """

    def __init__(self, model: nn.Module, sigma: float, rank: int, seed: int,
                 target_modules: str | None = None) -> None:
        check_settings(sigma=sigma, rank=rank, seed=seed)
        self.model = model
        self.sigma = float(sigma)
        self.rank = rank
        self.seed = seed
        self.layers = select_layers(model, target_modules)
        self.masters = [m.weight.detach().float().clone() if m.weight.element_size() < 4
                        else None for _, m in self.layers]

    @property
    def names(self) -> list[str]:
        """Selected layer names; position = tensor_id in the noise key."""
        return [name for name, _ in self.layers]

    def factors(self, step: int, pairs: np.ndarray, tensor_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 factors A (P, out, r), B (P, in, r) of one layer, on that layer's device."""
        module = self.layers[tensor_id][1]
        out_dim, in_dim = layer_dims(module)
        a, b = lowrank_factors(self.seed, step, pairs, tensor_id, out_dim, in_dim, self.rank)
        dev = module.weight.device
        return (torch.from_numpy(a).to(dev, torch.float32) / NOISE_UNIT,
                torch.from_numpy(b).to(dev, torch.float32) / NOISE_UNIT)

    @contextmanager
    def perturbed(self, step: int, members: Sequence[int]) -> Iterator[list[bool]]:
        """Inside, a forward over a member-major batch evaluates each listed member's weights.

        Row block i of every batch belongs to ``members[i]``; the hooks are removed on exit, so
        the model is the plain base model outside this context. Yields whether each layer's
        forward ran (a model may use a layer's weight without calling it).
        """
        members = np.asarray(members, dtype=np.int64)
        pairs, inverse = np.unique(members // 2, return_inverse=True)
        signs = torch.from_numpy(member_signs(members).astype(np.float32)) * self.sigma
        handles = []
        called = [False] * len(self.layers)
        try:
            for tid, (_, module) in enumerate(self.layers):
                a, b = self.factors(step, pairs, tid)
                idx = torch.from_numpy(inverse).to(a.device)
                a_m = a[idx] * signs.to(a.device)[:, None, None]
                handles.append(module.register_forward_hook(_side_path(a_m, b[idx], called, tid)))
            yield called
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def update(self, step: int, fitness: np.ndarray, lr: float) -> None:
        """W += lr / (N sigma) * sum_m f_m s_m A_p B_p^T, the factors regenerated from seeds.

        A bf16 / fp16 weight's master takes the float32 sum and the weight becomes the master
        rounded once; every torchrun worker does the same, so the replicas stay identical."""
        coef = pair_coefficients(fitness)
        pairs = np.arange(len(coef))
        scale = lr / (len(fitness) * self.sigma)
        for tid, (_, module) in enumerate(self.layers):
            a, b = self.factors(step, pairs, tid)
            c = torch.as_tensor(coef, dtype=torch.float32, device=a.device)
            out_dim, in_dim = a.shape[1], b.shape[1]
            a_cat = (a * c[:, None, None]).permute(1, 0, 2).reshape(out_dim, -1)
            b_cat = b.permute(1, 0, 2).reshape(in_dim, -1)
            delta = a_cat @ b_cat.T  # (out, in): one matmul over all pairs and ranks
            change = scale * (delta.T if isinstance(module, Conv1D) else delta)
            master, w = self.masters[tid], module.weight
            if master is None:
                w.add_(change.to(w.dtype))
            else:
                master.add_(change)
                w.copy_(master)  # round to nearest into bf16 / fp16


def _check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer with ids past the model's embedding: generation would fail deep
    inside torch (index out of range), usually because the folder's tokenizer is another
    model's, or missing and made up by transformers."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens and the model's embedding "
                          f"{rows} rows: the tokenizer is not this model's")


def _positions(model: nn.Module) -> int | None:
    """How many positions the model was made for (GPT-2's n_positions, else
    max_position_embeddings), if its config says."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_reward(value: object, prompt: str, name: str) -> float:
    """A reward must be a finite real number; anything else is the user's bug, named once."""
    if (isinstance(value, torch.Tensor) and value.numel() == 1
            or isinstance(value, np.ndarray) and value.size == 1):  # an array of one number
        value = value.item()
    try:
        finite = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ConfigError(f"reward function {name} returned {value!r} for prompt "
                          f"{prompt[:40]!r}; it must return a finite number")
    return float(value)


class ESFineTuner:
    """Fine-tune a causal LM with antithetic low-rank ES on a text reward.

    ``reward_fn(prompt, completion) -> float`` scores one greedy completion (the text after
    the prompt, special tokens removed). It is called per item rather than per batch so a
    reward is a plain function of its own inputs; its cost is small next to generation.
    A member's fitness is its mean reward over the prompts of the step. Decoding is greedy,
    as in "Evolution Strategies at Scale", so a reward difference reflects the weights, not
    sampling noise.
    """

    def __init__(self, model: nn.Module, tokenizer, reward_fn: RewardFn, population: int = 8,
                 sigma: float = 1e-3, lr: float = 5e-7, rank: int = 1, seed: int = 0,
                 shaping: str = "zscore", max_new_tokens: int = 64,
                 target_modules: str | None = None, member_chunk: int | None = None) -> None:
        check_settings(population=population, lr=lr, max_new_tokens=max_new_tokens,
                       member_chunk=member_chunk)
        if shaping not in SHAPINGS:
            raise ConfigError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
        self.model = model.eval()  # dropout off: a member's reward must depend on its weights
        self.tokenizer = tokenizer
        _check_tokenizer_fits(model, tokenizer)
        self.reward_fn = reward_fn
        self.population = population
        self.lr = lr
        self.shaping = shaping
        self.member_chunk = member_chunk or population
        self.adapter = LowRankAdapter(model, sigma, rank, seed, target_modules)
        self.step_index = 0
        self.generation = self._generation_config(max_new_tokens)
        self._one_row: bool | None = None  # a batch of one row per generate()? (_check_rows)
        self._by_length: bool | None = None  # a batch per prompt length? (_pads_matter)
        self._pad_failure: str | None = None  # what a padded batch raised, if it did

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """Plain greedy decoding; a tokenizer without a pad token pads with its eos token
        (set only while prompts are encoded: the user's tokenizer, and the one ``save``
        writes, stay as they were).

        Generation stops at any of the model's generation_config eos ids (an instruct model's
        end-of-turn tokens are often there only) and the tokenizer's eos id. Nothing else of
        the model's generation_config applies: a repetition penalty, beams or a time limit
        would make a reward depend on more than the weights."""
        tok = self.tokenizer
        if tok.pad_token is None and tok.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token")
        eos: list[int] = []
        model_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for ids in (model_eos, tok.eos_token_id):
            for i in [ids] if isinstance(ids, int) else ids or []:
                if i not in eos:
                    eos.append(i)
        pad = tok.eos_token_id if tok.pad_token is None else tok.pad_token_id
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad, eos_token_id=eos or None)

    def _encode(self, prompts: list[str]) -> Encoding:
        """Left-padded prompt batch (decoder-only generation continues from the right edge)."""
        tok = self.tokenizer
        side, pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if pad is None:
            tok.pad_token = tok.eos_token
        try:
            enc = tok(prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
            if pad is None:
                tok.pad_token = None
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        if 0 in lengths:
            raise ConfigError(f"prompt {prompts[lengths.index(0)][:40]!r} encodes to no tokens: "
                              "is the tokenizer the model's own (saved beside it)?")
        limit = _positions(self.model)
        if limit is not None and max(lengths) + self.generation.max_new_tokens > limit:
            raise ConfigError(f"a prompt of {max(lengths)} tokens plus "
                              f"{self.generation.max_new_tokens} new tokens is past the model's "
                              f"{limit} positions; shorten the prompts or generate fewer tokens")
        dev = self.model.get_input_embeddings().weight.device
        return {key: enc[key].to(dev) for key in ("input_ids", "attention_mask")}

    def _prompt_batches(self, prompts: list[str]) -> list[tuple[list[int], Encoding]]:
        """The prompts' batches for generate(), each with the prompts' places in the list: one
        left-padded batch; one per prompt length for a model whose pads change its output; one
        per prompt for a model whose rows mix."""
        enc = self._encode(prompts)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        shortest = lengths.index(min(lengths))
        ids = enc["input_ids"][shortest:shortest + 1, -lengths[shortest]:]
        if self._one_row is None:
            self._check_rows(ids)
        if self._one_row:
            return [([i], {key: value[i:i + 1, -n:] for key, value in enc.items()})
                    for i, n in enumerate(lengths)]
        if len(set(lengths)) == 1 or not self._pads_matter(ids):
            return [(list(range(len(prompts))), enc)]
        batches = []
        for length in sorted(set(lengths)):
            places = [i for i, n in enumerate(lengths) if n == length]
            batches.append((places, {key: value[places, -length:] for key, value in enc.items()}))
        return batches

    def _check_rows(self, ids: torch.Tensor) -> None:
        """Probe once whether the base model keeps a batch's rows apart (``probes``): a model
        whose rows mix through its cache generates without it, and one whose rows mix anyway
        generates one member and prompt at a time, as per-member ES would."""
        self._one_row = False
        if not probes.rows_stay_apart(self.model, self.generation, ids):
            self.generation.use_cache = False
            if not probes.rows_stay_apart(self.model, self.generation, ids):
                self.generation.use_cache = None  # the model's own choice
                self._one_row = True
                self.member_chunk = 1

    def batching(self) -> str | None:
        """How this model's generate() calls are made, where it is not the fast way (members
        x prompts in one batch, with the cache); None before the first step and for that way."""
        if self._one_row:
            return "one member and prompt per generate(): the model mixes a batch's rows"
        parts = []
        if self.generation.use_cache is False:
            parts.append("without its cache (which mixes a batch's rows)")
        if self._by_length:
            why = (f"a padded batch fails: {self._pad_failure}" if self._pad_failure
                   else "padding changes its output")
            parts.append(f"in a batch per prompt length ({why})")
        return f"generating {' and '.join(parts)}" if parts else None

    def _pads_matter(self, ids: torch.Tensor) -> bool:
        """Whether masked pads change the base model's output (``probes``), probed once, when
        prompts of two lengths first meet. A model that fails on a padded batch gets no pads
        either."""
        if self._by_length is None:
            try:
                self._by_length = not probes.pads_change_nothing(self.model, self.generation, ids)
            except Exception as err:  # whatever the model raises on a mask with zeros: no pads
                self._by_length, self._pad_failure = True, type(err).__name__
        return self._by_length

    def _complete(self, enc: Encoding, members: np.ndarray) -> list[str]:
        """Completions of every prompt of the batch for each member, member-major, in one
        generate()."""
        batch = {key: value.repeat(len(members), 1) for key, value in enc.items()}
        with (probes.decoding(self.model, self.generation),
              self.adapter.perturbed(self.step_index, members) as called):
            out = self.model.generate(**batch, generation_config=self.generation)
        missed = [name for name, hit in zip(self.adapter.names, called, strict=True) if not hit]
        if missed:  # their noise would move the weights without having touched the rewards
            raise ConfigError(
                f"the model uses the weight of {', '.join(missed[:3])}"
                f"{f' and {len(missed) - 3} more' if len(missed) > 3 else ''} without calling "
                "the layer, so ES cannot perturb it; leave it out with target_modules "
                "(--target-modules), a regex of the layer names to train")
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def evaluate(self, prompts: Sequence[str]) -> np.ndarray:
        """Rewards (population, prompts) of every member at the current step; weights untouched.

        Under torchrun this worker generates for its shard of whole pairs only and the float64
        rows of all workers are all-gathered, so every worker returns the full matrix. Members
        go through generate() member_chunk at a time (one at a time for a model whose rows
        mix); on CUDA out-of-memory the chunk is halved (and kept halved) until it fits.
        """
        if isinstance(prompts, (str, bytes)):  # would be read as one prompt per character
            raise ConfigError("prompts must be a list of strings, got one string")
        prompts = list(prompts)
        if not prompts:
            raise DataError("no prompts to evaluate")
        bad = [p for p in prompts if not isinstance(p, str) or not p]
        if bad:
            raise ConfigError(f"every prompt must be a non-empty string, got {bad[0]!r}")
        first, stop = distributed.shard_range(self.population)
        failure: IntesError | None = None
        try:
            local = self._evaluate_members(prompts, first, stop)
        except IntesError as err:
            if not _in_group():
                raise
            # NaN rows (a reward is always finite) tell the others, in the gather they are
            # already waiting in, to stop too instead of waiting for this worker until timeout
            failure, local = err, np.full((stop - first, len(prompts)), np.nan)
        rewards = distributed.all_gather_fitness(local, self.population)
        if failure is not None:
            raise failure
        failed = np.flatnonzero(np.isnan(rewards).any(axis=1))
        if len(failed):
            raise distributed.DistributedError(
                f"worker {_worker_of(int(failed[0]), self.population)} could not score its "
                "members (see its error); stopping")
        return rewards

    def _evaluate_members(self, prompts: list[str], first: int, stop: int) -> np.ndarray:
        """Rewards (stop - first, prompts) of members first..stop-1."""
        batches = self._prompt_batches(prompts)
        name = getattr(self.reward_fn, "__name__", repr(self.reward_fn))
        rewards = np.empty((stop - first, len(prompts)))
        start = first
        while start < stop:
            members = np.arange(start, min(start + self.member_chunk, stop))
            try:
                texts = [self._complete(enc, members) for _, enc in batches]
            except torch.cuda.OutOfMemoryError:
                if len(members) == 1:
                    fewer = "" if len(batches) == len(prompts) else "fewer or "
                    raise IntesError("out of memory with one member per generate(); every step "
                                     f"scores all its prompts: use {fewer}shorter prompts "
                                     "or fewer new tokens (--max-new-tokens)") from None
                self.member_chunk = len(members) // 2
                torch.cuda.empty_cache()
                continue
            for (columns, _), batch_texts in zip(batches, texts, strict=True):
                for i, text in enumerate(batch_texts):
                    row, j = divmod(i, len(columns))
                    col = columns[j]
                    rewards[start - first + row, col] = self._reward(prompts[col], text, name)
            start += len(members)
        return rewards

    def _reward(self, prompt: str, completion: str, name: str) -> float:
        """Call the user's reward, turning any failure into one clear line."""
        try:
            value = self.reward_fn(prompt, completion)
        except Exception as exc:  # any failure of user code is reported as the user's
            msg = " ".join(str(exc).split())
            raise ConfigError(f"reward function {name} raised {type(exc).__name__}: {msg}") from exc
        return _check_reward(value, prompt, name)

    def step(self, prompts: Sequence[str]) -> dict[str, float]:
        """One ES step: evaluate the population on the prompts, then update from seeds.

        Under torchrun the workers first compare their weights, before step 0 and every
        ``INTES_DIST_VERIFY_EVERY`` steps.
        """
        t0 = time.perf_counter()
        if _in_group() and self.step_index % distributed.verify_every() == 0:
            self.verify()
        rewards = self.evaluate(prompts)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
            fitness = rewards.mean(axis=1)
            shaped = shape_rewards(fitness, self.shaping)
        if not (np.isfinite(fitness).all() and np.isfinite(shaped).all()):
            raise ConfigError("the rewards are too large to average and shape in float64 "
                              f"(member means {fitness.min():.3g}..{fitness.max():.3g}); "
                              "scale the reward down")
        self.adapter.update(self.step_index, shaped, self.lr)
        metrics = {"step": self.step_index, "reward_mean": float(fitness.mean()),
                   "reward_max": float(fitness.max()), "reward_min": float(fitness.min()),
                   "time_s": time.perf_counter() - t0}
        self.step_index += 1
        return metrics

    def verify(self) -> None:
        """Stop every worker unless all hold the same weights (a no-op in one process).

        One 64-bit hash of the state dict and step per worker; call it after the last step.
        Before the first update a difference is in what the workers were given (another
        model folder), not replicas that diverged.
        """
        if not _in_group():
            return
        named = [("step", np.int64(self.step_index)), *self.model.state_dict().items()]
        given = self.step_index == 0
        distributed.assert_same(distributed.digest(named),
                                "the model's weights (--model)" if given else
                                f"the weights at step {self.step_index}", diverged=not given)

    def save(self, path: str | Path) -> None:
        """save_pretrained of the model and tokenizer: a plain HF checkpoint, no intes needed."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def _worker_of(member: int, population: int) -> int:
    """The rank whose shard holds ``member`` (a process group is up)."""
    world = torch.distributed.get_world_size()
    return next(r for r in range(world)
                if member // 2 < distributed.shard_pairs(population // 2, r, world)[1])
