"""Local embedding throughput on the offline model's 46,080 neuron explanations (SNIP step 3).

The explanations are made by the heuristic explainer from synthetic activation records cut from real
text (CPython stdlib source and pydoc prose, tokenised by SmolLM2's tokenizer when its converted copy is
cached, else by the tiny test tokenizer): each neuron prefers one frequent token of one domain and peaks
on it in most of its top windows, as real neurons do, so the explanations have the form and, roughly, the
repetition of real ones.

Measured in one process on 2 CPU threads:
1. baseline: a plain batched run (fp32, batch 32, every text, no cache) on a random sample;
2. the same sample with batch 256; then with bfloat16 autocast (and its cosine to fp32);
3. the pipeline as used: ``CachedEmbedder(LocalEmbedder())`` on all 46,080 texts (de-duplication,
   length-sorted batches of 256, bf16 weights where supported; ``--autocast``: bf16 autocast), cold
   cache; then the rerun from the cache.
Goal: >= 300 texts/s end to end. Writes benchmarks/results/embed.json.

    python benchmarks/embed.py [--sample 2000] [--n 46080] [--autocast]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from snip_lens.embed import CachedEmbedder, LocalEmbedder, bf16_supported
from snip_lens.explain import HeuristicExplainer
from snip_lens.types import ActivationRecord, NeuronId, NeuronRecords


def _tokenizer():
    from snip_lens.models import cache_dir

    d = cache_dir() / "models" / "smollm2-135m"
    if (d / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d)), "smollm2-135m"
    from snip_lens.testing import tiny_tokenizer

    return tiny_tokenizer(), "tiny-bpe"


def _token_streams(tok) -> dict[str, list[str]]:
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    code = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    out = {}
    for name, text in (("code", code[:600_000]), ("prose", prose[:600_000])):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out[name] = tok.convert_ids_to_tokens(ids)
    return out


def make_explanations(n: int, *, seed: int = 0, top: int = 10, width: int = 25) -> tuple[list[str], str]:
    tok, tok_name = _tokenizer()
    streams = _token_streams(tok)
    rng = random.Random(seed)
    positions = {d: {} for d in streams}
    for d, toks in streams.items():
        for i, t in enumerate(toks):
            positions[d].setdefault(t, []).append(i)
    vocab = {d: [t for t, _ in Counter(toks).most_common(3000)] for d, toks in streams.items()}
    explainer = HeuristicExplainer()
    texts = []
    for k in range(n):
        d = "code" if rng.random() < 0.5 else "prose"
        toks = streams[d]
        # Zipf-like preference for frequent tokens, like real neurons
        pref = vocab[d][min(int(rng.paretovariate(0.7)) - 1, len(vocab[d]) - 1)]
        recs = []
        for _ in range(top):
            if rng.random() < 0.7:
                p = rng.choice(positions[d][pref])
            else:
                p = rng.randrange(width, len(toks) - width)
            lo = max(0, p - width // 2)
            window = toks[lo:lo + width]
            acts = [0.0] * len(window)
            acts[p - lo] = 5.0 + rng.random()
            recs.append(ActivationRecord(window, acts))
        e = explainer.explain_one(NeuronRecords(NeuronId(k // 1536, k % 1536), recs))
        texts.append(e.explanation)
    return texts, tok_name


def rate(fn, texts) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    v = fn(texts)
    return len(texts) / (time.perf_counter() - t), v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=46_080)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", action="store_true", help="pipeline with bf16 autocast instead of bf16 weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    texts, tok_name = make_explanations(args.n)
    n_unique = len(set(texts))
    print(f"{len(texts)} explanations ({n_unique} distinct, tokenizer {tok_name}) made in "
          f"{time.perf_counter() - t:.1f}s; e.g. {texts[0]!r}")
    sample = random.Random(1).sample(sorted(set(texts)), min(args.sample, n_unique))

    base = LocalEmbedder(precision="fp32", batch_size=32, max_seq_length=None, progress=False)
    r_base, v_base = rate(base.embed, sample)
    print(f"baseline fp32 batch 32:        {r_base:7.1f} texts/s  (46,080 texts: {args.n / r_base / 60:.1f} min)")
    big = LocalEmbedder(precision="fp32", batch_size=256, progress=False)
    r_big, _ = rate(big.embed, sample)
    print(f"fp32 batch 256:                {r_big:7.1f} texts/s  ({r_big / r_base:.2f}x)")
    results = {"load_average_1min": os.getloadavg()[0], "n_texts": len(texts), "n_distinct": n_unique, "tokenizer": tok_name, "threads": args.threads,
               "sample": len(sample), "baseline_fp32_b32_per_s": r_base, "fp32_b256_per_s": r_big,
               "bf16_supported": bf16_supported()}
    if bf16_supported():
        fast = LocalEmbedder(precision="bf16", batch_size=256, progress=False)
        r_bf, v_bf = rate(fast.embed, sample)
        cos = (v_bf * v_base).sum(1)
        print(f"bf16 batch 256:                {r_bf:7.1f} texts/s  ({r_bf / r_base:.2f}x), cosine to fp32 "
              f"min {cos.min():.5f} mean {cos.mean():.5f}")
        results.update(bf16_b256_per_s=r_bf, bf16_cos_min=float(cos.min()), bf16_cos_mean=float(cos.mean()))
        full = LocalEmbedder(precision="bf16-weights", batch_size=256, progress=False)
        r_full, v_full = rate(full.embed, sample)
        cos = (v_full * v_base).sum(1)
        print(f"bf16 weights batch 256:        {r_full:7.1f} texts/s  ({r_full / r_base:.2f}x), cosine to fp32 "
              f"min {cos.min():.5f} mean {cos.mean():.5f}")
        results.update(bf16_weights_b256_per_s=r_full, bf16_weights_cos_min=float(cos.min()),
                       bf16_weights_cos_mean=float(cos.mean()))

    precision = "bf16" if args.autocast else "auto"
    with tempfile.TemporaryDirectory() as d:
        emb = CachedEmbedder(LocalEmbedder(precision=precision, progress=False), d)
        r_cold, v = rate(emb.embed, texts)
        print(f"pipeline, cold cache, all {len(texts)}: {r_cold:7.1f} texts/s ({len(texts) / r_cold:.1f}s, "
              f"{r_cold / r_base:.1f}x baseline)  [{emb.inner.name}]")
        emb2 = CachedEmbedder(LocalEmbedder(precision=precision, progress=False), d)
        r_warm, v2 = rate(emb2.embed, texts)
        assert np.array_equal(v, v2)
        print(f"pipeline, warm cache (new process state): {r_warm:9.0f} texts/s ({len(texts) / r_warm:.2f}s)")
        n_files = len(list(emb.root.glob("*")))
    results.update(pipeline_cold_per_s=r_cold, pipeline_cold_s=len(texts) / r_cold, pipeline_warm_per_s=r_warm,
                   cache_files=n_files, speedup_vs_baseline=r_cold / r_base, goal_per_s=300,
                   goal_met=r_cold >= 300)
    out = Path(__file__).parent / "results" / "embed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (absolute rates scale with it)")
    print(f"speedup {r_cold / r_base:.1f}x over the plain batched run; goal >= 300/s: "
          f"{'met' if r_cold >= 300 else 'NOT met'} -> {out}")


if __name__ == "__main__":
    main()
