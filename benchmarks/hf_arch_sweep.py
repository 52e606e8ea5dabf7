"""The HF adapter across causal-LM architectures: how each generates, and whether every member's
completion of a prompt beside prompts of other lengths is the one it makes of that prompt alone.
Prints JSON (one record per architecture, then a summary).

Each architecture is a tiny random float32 model built from its config (no download), with
4 members and 4 prompts of 4 token lengths, run in a process of its own (a time limit each).
A model that does not generate one prompt on its own at these sizes is reported apart from one
that fails through the adapter.

    python benchmarks/hf_arch_sweep.py [--archs llama,rwkv,...] [--all] [--out PATH.json]

``--all`` takes every causal-LM model type of the installed transformers; some cannot be built
tiny from the sizes below and are reported as not built.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ARCHS = ("llama mistral qwen2 qwen3 gemma gemma2 gemma3_text phi phi3 gpt2 gpt_neox gptj opt "
         "bloom falcon codegen stablelm olmo2 starcoder2 mixtral qwen2_moe deepseek_v3 granite "
         "mamba mamba2 jamba bamba zamba2 recurrent_gemma xlstm rwkv").split()
PROMPTS = ["the quick brown fox jumps over the lazy dog 1", "lazy dog", "over the lazy dog",
           "jumps"]
SIZES = dict(  # set where a config has the field
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, moe_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, shared_expert_intermediate_size=32, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_group=1, topk_group=1, state_size=8, ssm_state_size=8, mamba_d_state=8, expand=2,
    conv_kernel=4, time_step_rank=8, n_groups=1, mamba_n_groups=1)
EXTRA = {  # what an architecture needs besides SIZES to build tiny
    "gpt2": dict(n_positions=256), "gptj": dict(n_positions=256, rotary_dim=8),
    "codegen": dict(n_positions=256, n_ctx=256, rotary_dim=8),
    "mamba2": dict(num_heads=8, head_dim=16, chunk_size=16),
    "rwkv": dict(attention_hidden_size=64, context_length=256),
    "xlstm": dict(embedding_dim=64, num_heads=4, num_blocks=2, chunk_size=16, mode="inference",
                  qk_dim_factor=1.0, v_dim_factor=1.0),
    "recurrent_gemma": dict(lru_width=64, attention_window_size=16,
                            block_types=["recurrent", "attention"]),
    "zamba2": dict(num_hidden_layers=3, n_mamba_heads=8, mamba_headdim=16, attention_head_dim=16,
                   num_key_value_heads=4, adapter_rank=8, chunk_size=16, use_mamba_kernels=False,
                   hybrid_layer_ids=[1],
                   layers_block_type=["linear_attention", "hybrid", "linear_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, use_mamba_kernels=False, mamba_dt_rank=8),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=16),
    "deepseek_v3": dict(num_key_value_heads=4, head_dim=8),
    "bloom": dict(n_head=4), "falcon": dict(num_kv_heads=4, new_decoder_architecture=False),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    **{arch: dict(num_key_value_heads=4) for arch in ("phi", "stablelm", "gpt_neox")},
}
TARGETS = {  # layers a model uses without calling them are left out, as the user is told to
    arch: "^(?!.*dt_proj)" for arch in ("mamba", "falcon_mamba", "jamba")}


def check(arch: str) -> dict:
    """One architecture's record (run in a process of its own)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from bench_hf import tiny_tokenizer  # this script's folder is on the path
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    from intes.adapters.hf import ESFineTuner

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    tok = tiny_tokenizer(eos=True)  # generation stops at eos, as a real model's does
    record: dict = {"arch": arch}
    try:
        default = AutoConfig.for_model(arch)
        fields = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
        sizes = {k: v for k, v in SIZES.items() if k in fields} | EXTRA.get(arch, {})
        config = AutoConfig.for_model(arch, **sizes, vocab_size=tok.vocab_size,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    except Exception as err:  # a config these sizes do not fit
        return {**record, "built": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    try:  # the model alone, one prompt, before intes: it may not generate at these sizes
        with torch.no_grad():
            model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=2,
                           do_sample=False, pad_token_id=tok.pad_token_id)
    except Exception as err:
        return {**record, "built": True, "generates": False,
                "error": f"{type(err).__name__}: {str(err)[:200]}"}
    record.update(built=True, generates=True)

    def completions(prompts: list[str]) -> tuple[dict[str, list[str]], ESFineTuner]:
        seen: dict[str, list[str]] = {p: [] for p in prompts}
        tuner = ESFineTuner(model, tok, lambda p, c: seen[p].append(c) or 0.0, population=4,
                            sigma=0.05, max_new_tokens=8, target_modules=TARGETS.get(arch))
        tuner.evaluate(prompts)
        return seen, tuner

    try:
        together, tuner = completions(PROMPTS)
        alone = {p: completions([p])[0][p] for p in PROMPTS}
    except Exception as err:  # through intes: the adapter's own message, or a failure of it
        return {**record, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    return {**record, "error": None, "batching": tuner.batching(),
            "alike_alone": together == alone}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--all", action="store_true", help="every causal-LM model type")
    p.add_argument("--timeout", type=float, default=300, help="seconds per architecture")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process's architecture
    args = p.parse_args()
    if args.one:
        print(json.dumps(check(args.one)))
        return
    if args.all:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    else:
        archs = args.archs.split(",")
    records = []
    for arch in archs:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", arch], capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            record = (json.loads(lines[-1]) if done.returncode == 0 and lines else
                      {"arch": arch, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        except subprocess.TimeoutExpired:
            record = {"arch": arch, "error": f"over {args.timeout:.0f} s"}
        records.append(record)
        print(json.dumps(record), flush=True)
    import transformers

    ran = [r for r in records if r.get("error") is None]
    summary = {"transformers": transformers.__version__, "archs": len(records),
               "generate_alone": sum(bool(r.get("generates")) for r in records), "ran": len(ran),
               "alike_alone": sum(r["alike_alone"] for r in ran),
               "not_batched_plainly": {r["arch"]: r["batching"] for r in ran if r["batching"]},
               "errors_through_intes": {r["arch"]: r["error"] for r in records
                                        if r.get("generates") and r["error"]},
               "errors_alone": {r["arch"]: r["error"] for r in records
                                if not r.get("generates") and r.get("error")}}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "records": records}, indent=1))


if __name__ == "__main__":
    main()
