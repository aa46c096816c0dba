"""Forget/retain metrics for several masks: residual prefix reused below the lowest pruned layer vs full forwards.

On the real offline model (SmolLM2-135M, 30 layers), windows of ``pydoc_data.topics`` prose are evaluated
under several random masks whose neurons all lie in layers >= ``--layer``. The baseline runs the full
model per mask; the reuse path runs ``prefix_cache`` once and then only blocks ``--layer..29`` per mask.
Checks the metrics agree and reports the time ratio. Writes benchmarks/results/prefix.json.

    python benchmarks/prefix.py [--layer 15] [--masks 3] [--windows 8] [--n-ctx 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import pydoc_data.topics
import torch

from snip_lens import load_model
from snip_lens.evaluate import lm_metrics, prefix_cache
from snip_lens.mask import NeuronMask
from snip_lens.models import encode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--masks", type=int, default=3)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m")
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = encode(model, text)[: args.windows * args.n_ctx]
    tokens = torch.tensor(ids).reshape(args.windows, args.n_ctx)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    rng = random.Random(0)
    masks = []
    for _ in range(args.masks):  # 1% of all neurons, all at or above --layer, the lowest exactly at it
        picks = {(args.layer, rng.randrange(d_mlp))}
        while len(picks) < n_layers * d_mlp // 100:
            picks.add((rng.randrange(args.layer, n_layers), rng.randrange(d_mlp)))
        masks.append(NeuronMask.from_neurons(model, sorted(picks)))

    lm_metrics(model, tokens[:1])  # warm-up
    t0 = time.perf_counter()
    full = [lm_metrics(model, tokens, mask=m) for m in masks]
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = prefix_cache(model, tokens, args.layer)
    t_prefix = time.perf_counter() - t0
    t0 = time.perf_counter()
    reused = [lm_metrics(model, tokens, mask=m, start_cache=cache) for m in masks]
    t_reused = time.perf_counter() - t0

    max_dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(full, reused))
    same_acc = all(a["top1"] == b["top1"] and a["top10"] == b["top10"] for a, b in zip(full, reused))
    per_mask_ratio = (t_full / len(masks)) / (t_reused / len(masks))
    total_ratio = t_full / (t_prefix + t_reused)
    print(f"{args.windows}x{args.n_ctx} tokens, {len(masks)} masks with lowest layer {args.layer} of {n_layers}, "
          f"{torch.get_num_threads()} threads")
    print(f"full forward per mask:  {t_full / len(masks):.2f} s")
    print(f"prefix once:            {t_prefix:.2f} s; then per mask {t_reused / len(masks):.2f} s")
    print(f"speed-up per mask: {per_mask_ratio:.2f}x; including the prefix: {total_ratio:.2f}x; "
          f"max |loss difference| {max_dloss:.2e}; accuracies identical: {same_acc}")
    out = Path(__file__).parent / "results" / "prefix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "smollm2-135m", "windows": args.windows, "n_ctx": args.n_ctx, "layer": args.layer,
        "n_masks": len(masks), "threads": torch.get_num_threads(), "seconds_full_per_mask": t_full / len(masks),
        "seconds_prefix": t_prefix, "seconds_reused_per_mask": t_reused / len(masks),
        "speedup_per_mask": per_mask_ratio, "speedup_including_prefix": total_ratio,
        "max_loss_difference": max_dloss, "accuracies_identical": same_acc,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
