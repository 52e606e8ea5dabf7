"""intes' batched low-rank population vs the per-member in-place loop of "Evolution Strategies
at Scale" on one tiny Llama: members evaluated per second and weight drift. Prints JSON.

Baseline (the paper's loop, written here): for each member, add sigma * N(0, 1) noise from a
seeded torch.Generator to every parameter in place (noise in the parameter's dtype), generate
for the prompts, then regenerate the same noise and subtract it. intes instead runs one
generate() over members x prompts with the rank-r side path and never writes a weight.

Both decode greedily with the same prompts, max_new_tokens and a trivial reward, and each
timing is the best of --repeats interleaved runs (the machine may be shared). The intes step
figure adds the seeded update (timed with lr 0 so the model stays put); the baseline figure
has no update at all.

    python benchmarks/bench_hf.py [--population 30] [--max-new-tokens 16] [--repeats 3]
                                  [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from intes.adapters.hf import ESFineTuner

PROMPTS = ["the quick brown", "lazy dog", "over the", "jumps over the lazy"]
SIGMA = 1e-3  # the paper's noise scale


def tiny_tokenizer(eos: bool = False) -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained on the spot: the benchmark needs no network.

    By default it has no eos token, so every member of both methods generates exactly
    max_new_tokens: the same work whatever the perturbation does to the text.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    special = ["<unk>", "<pad>", *(["<eos>"] if eos else [])]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>" if eos else None)


def tiny_llama(tok: PreTrainedTokenizerFast, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """Hidden 64, 2 layers, the same weights on every call."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=tok.vocab_size,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def reward(prompt: str, completion: str) -> float:
    return float(len(completion))


@torch.no_grad()
def perturb_in_place(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Every parameter += scale * N(0, 1) from a generator seeded per member (paper-style)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        p.add_(noise, alpha=scale)


def baseline_evaluate(model, tok, population: int, max_new_tokens: int) -> list[float]:
    """Perturb, generate, restore: one member at a time."""
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    fitness = []
    for member in range(population):
        perturb_in_place(model, member, SIGMA)
        out = model.generate(**enc, generation_config=config)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        fitness.append(sum(reward(p, t) for p, t in zip(PROMPTS, texts, strict=True)))
        perturb_in_place(model, member, -SIGMA)
    return fitness


@torch.no_grad()
def max_drift(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> float:
    """Largest |w - w0| over every parameter, in float32."""
    return max(float((p.float() - original[n].float()).abs().max())
               for n, p in model.named_parameters())


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each fn over repeats, the fns interleaved so load hits all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def drift_figures(tok, population: int, device: str) -> dict[str, float]:
    """Max |w - w0| after `population` baseline perturb/restore cycles vs an intes evaluation."""
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = tiny_llama(tok, dtype, device)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        for member in range(population):
            perturb_in_place(model, member, SIGMA)
            perturb_in_place(model, member, -SIGMA)
        figures[f"baseline_{name}"] = max_drift(model, original)
        model = tiny_llama(tok, dtype, device)
        ESFineTuner(model, tok, reward, population=population, sigma=SIGMA,
                    max_new_tokens=4).evaluate(PROMPTS)
        figures[f"intes_{name}"] = max_drift(model, original)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    tok = tiny_tokenizer()
    model = tiny_llama(tok, torch.float32, args.device)
    tuner = ESFineTuner(model, tok, reward, population=args.population, sigma=SIGMA,
                        max_new_tokens=args.max_new_tokens)
    tuner.evaluate(PROMPTS)  # warm-up both paths once
    baseline_evaluate(model, tok, 2, args.max_new_tokens)
    n = args.population
    fitness = np.random.default_rng(0).standard_normal(n)
    t = best_times({
        "intes": lambda: tuner.evaluate(PROMPTS),
        "baseline": lambda: baseline_evaluate(model, tok, n, args.max_new_tokens),
        "update": lambda: tuner.adapter.update(0, fitness, 0.0),  # lr 0: same cost, same model
    }, args.repeats)
    print(json.dumps({
        "device": args.device, "threads": torch.get_num_threads(),
        "model": "llama hidden=64 layers=2 vocab=300 float32", "population": n,
        "prompts": len(PROMPTS), "max_new_tokens": args.max_new_tokens, "sigma": SIGMA,
        "intes_members_per_s": round(n / t["intes"], 2),
        "intes_step_members_per_s": round(n / (t["intes"] + t["update"]), 2),
        "baseline_members_per_s": round(n / t["baseline"], 2),
        "speedup": round(t["baseline"] / t["intes"], 2),
        "max_abs_weight_drift_after_population_cycles": drift_figures(tok, n, args.device),
    }, indent=2))


if __name__ == "__main__":
    main()
