"""SNIP scoring at scale: max cosine of 1M neuron vectors against 100 concepts, FAISS vs numpy.

Random unit vectors (width 384, the local MiniLM's) stand in for embedded explanations and concepts.
FAISS path: :func:`snip_lens.score.max_cosine` (``IndexFlatIP`` over the concepts, k=1 per neuron).
Baseline: the same chunks through numpy (``neurons @ concepts.T``, then max/argmax). Both see the same
float32 arrays in the same process; the results are checked equal. Goal: FAISS < 5 s.
Writes benchmarks/results/score.json.

    python benchmarks/score.py [--n 1000000] [--concepts 100] [--dim 384]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from snip_lens.embed import normalize_rows
from snip_lens.score import max_cosine


def numpy_max_cosine(q: np.ndarray, c: np.ndarray, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty(len(q), dtype=np.float32)
    idx = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk] @ c.T  # (chunk, n_concepts)
        idx[s:s + chunk] = block.argmax(1)
        sims[s:s + chunk] = block[np.arange(len(block)), idx[s:s + chunk]]
    return sims, idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import faiss

    faiss_threads = faiss.omp_get_max_threads()
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    q = normalize_rows(rng.standard_normal((args.n, args.dim), dtype=np.float32))
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
    print(f"  goal FAISS < 5 s: {'met' if t_faiss < 5 else 'NOT met'}")
    out = Path(__file__).parent / "results" / "score.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"n_neurons": args.n, "n_concepts": args.concepts, "dim": args.dim,
                               "faiss_s": t_faiss, "faiss_default_threads_s": t_default,
                               "faiss_1_thread_s": t_one, "faiss_threads": faiss_threads, "load_average_1min": load, "numpy_s": t_np, "numpy_over_faiss": ratio,
                               "max_abs_diff": max_diff, "argmax_agreement": agree, "goal_s": 5.0,
                               "goal_met": t_faiss < 5}, indent=1))


if __name__ == "__main__":
    main()
