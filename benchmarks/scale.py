"""The plan for Llama-2-70B end to end (docs/scale.md): every figure measured here or derived from a measurement.

Measured by this script, on this machine:
- the explanation prompt's length (the project's prompt builder, few-shot examples included, 10 records of
  41 tokens cut from real text) and the LLM-judge prompt's, in tokens of the SmolLM2 tokenizer (a 49k BPE;
  OpenAI's tokenizers give a similar count for English and code, not the same one);
- the time to merge one shard's state into the driver's for a Llama-2-70B-shaped state (two layers of
  28,672 neurons, top-20 records of 41 tokens, 5+2 random candidates, timed and scaled to 80 layers), and
  that state's size (what every shard returns and writes);
- SmolLM2-135M's non-embedding parameter count (to turn its measured tokens/s into FLOP/s).

Read from the other benchmarks' results (rerun them to refresh): ``collect.json`` (collection tokens/s,
collection over plain-forward ratio, the Ray run's per-actor tokens/s and overhead), ``embed.json``
(MiniLM explanations/s), ``score.json`` (FAISS at 2.3M), ``explain.json`` (client CPU per LLM call).

Stated assumptions (flags): probe-corpus size, GPU (memory, dense bf16 FLOP/s, utilisation), prices.
Writes benchmarks/results/scale.json and prints the plan.

    python benchmarks/scale.py [--probe-tokens 10000000] [--gpu-mem-gb 80] [--gpu-tflops 989] [--mfu 0.4]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# Llama-2-70B (meta-llama/Llama-2-70b-hf config.json)
L70 = {"n_layers": 80, "d_model": 8192, "d_mlp": 28672, "n_heads": 64, "n_kv_heads": 8, "vocab": 32000}


def llama_params(c: dict) -> tuple[int, int]:
    """(non-embedding parameters, embedding + unembedding parameters) of a Llama config."""
    hd = c["d_model"] // c["n_heads"]
    attn = 2 * c["d_model"] * c["d_model"] + 2 * c["d_model"] * c["n_kv_heads"] * hd
    mlp = 3 * c["d_model"] * c["d_mlp"]
    norms = 2 * c["d_model"]
    return c["n_layers"] * (attn + mlp + norms) + c["d_model"], 2 * c["vocab"] * c["d_model"]


def prompt_tokens(tok, messages: list[dict]) -> int:
    # 4 tokens of chat framing per message (role and separators), as OpenAI's cookbook counts them.
    return sum(len(tok.encode(m["content"], add_special_tokens=False)) + 4 for m in messages) + 3


def measure_prompts(model) -> dict:
    import pydoc_data.topics

    from snip_lens.explain import build_explanation_prompt
    from snip_lens.select import build_judge_prompt
    from snip_lens.types import ActivationRecord, NeuronId, NeuronRecords

    tok = model.tokenizer
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20])
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    recs = []
    for r in range(10):  # top-10 records of 32 + 1 + 8 tokens, the collect defaults
        s = rng.randrange(0, len(ids) - 41)
        toks = [tok.decode([i]) for i in ids[s:s + 41]]
        acts = [max(0.0, rng.gauss(0, 1)) for _ in toks]
        acts[32] = 6.0
        recs.append(ActivationRecord(toks, acts))
    nr = NeuronRecords(NeuronId(0, 0), recs)
    expl = prompt_tokens(tok, build_explanation_prompt(nr, few_shot=True, max_records=10))
    expl_zero = prompt_tokens(tok, build_explanation_prompt(nr, few_shot=False, max_records=10))
    samples = [text[i * 997:i * 997 + 400] for i in range(5)]  # the sweep's 5 samples of 400 characters
    judge = prompt_tokens(tok, build_judge_prompt("the token 'def' in Python function definitions", samples))
    return {"explain_prompt_tokens_few_shot": expl, "explain_prompt_tokens_zero_shot": expl_zero,
            "judge_prompt_tokens": judge, "tokenizer": "smollm2-135m"}


def measure_merge(layers_timed: int = 2) -> dict:
    import importlib

    collect_mod = importlib.import_module("snip_lens.collect")
    cfg = collect_mod.CollectConfig(layers=tuple(range(layers_timed)), top_k=20, context=(32, 8), n_random=5)
    N = L70["d_mlp"]
    a = collect_mod._State(cfg, N, ["records"])
    b = collect_mod._State(cfg, N, ["records"])
    g = torch.Generator().manual_seed(0)
    for st, base in ((a, 0), (b, 10**9)):
        st.t["top_v"] = torch.sort(torch.rand(layers_timed, 20, N, generator=g), dim=1, descending=True).values
        st.t["top_i"] = torch.randint(0, 10**9, (layers_timed, 20, N), generator=g) + base
        st.t["top_ctx"] = torch.rand(st.t["top_ctx"].shape, generator=g)
        st.t["rnd_key"] = torch.sort(torch.rand(layers_timed, 7, N, generator=g), dim=1, descending=True).values
        st.t["rnd_i"] = torch.randint(0, 10**9, (layers_timed, 7, N), generator=g) + base
        st.t["s0.n"] = torch.full((layers_timed,), 1000.0, dtype=torch.float64)
    part = b.part(0, records=True)
    state_bytes = sum(v.numel() * v.element_size() for v in part.values())
    t = time.perf_counter()
    a.merge(part)
    dt = time.perf_counter() - t
    scale = L70["n_layers"] / layers_timed
    return {"layers_timed": layers_timed, "merge_s_timed": dt, "merge_s_80_layers": dt * scale,
            "state_bytes_80_layers": state_bytes * scale, "state_gb_80_layers": state_bytes * scale / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe-tokens", type=float, default=10e6, help="tokens of the probe corpus (assumed)")
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU (H100 SXM: 80)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak FLOP/s a forward pass reaches")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs available (one node of 8)")
    ap.add_argument("--price-in", type=float, default=0.15, help="$ per 1M input tokens (gpt-4o-mini list price)")
    ap.add_argument("--price-out", type=float, default=0.60, help="$ per 1M output tokens (gpt-4o-mini list price)")
    ap.add_argument("--batch-discount", type=float, default=0.5, help="Batch API price factor (OpenAI: 50%% off)")
    ap.add_argument("--output-tokens", type=int, default=20, help="tokens per explanation answer (cap: 60)")
    ap.add_argument("--embed-price", type=float, default=0.02, help="$ per 1M tokens, text-embedding-3-small")
    ap.add_argument("--served-params", type=float, default=8e9, help="parameters of a vLLM-served explainer")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from snip_lens import load_model

    coll = json.loads((RESULTS / "collect.json").read_text())
    embed = json.loads((RESULTS / "embed.json").read_text())
    score = json.loads((RESULTS / "score.json").read_text())
    explain = json.loads((RESULTS / "explain.json").read_text())

    smol = load_model("smollm2-135m")
    hf = smol.original_model
    embed_names = ("embed_tokens", "lm_head", "wte", "wpe")
    smol_params = sum(p.numel() for n, p in hf.named_parameters() if not any(e in n for e in embed_names))
    prompts = measure_prompts(smol)
    merge = measure_merge()

    p70, p70_embed = llama_params(L70)
    n_neurons = L70["n_layers"] * L70["d_mlp"]
    flops_tok_70 = 2 * p70  # forward FLOPs per token (attention scores over 128 tokens add < 1%)
    flops_tok_smol = 2 * smol_params
    # collect / plain forward, measured on SmolLM2's CPU; at least 1 here: below 1 on the CPU only because
    # collection stops before the unembedding and its CPU kernels are fused, neither of which a GPU plan
    # should bank on (no GPU measurement exists)
    overhead = max(1.0, coll["ratio_all_layers"])
    smol_collect_tps = coll["tokens"] / coll["best_seconds"]["collect_all_layers"]
    cpu_flops = coll["hf_tokens_per_s"] * flops_tok_smol  # effective FLOP/s of a forward here
    cpu_tps_70 = smol_collect_tps * flops_tok_smol / flops_tok_70

    weights_gb = (p70 + p70_embed) * 2 / 1e9  # bf16
    act_gb = 8 * args.n_ctx * L70["d_mlp"] * 4 * 3 / 1e9  # a batch of 8 windows: fp32 copies in the hook
    need_gb = weights_gb + merge["state_gb_80_layers"] + act_gb
    gpus_per_replica = math.ceil(need_gb / (0.95 * args.gpu_mem_gb))
    replicas = max(1, args.gpus // gpus_per_replica)
    # device_map places whole layers on each GPU and runs them in turn: one GPU of a replica works at a time.
    gpu_tps = args.gpu_tflops * 1e12 * args.mfu / flops_tok_70 / overhead
    collect_s = args.probe_tokens / (replicas * gpu_tps)
    # The driver merges shards while the actors compute; it keeps pace when one shard's merge takes no longer
    # than the replicas need to produce the next one: shard_tokens >= merge_s * replicas * tokens/s.
    min_shard_tokens = merge["merge_s_80_layers"] * replicas * gpu_tps
    shard_windows = 2 ** math.ceil(math.log2(max(1.0, min_shard_tokens / args.n_ctx)))
    n_shards = math.ceil(args.probe_tokens / (shard_windows * args.n_ctx))
    ray = coll.get("ray", {})

    calls = n_neurons
    p_in = prompts["explain_prompt_tokens_few_shot"]
    tok_in, tok_out = calls * p_in, calls * args.output_tokens
    cost = tok_in / 1e6 * args.price_in + tok_out / 1e6 * args.price_out
    judge_calls = 2000
    judge_cost = judge_calls * (prompts["judge_prompt_tokens"] / 1e6 * args.price_in + 3 / 1e6 * args.price_out)
    served_gpu_s = (tok_in + tok_out) * 2 * args.served_params / (args.gpu_tflops * 1e12 * args.mfu)
    client_core_s = calls * explain["concurrent"]["client_cpu_ms_per_explanation"] / 1e3
    expl_tokens = 15
    embed_s_cpu = calls / embed["pipeline_cold_per_s"]
    search = {r["kind"]: r for r in score["search"]["indexes"]} if "search" in score else {}

    plan = {
        "assumptions": vars(args),
        "measured": {"prompts": prompts, "merge": merge, "smollm2_non_embedding_params": smol_params,
                     "smollm2_collect_tokens_per_s": smol_collect_tps, "collect_over_forward": overhead,
                     "cpu_effective_flops": cpu_flops, "ray": ray,
                     "embed_texts_per_s_cpu": embed["pipeline_cold_per_s"],
                     "llm_client_cpu_ms_per_call": explain["concurrent"]["client_cpu_ms_per_explanation"],
                     "faiss_score_2_3M_s": score.get("faiss_s"), "faiss_search": search},
        "llama2_70b": {"non_embedding_params": p70, "embedding_params": p70_embed, "neurons": n_neurons,
                       "forward_flops_per_token": flops_tok_70, "weights_gb_bf16": weights_gb},
        "collection": {"state_gb_per_replica": merge["state_gb_80_layers"], "activation_gb": act_gb,
                       "memory_gb_per_replica": need_gb, "gpus_per_replica": gpus_per_replica,
                       "replicas": replicas, "tokens_per_s_per_replica_gpu": gpu_tps,
                       "tokens_per_s_per_replica_here_cpu": cpu_tps_70, "collect_s": collect_s,
                       "collect_h": collect_s / 3600, "shard_windows": shard_windows, "shards": n_shards,
                       "shards_per_actor": n_shards / replicas,
                       "shard_file_gb": merge["state_gb_80_layers"],
                       "driver_merge_s_total": n_shards * merge["merge_s_80_layers"]},
        "explain": {"calls": calls, "input_tokens": tok_in, "output_tokens": tok_out, "cost_usd": cost,
                    "cost_usd_batch_api": cost * args.batch_discount, "batches": math.ceil(calls / 50_000),
                    "client_core_s_live": client_core_s, "served_gpu_h": served_gpu_s / 3600,
                    "judge_calls": judge_calls, "judge_cost_usd": judge_cost},
        "embed": {"texts": calls, "cpu_s_here": embed_s_cpu, "cpu_h_here": embed_s_cpu / 3600,
                  "openai_tokens": calls * expl_tokens, "openai_cost_usd": calls * expl_tokens / 1e6 * args.embed_price},
    }
    out = RESULTS / "scale.json"
    out.write_text(json.dumps(plan, indent=1))
    c, e = plan["collection"], plan["explain"]
    print(f"Llama-2-70B: {n_neurons:,} neurons, {p70 / 1e9:.2f}B non-embedding params, "
          f"{flops_tok_70:.3g} FLOP/token, {weights_gb:.0f} GB bf16")
    print(f"measured here: SmolLM2 collect {smol_collect_tps:.0f} tok/s ({cpu_flops / 1e9:.0f} GFLOP/s effective), "
          f"collect/forward {overhead:.2f}x; 70B on this CPU: {cpu_tps_70:.2f} tok/s")
    print(f"prompts: explain {p_in} tokens (few-shot), {prompts['explain_prompt_tokens_zero_shot']} zero-shot; "
          f"judge {prompts['judge_prompt_tokens']}")
    print(f"shard state {merge['state_gb_80_layers']:.1f} GB, merge {merge['merge_s_80_layers']:.1f} s (80 layers)")
    print(f"collection: {gpus_per_replica} GPUs/replica ({need_gb:.0f} GB), {replicas} replicas on {args.gpus} GPUs, "
          f"{gpu_tps:.0f} tok/s/replica at MFU {args.mfu}: {args.probe_tokens / 1e6:.0f}M tokens in "
          f"{c['collect_h']:.2f} h; shards of {shard_windows} windows: {n_shards} shards, "
          f"{c['shards_per_actor']:.1f} per actor")
    print(f"explain: {calls:,} calls, {tok_in / 1e9:.2f}B in + {tok_out / 1e6:.0f}M out tokens: ${cost:,.0f} "
          f"(${cost * args.batch_discount:,.0f} Batch API, {e['batches']} batches); served "
          f"{args.served_params / 1e9:.0f}B model: {e['served_gpu_h']:.1f} GPU-h; client {client_core_s / 3600:.1f} core-h")
    print(f"embed: {embed_s_cpu / 3600:.1f} h on this CPU; OpenAI ${plan['embed']['openai_cost_usd']:.2f} -> {out}")


if __name__ == "__main__":
    main()
