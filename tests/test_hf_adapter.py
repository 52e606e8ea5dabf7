"""The float HF adapter: shared batched side path == explicit perturbation, no drift, seeded
update == stored-noise update (summed in float32 masters for bf16 weights), learning on a toy
reward, the built-in tasks and `finetune`, alone and under torchrun (2 gloo workers give the
weights of one process).

Models are tiny Llama / GPT-2 built from configs with a BPE tokenizer trained here: no network.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    RwkvConfig,
    RwkvForCausalLM,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from intes import distributed  # noqa: E402
from intes.adapters import check_settings, hf, probes  # noqa: E402
from intes.adapters.hf import (  # noqa: E402
    ESFineTuner,
    LowRankAdapter,
    layer_dims,
    shape_rewards,
)
from intes.adapters.tasks import (  # noqa: E402
    DEFAULT_TARGET_CHARS,
    conciseness,
    countdown,
    countdown_score,
    load_task,
)
from intes.cli import cli  # noqa: E402
from intes.cli import finetune as finetune_module  # noqa: E402
from intes.cli.finetune import finetune  # noqa: E402
from intes.errors import ConfigError, DataError, IntesError  # noqa: E402
from intes.noise import lowrank_factors, member_signs  # noqa: E402

PROMPTS = ["the quick brown", "lazy dog", "over the", "jumps"]
ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and a 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"])
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def build(arch: str, tok: PreTrainedTokenizerFast, dtype=None) -> torch.nn.Module:
    """A tiny random model, the same weights for the same arch (fixed torch seed)."""
    torch.manual_seed(0)
    ids = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, **ids))
    elif arch == "falcon":  # its linears are FalconLinear, with a forward of their own
        model = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, **ids))
    elif arch == "rwkv":  # recurrent, and its forward ignores the attention mask
        model = RwkvForCausalLM(RwkvConfig(hidden_size=32, attention_hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           context_length=128, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           **ids))
    return (model.to(dtype) if dtype is not None else model).eval()


def weights(model: torch.nn.Module) -> dict[str, bytes]:
    """Every tensor of the state dict as raw bytes: equality is bitwise, whatever the dtype."""
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def zero_reward(prompt: str, completion: str) -> float:
    return 0.0


# ---------------------------------------------------------------- side path and update


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evaluation_leaves_base_weights_bitwise_unchanged(tokenizer, arch, dtype):
    model = build(arch, tokenizer, dtype)
    before = weights(model)
    tuner = ESFineTuner(model, tokenizer, lambda p, c: len(c), population=6, sigma=0.05,
                        max_new_tokens=4, member_chunk=4)
    rewards = tuner.evaluate(PROMPTS)
    assert rewards.shape == (6, len(PROMPTS))
    assert weights(model) == before
    assert not any(m._forward_hooks for m in model.modules())  # the side path is gone


def test_layer_selection(tokenizer):
    llama = LowRankAdapter(build("llama", tokenizer), sigma=0.1, rank=1, seed=0)
    linear = [n for n, m in build("llama", tokenizer).named_modules()
              if isinstance(m, torch.nn.Linear)]
    assert llama.names == sorted(linear)  # all by default; tensor_id = sorted position
    gpt2 = LowRankAdapter(build("gpt2", tokenizer), sigma=0.1, rank=1, seed=0)
    assert "lm_head" not in gpt2.names  # tied to the input embedding
    assert all(isinstance(m, Conv1D) for _, m in gpt2.layers)
    attn = LowRankAdapter(build("llama", tokenizer), 0.1, 1, 0, target_modules=r"self_attn")
    assert len(attn.names) == 8 and all("self_attn" in n for n in attn.names)


def explicitly_perturbed(model, adapter, step: int, member: int) -> torch.nn.Module:
    """A copy whose weights hold sigma * s_m * A_p B_p^T, the factors straight from noise.py."""
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    sign = float(member_signs(np.array([member]))[0])
    for tid, name in enumerate(sorted(adapter.names)):
        module = modules[name]
        out_dim, in_dim = layer_dims(module)
        a, b = lowrank_factors(adapter.seed, step, np.array([member // 2]), tid, out_dim, in_dim,
                               adapter.rank)
        eps = torch.from_numpy(a[0] / 16.0 @ (b[0] / 16.0).T).float()
        with torch.no_grad():
            module.weight += adapter.sigma * sign * (eps.T if isinstance(module, Conv1D) else eps)
    return twin


@pytest.mark.parametrize("arch", [*ARCHS, "falcon"])
@settings(max_examples=6, deadline=None)
@given(members=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       step=st.integers(0, 2**20), rank=st.integers(1, 3))
def test_batched_side_path_equals_explicit_perturbation(tokenizer, arch, members, step, rank):
    model = build(arch, tokenizer)
    adapter = LowRankAdapter(model, sigma=0.05, rank=rank, seed=11)
    ids = torch.randint(3, tokenizer.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        with adapter.perturbed(step, members):
            batched = model(ids.repeat(len(members), 1)).logits.view(len(members), *base.shape)
        for i, member in enumerate(members):
            expected = explicitly_perturbed(model, adapter, step, member)(ids).logits
            # float32 in two orders (x W^T + sigma (x B) A^T against x (W + sigma A B^T)^T):
            # up to 1.8e-5 apart in 200 examples, against 1e-3 for the perturbation itself
            torch.testing.assert_close(batched[i], expected, rtol=1e-3, atol=1e-4)
            assert not torch.allclose(batched[i], base, atol=1e-3)  # the perturbation is felt


def stored_update(adapter, tid: int, step: int, fitness: np.ndarray, lr: float) -> torch.Tensor:
    """lr / (N sigma) sum_m f_m s_m A_p B_p^T of layer tid in float64, one explicit term per
    member straight from noise.py, laid out as the layer's weight."""
    module, population = adapter.layers[tid][1], len(fitness)
    out_dim, in_dim = layer_dims(module)
    a, b = lowrank_factors(adapter.seed, step, np.arange(population) // 2, tid, out_dim, in_dim,
                           adapter.rank)
    signs = member_signs(np.arange(population))
    stored = sum(fitness[m] * signs[m] * (a[m] / 16.0) @ (b[m] / 16.0).T
                 for m in range(population))
    delta = torch.from_numpy(lr / (population * adapter.sigma) * stored)
    return delta.T if isinstance(module, Conv1D) else delta


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_update_from_seeds_equals_update_from_stored_factors(tokenizer, arch, data):
    population = 2 * data.draw(st.integers(1, 5))
    fitness = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=population,
                                          max_size=population)))
    step, rank, lr = data.draw(st.integers(0, 1000)), data.draw(st.integers(1, 3)), 1e-3
    model = build(arch, tokenizer)
    adapter = LowRankAdapter(model, sigma=0.02, rank=rank, seed=5)
    before = {n: m.weight.detach().double().clone() for n, m in adapter.layers}
    adapter.update(step, fitness, lr)
    for tid, (name, module) in enumerate(adapter.layers):
        expected = before[name] + stored_update(adapter, tid, step, fitness, lr)
        torch.testing.assert_close(module.weight.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_updates_accumulate_in_float32_masters(tokenizer, arch):
    """At the default sigma and lr most per-weight changes are below half a bf16 ulp, so
    rounding each step's change into the bf16 weight would lose them: the float32 master sums
    the updates, and the weight is the master rounded."""
    assert all(m is None for m in LowRankAdapter(build(arch, tokenizer), 1e-3, 1, 0).masters)
    model = build(arch, tokenizer, torch.bfloat16)
    adapter = LowRankAdapter(model, sigma=1e-3, rank=1, seed=0)
    start = [m.weight.detach().double().clone() for _, m in adapter.layers]
    intended = [torch.zeros_like(w) for w in start]
    rng = np.random.default_rng(0)
    for step in range(16):
        fitness = shape_rewards(rng.normal(size=30), "zscore")
        adapter.update(step, fitness, 5e-7)
        for tid in range(len(intended)):
            intended[tid] += stored_update(adapter, tid, step, fitness, 5e-7)
    now = [m.weight.detach() for _, m in adapter.layers]
    err = sum(float((w.double() - s - d).norm() ** 2)
              for w, s, d in zip(now, start, intended, strict=True))
    # the last rounding only: 0.09 (llama) / 0.08 (gpt2); rounding every step gave 0.34 / 0.28
    assert err / sum(float(d.norm() ** 2) for d in intended) < 0.15 ** 2
    for master, w, s, d in zip(adapter.masters, now, start, intended, strict=True):
        # float32 sums of ~1e-4 changes to weights of ~0.02-0.1: exact to ~1e-8
        torch.testing.assert_close(master.double() - s, d, rtol=0, atol=1e-7)
        assert torch.equal(w, master.to(torch.bfloat16))


def test_same_seed_same_weights_and_tied_rewards_change_nothing(tokenizer):
    def run(seed: int) -> dict[str, bytes]:
        model = build("llama", tokenizer)
        tuner = ESFineTuner(model, tokenizer, lambda p, c: c.count("o"), population=4,
                            sigma=0.05, lr=1e-3, seed=seed, max_new_tokens=6)
        for _ in range(3):
            tuner.step(PROMPTS[:2])
        return weights(model)

    assert run(3) == run(3)
    assert run(3) != run(4)
    model = build("gpt2", tokenizer)
    before = weights(model)
    ESFineTuner(model, tokenizer, zero_reward, population=4, max_new_tokens=2).step(PROMPTS)
    assert weights(model) == before  # no signal, no move, bit for bit


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(ARCHS), population=st.integers(1, 5).map(lambda p: 2 * p),
       chunk=st.integers(1, 10))
def test_member_chunks_give_the_same_completions(tokenizer, arch, population, chunk):
    """Members generated chunk at a time (chunks that split pairs, a ragged last one, one
    member each, or larger than the population) complete every prompt as in one generate()."""
    def completions(chunk: int | None) -> list[str]:
        seen: list[str] = []
        tuner = ESFineTuner(build(arch, tokenizer), tokenizer,
                            lambda p, c: seen.append(c) or 0.0, population=population,
                            sigma=0.05, max_new_tokens=6, member_chunk=chunk)
        tuner.evaluate(PROMPTS)
        return seen

    whole = completions(None)
    assert len(whole) == population * len(PROMPTS)
    assert completions(chunk) == whole


@pytest.mark.parametrize(("arch", "apart", "pads"), [("llama", True, True), ("gpt2", True, True),
                                                    ("rwkv", False, False)])
def test_the_probes_find_models_whose_rows_mix_or_that_read_their_pads(tokenizer, arch, apart,
                                                                       pads):
    """HF's RWKV reads its pads, and in a batch with its cache mixes its rows (not without)."""
    model = build(arch, tokenizer)
    config = ESFineTuner(model, tokenizer, zero_reward).generation
    ids = tokenizer(["the quick brown"], return_tensors="pt")["input_ids"]
    assert probes.rows_stay_apart(model, config, ids) is apart
    assert probes.pads_change_nothing(model, config, ids) is pads
    config.use_cache = False
    assert probes.rows_stay_apart(model, config, ids)


@pytest.mark.parametrize("ids", [[5], [5, 7, 5]])
def test_the_rows_probe_sees_a_leak_on_a_prompt_of_one_token_or_a_palindrome(tokenizer, ids):
    """Its other row differs at every position: a prompt's reversal would be the prompt."""
    model = build("rwkv", tokenizer)
    config = ESFineTuner(model, tokenizer, zero_reward).generation
    assert not probes.rows_stay_apart(model, config, torch.tensor([ids]))


def test_pads_change_nothing_needs_both_the_pads_contents_and_presence_to_change_nothing(
        monkeypatch):
    """Logits by hand: another pad's contents, or a pad's presence, moving them says no."""
    def probe(contents: float, presence: float) -> bool:
        def logits(model, config, ids, mask=None, tokens=1):
            if mask is None:
                return torch.tensor([[[1.0, 2.0 + presence]]])
            return torch.tensor([[[1.0, 2.0 + contents * int(ids[0, 0])]]])

        monkeypatch.setattr(probes, "new_token_logits", logits)
        model = torch.nn.Module()
        model.get_input_embeddings = lambda: torch.nn.Embedding(10, 2)
        config = hf.GenerationConfig(pad_token_id=1)
        return probes.pads_change_nothing(model, config, torch.tensor([[5, 6]]))

    assert probe(0.0, 0.0)
    assert probe(1e-7, 1e-3)  # rounding, and a batch shape's float noise
    assert not probe(1e-3, 0.0)  # what the pad holds shows
    assert not probe(0.0, 0.1)  # that a pad is there shows (positions, say)


def test_about_equal_takes_matching_infinities_and_nans_as_equal():
    a = torch.tensor([1.0, -math.inf, math.nan])
    assert probes.about_equal(a, a.clone())
    assert not probes.about_equal(a, torch.tensor([1.0, 2.0, math.nan]))
    assert probes.about_equal(a, torch.tensor([1.001, -math.inf, math.nan]))
    assert not probes.about_equal(a, torch.tensor([1.1, -math.inf, math.nan]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_a_gpu_a_half_precision_model_generates_in_one_batch(tokenizer, dtype):
    """cuBLAS picks its kernels per batch size, which moves half-precision logits: the probes
    compare batches of one shape, so a model that keeps its rows apart keeps the fast way."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id)).to("cuda", dtype).eval()
    tuner = ESFineTuner(model, tokenizer, zero_reward, population=8, max_new_tokens=8)
    tuner.evaluate(PROMPTS)
    assert tuner.batching() is None


def test_pads_that_move_a_moe_models_logits_by_rounding_only_change_nothing(tokenizer):
    """Qwen2-MoE groups a batch's tokens per expert, so another pad moves the last bits of
    the logits (2e-7 of them here): that is float rounding, not a model reading its pads."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2)).eval()
    config = ESFineTuner(model, tokenizer, zero_reward).generation
    ids = tokenizer(["jumps"], return_tensors="pt")["input_ids"]
    assert probes.pads_change_nothing(model, config, ids)


def test_pads_are_probed_only_when_prompts_of_two_lengths_meet(tokenizer, monkeypatch):
    calls = []
    probe = probes.pads_change_nothing
    monkeypatch.setattr(probes, "pads_change_nothing", lambda *a: calls.append(1) or probe(*a))
    tuner = ESFineTuner(build("llama", tokenizer), tokenizer, zero_reward)
    tuner.evaluate(["lazy dog", "over the"])  # 3 tokens each
    assert calls == []
    tuner.evaluate(PROMPTS)
    assert calls == [1]


def test_a_model_that_fails_on_a_padded_batch_gets_no_pads(tokenizer, monkeypatch):
    def fails(*args):
        raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)")

    monkeypatch.setattr(probes, "pads_change_nothing", fails)
    tuner = ESFineTuner(build("llama", tokenizer), tokenizer, zero_reward)
    batches = tuner._prompt_batches(PROMPTS)
    assert len(batches) == len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) > 1
    assert all(bool(enc["attention_mask"].all()) for _, enc in batches)
    assert tuner.batching() == ("generating in a batch per prompt length (a padded batch "
                                "fails: RuntimeError)")


def test_a_model_whose_rows_mix_without_its_cache_too_runs_one_row_at_a_time(tokenizer,
                                                                           monkeypatch):
    """Per-member ES's way: one member and prompt per generate(), the same rewards as the
    batched way where the rows do not mix."""
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, lambda p, c: len(c), population=4,
                        sigma=0.05, max_new_tokens=6)
    batched = tuner.evaluate(PROMPTS)
    assert tuner.batching() is None
    tried = []
    monkeypatch.setattr(probes, "rows_stay_apart",
                        lambda *args: tried.append(args[1].use_cache is not False) and False)
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, lambda p, c: len(c), population=4,
                        sigma=0.05, max_new_tokens=6)
    rows = []
    complete = tuner._complete
    monkeypatch.setattr(tuner, "_complete",
                        lambda enc, m: rows.append((len(m) * len(enc["input_ids"]),
                                                    bool(enc["attention_mask"].all())))
                        or complete(enc, m))
    np.testing.assert_array_equal(tuner.evaluate(PROMPTS), batched)
    assert tried == [True, False]  # with the cache, then without
    assert rows == [(1, True)] * 4 * len(PROMPTS)  # one row, and no pads
    assert tuner.generation.use_cache is None
    assert tuner.batching().startswith("one member and prompt per generate()")


def test_the_probes_run_once_per_fine_tuner(tokenizer, monkeypatch):
    calls = []
    for name in ("rows_stay_apart", "pads_change_nothing"):
        probe = getattr(probes, name)
        monkeypatch.setattr(probes, name,
                            lambda *a, name=name, probe=probe: calls.append(name) or probe(*a))
    tuner = ESFineTuner(build("llama", tokenizer), tokenizer, zero_reward)
    tuner.evaluate(PROMPTS)
    tuner.evaluate(PROMPTS[::-1])
    assert calls == ["rows_stay_apart", "pads_change_nothing"]


@pytest.mark.parametrize("arch", ["rwkv", "llama"])
def test_a_prompt_completes_alike_alone_and_beside_longer_ones(tokenizer, arch, monkeypatch):
    """Every member's completion of a prompt is the one it makes of that prompt alone, also
    for a model that reads its pads (which then gets one generate() per prompt length, where
    a model that honors the mask gets one for all)."""
    def completions(prompts: list[str]) -> list[list[str]]:
        seen: dict[str, list[str]] = {p: [] for p in prompts}
        tuner = ESFineTuner(build(arch, tokenizer), tokenizer,
                            lambda p, c: seen[p].append(c) or 0.0, population=4, sigma=0.05,
                            max_new_tokens=8)
        calls = []
        complete = tuner._complete
        monkeypatch.setattr(tuner, "_complete", lambda enc, m: calls.append(1) or complete(enc, m))
        tuner.evaluate(prompts)
        lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
        assert len(calls) == (len(lengths) if arch == "rwkv" else 1)
        if arch == "rwkv":
            by_length = " and in a batch per prompt length (padding changes its output)"
            assert tuner.batching() == ("generating without its cache (which mixes a batch's "
                                        f"rows){by_length if len(lengths) > 1 else ''}")
        else:
            assert tuner.batching() is None
        return [seen[p] for p in prompts]

    together = completions(PROMPTS)
    assert together == [completions([p])[0] for p in PROMPTS]


def test_out_of_memory_halves_the_member_chunk(tokenizer, monkeypatch):
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, lambda p, c: len(c), population=8,
                        sigma=0.05, max_new_tokens=3)
    expected = tuner.evaluate(PROMPTS)
    complete = tuner._complete

    def small_memory(enc, members):
        if len(members) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return complete(enc, members)

    monkeypatch.setattr(tuner, "_complete", small_memory)
    np.testing.assert_array_equal(tuner.evaluate(PROMPTS), expected)
    assert tuner.member_chunk == 2


def test_out_of_memory_halves_the_member_chunk_of_a_batch_per_length_too(tokenizer,
                                                                          monkeypatch):
    tuner = ESFineTuner(build("rwkv", tokenizer), tokenizer, lambda p, c: len(c), population=8,
                        sigma=0.05, max_new_tokens=3)
    expected = tuner.evaluate(PROMPTS)
    complete, seen = tuner._complete, []

    def small_memory(enc, members):
        if len(members) > 2 and len(enc["input_ids"]) == 3:  # the second batch: 3-token prompts
            raise torch.cuda.OutOfMemoryError("simulated")
        seen.append(len(enc["input_ids"]))
        return complete(enc, members)

    monkeypatch.setattr(tuner, "_complete", small_memory)
    np.testing.assert_array_equal(tuner.evaluate(PROMPTS), expected)
    assert tuner.member_chunk == 2
    assert seen == [1, 1] + [1, 3] * 4  # the first batch lost to each failure, then 4 chunks


def test_out_of_memory_with_one_member_names_what_to_shrink(tokenizer, monkeypatch):
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2,
                        member_chunk=1)

    def no_memory(enc, members):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(tuner, "_complete", no_memory)
    with pytest.raises(IntesError, match="fewer or shorter prompts or fewer new tokens "
                                         r"\(--max-new-tokens\)") as err:
        tuner.evaluate(PROMPTS)
    assert "\n" not in str(err.value)


def test_generation_stops_at_the_models_own_eos_ids(tokenizer):
    """An instruct model's end-of-turn id is often only in its generation_config: a completion
    stops there as well as at the tokenizer's eos."""
    model = build("llama", tokenizer)
    enc = tokenizer(["the quick"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    greedy = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(greedy) == 6  # the tokenizer's eos alone does not stop it early
    stop = next(j for j in range(1, len(greedy)) if greedy[j] not in greedy[:j])
    model.generation_config.eos_token_id = [greedy[stop]]
    seen: list[str] = []
    tuner = ESFineTuner(model, tokenizer, lambda p, c: seen.append(c) or 0.0, population=2,
                        sigma=1e-9, max_new_tokens=6)  # members as the base model
    tuner.evaluate(["the quick"])
    assert seen == [tokenizer.decode(greedy[:stop + 1])] * 2
    assert tuner.generation.eos_token_id == [greedy[stop], tokenizer.eos_token_id]


@pytest.mark.parametrize("setting", [
    dict(repetition_penalty=2.0), dict(num_beams=2), dict(no_repeat_ngram_size=1),
    dict(num_beams=2, num_return_sequences=2), dict(return_dict_in_generate=True),
    dict(max_time=1e-9),
])
def test_the_models_generation_config_does_not_change_decoding(tokenizer, setting):
    """A saved folder's generation_config (an instruct model's repetition penalty, beams, a
    time limit) changed the completions or crashed generate(): decoding is plain greedy."""
    def completions(model) -> list[str]:
        seen: list[str] = []
        ESFineTuner(model, tokenizer, lambda p, c: seen.append(c) or 0.0, population=2,
                    sigma=0.05, max_new_tokens=6).evaluate(PROMPTS[:2])
        return seen

    plain, configured = build("llama", tokenizer), build("llama", tokenizer)
    for name, value in setting.items():
        setattr(configured.generation_config, name, value)
    kept = configured.generation_config
    assert completions(configured) == completions(plain)
    assert configured.generation_config is kept and kept.to_dict().items() >= setting.items()


def test_a_tokenizer_without_a_pad_token_is_left_without_one(tokenizer, tmp_path):
    """Prompts are padded with eos, but the user's tokenizer, and the folder saved from it,
    used to keep eos as their pad token."""
    nopad = copy.deepcopy(tokenizer)
    nopad.pad_token = None
    tuner = ESFineTuner(build("llama", tokenizer), nopad, zero_reward, population=2,
                        max_new_tokens=2)
    tuner.step(["the quick", "lazy dog over the"])  # two lengths: one prompt is padded
    tuner.save(tmp_path)
    assert nopad.pad_token is None and tuner.generation.pad_token_id == nopad.eos_token_id
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()).get("pad_token") is None


def test_a_layer_whose_weight_is_used_without_calling_it_is_refused(tokenizer):
    """Mamba uses dt_proj.weight directly: its noise never reached the rewards, yet the update
    moved it along that noise."""
    model = build("llama", tokenizer)
    model.model.unused_proj = torch.nn.Linear(4, 4)
    tuner = ESFineTuner(model, tokenizer, zero_reward, population=2, max_new_tokens=2)
    before = weights(model)
    with pytest.raises(ConfigError, match="uses the weight of model.unused_proj without calling "
                                          "the layer.*leave it out with target_modules"):
        tuner.step(PROMPTS[:1])
    assert weights(model) == before
    ESFineTuner(model, tokenizer, zero_reward, population=2, max_new_tokens=2,
                target_modules=r"layers|lm_head").step(PROMPTS[:1])


def test_linear_subclasses_with_a_forward_of_their_own_are_not_perturbed(tokenizer):
    """A MoE router returns a tuple (the hook crashed on it); a quantized linear does not
    compute x Wᵀ + b. A subclass that keeps Linear's forward is perturbed as one."""
    class Router(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x), None

    class Named(torch.nn.Linear):
        pass

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Rewritten(torch.nn.Linear):  # Falcon's FalconLinear: x Wᵀ + b in its own forward
        def forward(self, x):
            return x @ self.weight.T + self.bias

    model = build("llama", tokenizer)
    model.model.router, model.model.named = Router(4, 4), Named(4, 4)
    model.model.doubled, model.model.rewritten = Doubled(4, 4), Rewritten(4, 4)
    fired = []
    model.model.rewritten.register_forward_hook(lambda *args: fired.append(1))
    names = LowRankAdapter(model, sigma=0.05, rank=1, seed=0).names
    assert "model.named" in names and "model.rewritten" in names
    assert "model.router" not in names and "model.doubled" not in names
    assert fired == []  # tried without its hooks
    tried = []
    model.model.doubled.forward = lambda x: tried.append(1) or 2 * x
    LowRankAdapter(model, sigma=0.05, rank=1, seed=0, target_modules="q_proj")
    assert tried == []  # a layer left out is not tried


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_reward_rises_on_a_toy_reward(tokenizer, arch):
    target = tokenizer.convert_tokens_to_ids("Ġfox")

    def fox_share(prompt: str, completion: str) -> float:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        return sum(i == target for i in ids) / 8

    tuner = ESFineTuner(build(arch, tokenizer), tokenizer, fox_share, population=16,
                        sigma=0.02, lr=1e-3, max_new_tokens=8, seed=0)
    history = [tuner.step(PROMPTS)["reward_mean"] for _ in range(30)]
    assert np.mean(history[-5:]) > np.mean(history[:5]) + 0.25, history


def test_a_batch_that_is_not_members_x_prompts_is_a_config_error(tokenizer):
    model = build("gpt2", tokenizer)
    adapter = LowRankAdapter(model, sigma=0.05, rank=1, seed=0)
    with adapter.perturbed(0, [0, 1]), pytest.raises(ConfigError, match=r"shape \(3, 4, 32\), "
                                                      "whose first dimension is no multiple"):
        model(torch.zeros(3, 4, dtype=torch.long))


def test_bf16_steps_update_in_bf16(tokenizer):
    model = build("llama", tokenizer, torch.bfloat16)
    before = weights(model)
    tuner = ESFineTuner(model, tokenizer, lambda p, c: c.count(" "), population=4, sigma=0.05,
                        lr=1e-2, max_new_tokens=6, shaping="rank")
    metrics = [tuner.step(PROMPTS) for _ in range(2)]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert weights(model) != before


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=12).map(
    lambda r: r + r[:1] if len(r) % 2 else r))
def test_shaping_is_centred_tie_aware_and_antithetic(rewards):
    r = np.array(rewards)
    for kind in ("zscore", "rank", "sign"):
        f = shape_rewards(r, kind)
        assert f.shape == r.shape and np.all(np.isfinite(f))
        assert abs(f.sum()) < 1e-6 * len(f)
        for i, j in zip(*np.nonzero(r[:, None] == r[None, :]), strict=True):
            if kind != "sign":
                assert f[i] == f[j]  # equal rewards, equal fitness
    rank = shape_rewards(r, "rank")
    assert rank.min() >= -0.5 and rank.max() <= 0.5
    sign = shape_rewards(r, "sign")
    np.testing.assert_array_equal(sign[0::2], -sign[1::2])
    np.testing.assert_array_equal(sign[0::2], np.sign(r[0::2] - r[1::2]))


# ---------------------------------------------------------------- bad input through the API


@pytest.mark.parametrize("value", ["abc", None, math.nan, math.inf, [1.0], 10**400])
def test_reward_returning_a_non_number_is_one_clear_error(tokenizer, value):
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, lambda p, c: value, population=2,
                        max_new_tokens=2)
    with pytest.raises(ConfigError, match="must return a finite number") as err:
        tuner.step(PROMPTS)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [np.float32(0.5), np.array(0.5), np.array([0.5]),
                                   torch.tensor(0.5), torch.tensor([0.5]), 0.5])
def test_a_reward_of_one_number_in_any_form_is_taken(tokenizer, value):
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, lambda p, c: value, population=2,
                        max_new_tokens=2)
    assert tuner.step(PROMPTS[:1])["reward_mean"] == 0.5


def test_reward_that_raises_is_one_clear_error(tokenizer):
    def broken(prompt: str, completion: str) -> float:
        raise KeyError("no\nsuch key")

    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, broken, population=2,
                        max_new_tokens=2)
    before = weights(tuner.model)
    with pytest.raises(ConfigError, match="reward function broken raised KeyError") as err:
        tuner.step(PROMPTS)
    assert "\n" not in str(err.value)
    assert weights(tuner.model) == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(population=3), "even"),
    (dict(shaping="softmax"), "shaping"),
    (dict(sigma=0.0), "sigma"),
    (dict(rank=0), "rank"),
    (dict(target_modules="no_such_layer"), "no .*Linear layers"),
    (dict(target_modules="["), "not a valid regular expression"),
    (dict(lr=0.0), "lr must be a positive"),
    (dict(lr=-1e-3), "lr must be a positive"),
    (dict(seed=-1), "seed must be in 0..4294967295"),
    (dict(seed=2**32), "seed must be in 0..4294967295"),
    (dict(population=4.0), r"^population must be an integer, got 4\.0$"),
    (dict(rank=True), "^rank must be an integer, got True$"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(member_chunk=2.0), "member_chunk must be an integer"),
    (dict(seed=0.0), "seed must be an integer"),
    (dict(sigma="0.1"), "sigma must be a number, got '0.1'"),
])
def test_bad_configuration(tokenizer, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ESFineTuner(build("llama", tokenizer), tokenizer, zero_reward, **kwargs)


def test_settings_count_in_integers():
    check_settings(population=np.int64(4), steps=np.int32(2), lr=np.float32(1e-3), sigma=1)
    with pytest.raises(ConfigError, match=r"^--steps must be an integer, got 2\.0$"):
        check_settings(as_flags=True, steps=2.0)


def test_model_without_linear_layers(tokenizer):
    with pytest.raises(ConfigError, match="no .*Linear layers"):
        ESFineTuner(torch.nn.Sequential(torch.nn.Embedding(10, 4)), tokenizer, zero_reward)


def test_no_prompts(tokenizer):
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2)
    with pytest.raises(DataError):
        tuner.step([])


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(tokenizer):
    """Generation failed deep in torch (IndexError: index out of range in self)."""
    torch.manual_seed(0)
    small = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match=r"the tokenizer has \d+ tokens and the model's "
                                          "embedding 50 rows"):
        ESFineTuner(small, tokenizer, zero_reward, population=2)


def test_a_prompt_that_encodes_to_nothing_is_refused(tokenizer):
    """A folder saved without its tokenizer loads one transformers makes up, which encodes
    every prompt to no tokens; generation then failed with an IndexError."""
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2,
                        max_new_tokens=2)
    tuner.tokenizer = lambda prompts, **kw: {
        "input_ids": torch.zeros((len(prompts), 0), dtype=torch.long),
        "attention_mask": torch.zeros((len(prompts), 0), dtype=torch.long)}
    tuner.tokenizer.padding_side, tuner.tokenizer.pad_token = "right", "<pad>"
    with pytest.raises(ConfigError, match="encodes to no tokens: is the tokenizer the model's"):
        tuner.step(PROMPTS)


def test_prompts_past_the_models_positions_are_refused(tokenizer):
    """GPT-2's learned positions end at n_positions: generating past them was an IndexError."""
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2,
                        max_new_tokens=125)  # n_positions 128
    before = weights(tuner.model)
    with pytest.raises(ConfigError, match=r"plus 125 new tokens is past the model's 128 "
                                          "positions"):
        tuner.step(["the quick brown fox jumps over the lazy dog"])
    assert weights(tuner.model) == before
    ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2,
                max_new_tokens=2).step(["the quick"])


@pytest.mark.parametrize("prompts, match", [
    ("Write a haiku", "a list of strings, got one string"),
    (b"Write a haiku", "a list of strings, got one string"),
    (["a prompt", ""], "every prompt must be a non-empty string, got ''"),
    (["a prompt", b"bytes"], "non-empty string, got b'bytes'"),
    ([1], "non-empty string, got 1"),
    (["a prompt", None], "non-empty string, got None"),
])
def test_prompts_that_are_not_strings_are_refused(tokenizer, prompts, match):
    """A single string was read as one prompt per character."""
    seen = []
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer,
                        lambda p, c: seen.append(p) or 0.0, population=2, max_new_tokens=2)
    before = weights(tuner.model)
    with pytest.raises(ConfigError, match=match):
        tuner.step(prompts)
    assert seen == [] and weights(tuner.model) == before


def test_rewards_too_large_to_shape_are_refused_before_the_update(tokenizer):
    """Finite rewards near float64's limit averaged or shaped to inf / NaN, and the update
    turned the weights into NaN."""
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=4,
                        max_new_tokens=2)
    tuner.evaluate = lambda prompts: np.array([[1e308, 1e308], [-1e308, -1e308]] * 2)
    before = weights(tuner.model)
    with pytest.raises(ConfigError, match="too large to average and shape"):
        tuner.step(PROMPTS)
    assert weights(tuner.model) == before


# ---------------------------------------------------------------- tasks


def test_conciseness_targets_and_default():
    prompts, reward = conciseness(["Name a primary colour\tRed", "Say hi"])
    assert prompts == ["Name a primary colour", "Say hi"]
    assert reward(prompts[0], " Blue ") == -1
    assert reward(prompts[0], "Red") == 0
    assert reward(prompts[1], "x" * 10) == 0 and reward(prompts[1], "") == -10


@pytest.mark.parametrize("answer, score", [
    ("19 + 36 + 55 - 45", 0.0),  # 45 is not given
    ("(55 - 36) * 7 / 19 = 7", 0.5 * (1 - 58 / 65)),  # valid, value 7, partial credit
    ("<answer>55 + 19 - 36 + 7*4</answer>", 0.0),  # 4 not given
    ("55 + 7 + 19 - 36 - 7", 0.0),  # 7 used twice
    ("<answer>36 + 55 - 19 - 7</answer> wait", 1.0),  # 65
    ("36+55-19-7", 1.0),
    ("36 + 55 - 19 - 7 = 65\nmore text", 1.0),
    ("__import__('os').system('true')", 0.0),
    ("55 / (36 - 36)", 0.0),
    ("2 ** 10", 0.0),
    ("-19 + 36", 0.0),  # unary minus is not allowed
    ("", 0.0),
    ("the answer is 65", 0.0),
    ("(36) + 55 - 19 - 7", 1.0),
    ("0x24 + 55 - 19 - 7", 0.0),  # 36 in hex is not the given 36 written down
    ("0o44 + 55 - 19 - 7", 0.0),
    ("0b100100 + 55 - 19 - 7", 0.0),
    ("3_6 + 55 - 19 - 7", 0.0),
])
def test_countdown_scores(answer, score):
    assert countdown_score([19, 36, 55, 7], 65, answer) == pytest.approx(score)


@given(st.text(alphabet="0123456789+-*/() =<>answer\n", max_size=80))
def test_countdown_never_raises_and_stays_in_range(text):
    assert 0.0 <= countdown_score([3, 5, 7, 11], 24, text) <= 1.0


def test_repeated_prompts_merge_or_are_refused():
    prompts, reward = conciseness(["a\tRed", "b", "a\tTan"])  # the same length: merged
    assert prompts == ["a", "b"] and reward("a", "xyz") == 0
    with pytest.raises(DataError, match="prompt 3 repeats prompt 1 .*'a'"):
        conciseness(["a\tRed", "b", "a\tBlue"])
    with pytest.raises(DataError, match="prompt 2 repeats prompt 1"):
        conciseness(["b", "b\tRed"])  # no tab: DEFAULT_TARGET_CHARS
    assert countdown(["Using 3 5 reach 8"] * 2)[0] == ["Using 3 5 reach 8"]


def test_countdown_prompt_parsing():
    prompts, reward = countdown(["Using 3 5 7 reach 22"])
    assert reward(prompts[0], "3 * 5 + 7") == 1.0
    with pytest.raises(DataError, match="line 1"):
        countdown(["no numbers here"])
    with pytest.raises(ConfigError, match="conciseness, countdown"):
        load_task("no-such-task", ["x"])


# ---------------------------------------------------------------- the finetune command


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A save_pretrained folder with a tiny Llama, and a prompts file."""
    root = tmp_path_factory.mktemp("hf")
    build("llama", tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "prompts.txt").write_text("the quick brown\nlazy dog\n")
    return root


def test_workers_given_different_models_are_told_so_not_that_they_diverged(tokenizer,
                                                                          monkeypatch):
    """Before the first update the weights can differ only by what each worker was given: that
    was reported as replicas that diverged (a faulty machine)."""
    checks = []
    monkeypatch.setattr(hf, "_in_group", lambda: True)
    monkeypatch.setattr(hf.distributed, "assert_same",
                        lambda value, what, diverged=True: checks.append((what, diverged)))
    tuner = ESFineTuner(build("gpt2", tokenizer), tokenizer, zero_reward, population=2)
    tuner.verify()
    tuner.step_index = 3
    tuner.verify()
    assert checks == [("the model's weights (--model)", False), ("the weights at step 3", True)]


def test_workers_must_share_the_replica_check_interval(monkeypatch):
    """Under torchrun the settings every worker must share include INTES_DIST_VERIFY_EVERY:
    workers with different values would run the weight check at different steps."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    checked = []
    monkeypatch.setattr(distributed, "assert_same", lambda value, *a, **kw: checked.append(value))
    for every in ("10", "3"):
        monkeypatch.setenv(distributed.VERIFY_ENV, every)
        assert finetune_module._agree(["p"], "conciseness", "auto", 2, {"population": 4})
    assert checked[0] != checked[1]


def test_prompts_file_drops_blank_lines_and_trailing_whitespace(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"the quick  \r\n\n \t\n lazy dog\t\nover\tthe target \n")
    assert finetune_module._read_prompts(path) == ["the quick", " lazy dog", "over\tthe target"]


def test_output_folder_gets_the_mode_of_a_plain_mkdir(tmp_path):
    old = os.umask(0o027)
    try:
        (tmp_path / "plain").mkdir()
        staged = finetune_module._staging_dir(tmp_path / "out")
        assert os.umask(0o027) == 0o027  # the umask is put back
    finally:
        os.umask(old)
    assert stat.S_IMODE(staged.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750


def invoke(*args: str):
    return CliRunner().invoke(finetune, [str(a) for a in args])


def test_finetune_writes_model_metrics_and_plot(saved, tmp_path):
    out = tmp_path / "out"
    result = invoke("--model", saved / "model", "--task", "conciseness", "--prompts",
                    saved / "prompts.txt", "--population", 4, "--steps", 2,
                    "--max-new-tokens", 4, "--out", out)
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (out / "reward.png").stat().st_size > 0
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_finetune_says_once_how_it_generates_for_a_model_that_needs_another_way(saved,
                                                                                tokenizer,
                                                                                tmp_path):
    folder = tmp_path / "rwkv"
    build("rwkv", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))  # of 3 and 2 tokens
    result = invoke("--model", folder, "--task", "conciseness", "--prompts",
                    tmp_path / "prompts.txt", "--population", 2, "--steps", 2,
                    "--max-new-tokens", 3, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    said = ("RwkvForCausalLM: generating without its cache (which mixes a batch's rows) and in "
            "a batch per prompt length (padding changes its output)\n")
    assert result.output.count(said) == 1  # after the progress bar's line (stderr, here mixed)


@pytest.mark.parametrize("task", ["countdown", "conciseness"])
def test_finetune_runs_on_the_sample_prompts(saved, tmp_path, task):
    prompts = Path(__file__).resolve().parents[1] / "data" / "prompts" / f"{task}.txt"
    out = tmp_path / "out"
    result = invoke("--model", saved / "model", "--task", task, "--prompts", prompts,
                    "--population", 2, "--steps", 1, "--max-new-tokens", 4, "--out", out)
    assert result.exit_code == 0, result.output
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["step"] == 0


@pytest.mark.parametrize("form", ["file.py:function", "module:function"])
def test_finetune_with_a_reward_function(saved, tmp_path, monkeypatch, form):
    (tmp_path / "short_reward.py").write_text(
        "def short(prompt, completion):\n    return -len(completion)\n")
    monkeypatch.chdir(tmp_path)  # module:function is found in the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "short_reward", raising=False)
    module = tmp_path / "short_reward.py" if form.startswith("file") else "short_reward"
    spec = f"{module}:short"
    result = invoke("--model", saved / "model", "--reward", spec, "--prompts",
                    saved / "prompts.txt", "--population", 2, "--steps", 1,
                    "--max-new-tokens", 2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("case, error, match", [
    ("unknown task", ConfigError, "unknown task"),
    ("empty prompts", DataError, "no prompts"),
    ("missing model", DataError, "model path"),
    ("raising reward", ConfigError, "raised ZeroDivisionError"),
    ("nan reward", ConfigError, "finite number"),
    ("bad reward spec", ConfigError, "module:function"),
    ("task and reward", ConfigError, "exactly one"),
    ("out not empty", ConfigError, "not empty"),
])
def test_finetune_bad_input_is_one_line(saved, tmp_path, case, error, match):
    (tmp_path / "r.py").write_text("def div(p, c):\n    return 1 / 0\n"
                                   "def nan(p, c):\n    return float('nan')\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    args = {"--model": saved / "model", "--task": "conciseness",
            "--prompts": saved / "prompts.txt", "--out": tmp_path / "out"}
    args.update({
        "unknown task": {"--task": "no-such-task"},
        "empty prompts": {"--prompts": tmp_path / "empty.txt"},
        "missing model": {"--model": tmp_path / "nowhere"},
        "raising reward": {"--task": None, "--reward": f"{tmp_path / 'r.py'}:div"},
        "nan reward": {"--task": None, "--reward": f"{tmp_path / 'r.py'}:nan"},
        "bad reward spec": {"--task": None, "--reward": "no_colon"},
        "task and reward": {"--reward": f"{tmp_path / 'r.py'}:div"},
        "out not empty": {"--out": tmp_path / "full"},
    }[case])
    argv = [x for k, v in args.items() if v is not None for x in (k, v)]
    result = invoke(*argv, "--population", 2, "--steps", 1, "--max-new-tokens", 2)
    assert result.exit_code != 0
    assert isinstance(result.exception, error), result.output
    assert isinstance(result.exception, IntesError) and "\n" not in str(result.exception)
    assert re.search(match, str(result.exception))
    assert not (tmp_path / "out").exists()


def one_error_line(result, match: str) -> None:
    """Through the `intes` group, a user error is one `error:` line, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and re.search(match, line), line
    assert "Traceback" not in result.output


@pytest.fixture
def no_model_load(monkeypatch):
    """Flags must be refused before the model is loaded (so the errors come at once)."""
    def fail(*args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(finetune_module, "_load_model", fail)


@pytest.mark.parametrize("flag, value, match", [
    ("--target-modules", "[", r"--target-modules '\[' is not a valid regular expression: "
                              "unterminated character set"),
    ("--target-modules", "(a", "not a valid regular expression"),
    ("--device", "bogus", "--device 'bogus' is not a torch device"),
    ("--device", "meta", "--device meta holds no weights"),
    ("--seed", -1, r"--seed must be in 0\.\.4294967295, got -1"),
    ("--seed", 2**32, "--seed must be in 0"),
    ("--lr", -1, "--lr must be a positive finite number, got -1"),
    ("--lr", 0, "--lr must be a positive"),
    ("--lr", "nan", "--lr must be a positive"),
    ("--sigma", 0, "--sigma must be a positive"),
    ("--sigma", "-1e-3", "--sigma must be a positive"),
    ("--sigma", "inf", "--sigma must be a positive"),
    ("--population", 3, "--population must be an even number >= 2"),
    ("--population", 0, "--population must be an even number >= 2"),
    ("--rank", 0, r"--rank must be in 1\.\.64"),
    ("--rank", 65, r"--rank must be in 1\.\.64"),
    ("--steps", 0, "--steps must be >= 1"),
    ("--max-new-tokens", 0, "--max-new-tokens must be >= 1"),
    ("--member-chunk", 0, "--member-chunk must be >= 1"),
])
def test_finetune_bad_flag_is_one_error_line(saved, tmp_path, no_model_load, flag, value, match):
    args = {"--model": saved / "model", "--task": "conciseness", "--prompts": saved / "prompts.txt",
            "--population": 2, "--steps": 1, "--max-new-tokens": 2, "--device": "cpu",
            "--out": tmp_path / "out", flag: value}
    result = CliRunner().invoke(cli, ["finetune", *[str(x) for kv in args.items() for x in kv]])
    one_error_line(result, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, gpus, match", [
    ("cuda", 0, "--device cuda: CUDA is not available here"),
    ("cuda:0", 0, "--device cuda:0: CUDA is not available here"),
    ("cuda:2", 2, r"--device cuda:2: this machine has 2 CUDA device\(s\)"),
])
def test_finetune_missing_cuda_is_one_error_line(saved, tmp_path, no_model_load, monkeypatch,
                                                 device, gpus, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    result = CliRunner().invoke(cli, [
        "finetune", "--model", str(saved / "model"), "--task", "conciseness", "--prompts",
        str(saved / "prompts.txt"), "--device", device, "--out", str(tmp_path / "out")])
    one_error_line(result, match)


def test_finetune_help_says_what_a_line_without_a_tab_means():
    result = CliRunner().invoke(cli, ["finetune", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for option in ("--task", "--prompts"):
        helptext = text.split(f"{option} ")[1].split(" --")[0]  # up to the next option
        assert re.search(rf"without a tab .*{DEFAULT_TARGET_CHARS} characters", helptext), text


# ---------------------------------------------------------------- finetune under torchrun

BIN = Path(sys.executable).parent
INTES = str(BIN / "intes") if (BIN / "intes").exists() else shutil.which("intes")
TORCHRUN = str(BIN / "torchrun") if (BIN / "torchrun").exists() else shutil.which("torchrun")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")
LOGGED_REWARD = """import os


def chars(prompt, completion):
    rank = os.environ.get("RANK", "alone")
    with open(os.path.join(os.path.dirname(__file__), f"calls-{rank}.txt"), "a") as f:
        f.write(repr(completion) + "\\n")
    return sum(map(ord, completion)) % 97
"""


def tensors(folder: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in load_file(folder / "model.safetensors").items()}


@pytest.mark.slow
@pytest.mark.skipif(INTES is None or TORCHRUN is None, reason="intes or torchrun not installed")
@pytest.mark.parametrize("arch", ["llama", "rwkv"])  # rwkv: no cache, a batch per length
def test_finetune_under_torchrun_gives_the_weights_of_one_process(saved, tokenizer, tmp_path,
                                                                  arch):
    (tmp_path / "r.py").write_text(LOGGED_REWARD)
    model, prompts = saved / "model", saved / "prompts.txt"
    if arch == "rwkv":
        model, prompts = tmp_path / "rwkv", tmp_path / "prompts.txt"
        build("rwkv", tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
        prompts.write_text("\n".join(PROMPTS))  # of 3 and 2 tokens
    n_prompts = len(prompts.read_text().splitlines())
    args = ["--model", model, "--reward", f"{tmp_path / 'r.py'}:chars", "--prompts",
            prompts, "--population", 4, "--steps", 2, "--max-new-tokens", 6,
            "--sigma", 0.05, "--lr", 1e-2, "--seed", 3]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert not distributed.launched()
    result = invoke(*args, "--out", tmp_path / "one" / "out")
    assert result.exit_code == 0, result.output
    assert not torch.distributed.is_initialized()  # one process: no process group

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", INTES_DIST_VERIFY_EVERY="1")  # as the in-process run
    # --standalone: torchrun's store takes a free port itself (none picked here and raced for)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", INTES, "finetune",
           *map(str, args), "--out", str(tmp_path / "two" / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("saved ") == 1  # rank 0 alone reports (and writes)

    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    assert tensors(two) == tensors(one)  # bit for bit
    assert tensors(one) != tensors(model)  # and the steps did move the weights
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["out"]  # no staging left behind
    logged = [[{k: v for k, v in json.loads(line).items() if k != "time_s"}
               for line in (folder / "metrics.jsonl").read_text().splitlines()]
              for folder in (one, two)]
    assert logged[0] == logged[1] and [m["step"] for m in logged[0]] == [0, 1]
    # each worker generated for its own pair only: 2 steps x 2 members x the prompts
    calls = {r: (tmp_path / f"calls-{r}.txt").read_text().splitlines()
             for r in ("alone", "0", "1")}
    assert len(calls["0"]) == len(calls["1"]) == 4 * n_prompts == len(calls["alone"]) // 2
    assert sorted(calls["0"] + calls["1"]) == sorted(calls["alone"])
