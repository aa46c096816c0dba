"""SNIP scoring and neuron search at scale: 2.3M neuron vectors (Llama-2-70B's 80 x 28,672 MLP neurons).

Random unit vectors (width 384, the local MiniLM's) stand in for embedded explanations and concepts.

1. Scoring: max cosine of every neuron against 100 concepts. FAISS path: :func:`snip_lens.score.max_cosine`
   (``IndexFlatIP`` over the concepts, k=1 per neuron). Baseline: the same chunks through numpy
   (``neurons @ concepts.T``, then max/argmax). Both see the same float32 arrays in the same process; the
   results are checked equal. Goal: FAISS < 5 s per million neurons.
2. Search (``snip search``, :class:`snip_lens.score.NeuronIndex`): build an index over all neuron vectors
   with :func:`snip_lens.score.build_faiss_index` (flat, HNSW, IVF), then answer ``--queries`` queries for
   their 10 nearest neurons. Baseline: the exact flat index in the same run; HNSW and IVF report build
   and query time as ratios to it, and recall@10 against its exact answers. The indexes are built one
   after another and freed (2.3M x 384 float32 is 3.5 GB; each index holds its own copy).

Writes benchmarks/results/score.json.

    python benchmarks/score.py [--n 2300000] [--concepts 100] [--dim 384] [--kinds flat,hnsw,ivf]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import gc

import numpy as np
import psutil
import torch

from snip_lens.embed import normalize_rows
from snip_lens.score import build_faiss_index, max_cosine


def numpy_max_cosine(q: np.ndarray, c: np.ndarray, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty(len(q), dtype=np.float32)
    idx = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk] @ c.T  # (chunk, n_concepts)
        idx[s:s + chunk] = block.argmax(1)
        sims[s:s + chunk] = block[np.arange(len(block)), idx[s:s + chunk]]
    return sims, idx


def random_unit_rows(n: int, dim: int, seed: int, chunk: int = 262_144) -> np.ndarray:
    """``n`` random unit vectors, float32, made in chunks so no float64 or second full copy exists."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + len(block)] = block
    return out


def bench_index(kind: str, vecs: np.ndarray, queries: np.ndarray, k: int, exact: np.ndarray | None) -> dict:
    """Build one index over ``vecs``, search ``queries`` (batched, then one by one); recall@k vs ``exact``."""
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    index, _ = build_faiss_index(vecs, kind)
    build_s = time.perf_counter() - t
    rss1 = proc.memory_info().rss
    t = time.perf_counter()
    _, ids = index.search(queries, k)
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for q in queries[: min(len(queries), 20)]:
        index.search(q[None], k)
    single_s = (time.perf_counter() - t) / min(len(queries), 20)
    recall = None
    if exact is not None:
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), exact.tolist())]))
    row = {"kind": kind, "build_s": build_s, "batch_query_s": batch_s, "queries": len(queries), "k": k,
           "per_query_batched_ms": 1e3 * batch_s / len(queries), "single_query_ms": 1e3 * single_s,
           "index_rss_mb": (rss1 - rss0) / 2**20, f"recall_at_{k}": recall}
    del index
    gc.collect()
    return row | {"ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_300_000)
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default="flat,hnsw,ivf", help="indexes to build for the search part ('' for none)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads for the search part")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import faiss

    faiss_threads = faiss.omp_get_max_threads()
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    q = random_unit_rows(args.n, args.dim, seed=0)
    c = normalize_rows(rng.standard_normal((args.concepts, args.dim), dtype=np.float32))

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_default, (s_f, i_f) = best(lambda: max_cosine(q, c))
    t_one, _ = best(lambda: max_cosine(q, c, threads=1))
    t_faiss = min(t_default, t_one)
    t_np, (s_n, i_n) = best(lambda: numpy_max_cosine(q, c))
    max_diff = float(np.abs(s_f - s_n).max())
    agree = float((i_f == i_n).mean())
    ratio = t_np / t_faiss
    print(f"{args.n:,} neurons x {args.concepts} concepts, dim {args.dim}, best of {args.repeats} "
          f"(load average {load:.1f} on {os.cpu_count()} CPUs):")
    print(f"  FAISS IndexFlatIP k=1: {t_default:6.2f} s with {faiss_threads} OpenMP threads, {t_one:.2f} s with 1 "
          f"({args.n / t_faiss / 1e6:.2f} M neurons/s at best)")
    print(f"  numpy matmul+argmax:   {t_np:6.2f} s")
    print(f"  numpy / FAISS = {ratio:.2f}x; max |score diff| {max_diff:.2e}; argmax agreement {agree:.6f}")
    goal = 5.0 * args.n / 1e6  # 5 s per million neurons
    print(f"  goal FAISS < {goal:.1f} s (5 s per million neurons): {'met' if t_faiss < goal else 'NOT met'}")
    search = []
    kinds = [x for x in args.kinds.split(",") if x]
    if kinds:
        faiss.omp_set_num_threads(args.threads)
        queries = random_unit_rows(args.queries, args.dim, seed=1)
        exact = None
        for kind in sorted(kinds, key=lambda x: x != "flat"):  # the exact baseline first
            t0 = time.perf_counter()
            row = bench_index(kind, q, queries, 10, exact)
            ids = row.pop("ids")
            if kind == "flat":
                exact = ids
            search.append(row)
            print(f"  search index {kind:5s}: build {row['build_s']:8.1f} s, {row['queries']} queries "
                  f"{row['batch_query_s']:.3f} s batched, {row['single_query_ms']:.2f} ms one at a time, "
                  f"+{row['index_rss_mb']:.0f} MB, recall@10 {row['recall_at_10']} "
                  f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
        base = next((r for r in search if r["kind"] == "flat"), None)
        if base is not None:
            for r in search:
                r["build_over_flat"] = r["build_s"] / max(base["build_s"], 1e-9)
                r["single_query_over_flat"] = r["single_query_ms"] / base["single_query_ms"]
                print(f"  {r['kind']:5s} / flat: build {r['build_over_flat']:.1f}x, one query "
                      f"{r['single_query_over_flat']:.3f}x")
    out = Path(__file__).parent / "results" / "score.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"search": {"n_neurons": args.n, "dim": args.dim, "faiss_threads": args.threads,
                                          "indexes": search},
                               "n_neurons": args.n, "n_concepts": args.concepts, "dim": args.dim,
                               "faiss_s": t_faiss, "faiss_default_threads_s": t_default,
                               "faiss_1_thread_s": t_one, "faiss_threads": faiss_threads, "load_average_1min": load,
                               "numpy_s": t_np, "numpy_over_faiss": ratio,
                               "max_abs_diff": max_diff, "argmax_agreement": agree, "goal_s": goal,
                               "goal_met": t_faiss < goal}, indent=1))


if __name__ == "__main__":
    main()
