"""CBT cloze scoring: shared context computed once with the KV cache vs a full forward per option.

On the real offline model (SmolLM2-135M), CBT-P style items (20 context sentences, 10 options) are built
from ``pydoc_data.topics`` prose. Both paths score the same tokens; the benchmark checks that their
predictions are identical and reports the time ratio (goal: the KV path takes >= 5x less time).
A third timing adds the neuron mask's cost: the same KV run with a hook zeroing 10% of one layer.
Writes benchmarks/results/cbt.json.

    python benchmarks/cbt.py [--items 10] [--kind P] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pydoc_data.topics
import torch

from snip_lens import NeuronMask, load_model
from snip_lens.evaluate import build_cloze_items, cbt_accuracy, cbt_scores
from snip_lens.models import encode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--kind", choices=["P", "V"], default="P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    items = build_cloze_items(texts, args.kind, n_items=args.items, seed=args.seed)
    model = load_model("smollm2-135m")
    n_tokens = [len(encode(model, " ".join(it.context))) for it in items]
    print(f"{len(items)} CBT-{args.kind} items, context {min(n_tokens)}-{max(n_tokens)} tokens "
          f"(mean {sum(n_tokens) / len(n_tokens):.0f}), {torch.get_num_threads()} threads")

    cbt_scores(model, items[:1])  # warm-up
    t0 = time.perf_counter()
    kv = cbt_accuracy(model, items, use_kv_cache=True, progress=True)
    t_kv = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = cbt_accuracy(model, items, use_kv_cache=False, progress=True)
    t_naive = time.perf_counter() - t0
    mask = NeuronMask.from_neurons(model, [(15, i) for i in range(0, model.cfg.d_mlp, 10)])
    t0 = time.perf_counter()
    kv_masked = cbt_accuracy(model, items, use_kv_cache=True, mask=mask)
    t_kv_masked = time.perf_counter() - t0

    same = kv["predictions"] == naive["predictions"]
    ratio = t_naive / t_kv
    print(f"naive (full forward per option): {t_naive:.1f} s ({t_naive / len(items):.2f} s/item)")
    print(f"KV cache (context once):         {t_kv:.1f} s ({t_kv / len(items):.2f} s/item)")
    print(f"KV cache with a mask:            {t_kv_masked:.1f} s")
    print(f"speed-up: {ratio:.1f}x (goal >= 5x); predictions identical: {same}; "
          f"accuracy {kv['accuracy']:.2f} (masked {kv_masked['accuracy']:.2f})")
    out = Path(__file__).parent / "results" / "cbt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "smollm2-135m", "kind": args.kind, "n_items": len(items), "seed": args.seed,
        "context_tokens_mean": sum(n_tokens) / len(n_tokens), "threads": torch.get_num_threads(),
        "seconds_naive": t_naive, "seconds_kv": t_kv, "seconds_kv_masked": t_kv_masked,
        "speedup": ratio, "goal_speedup": 5.0, "predictions_identical": same,
        "accuracy_kv": kv["accuracy"], "accuracy_naive": naive["accuracy"],
        "accuracy_kv_masked": kv_masked["accuracy"],
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
