"""Cost of a NeuronMask: masked vs unmasked forward time on the offline model (SmolLM2-135M), as a ratio.

The mask touches 10% of the neurons of EVERY layer (30 hooks, the worst case for hook overhead). Masked
and unmasked runs are interleaved so drift in machine speed hits all conditions alike. Torch runs on one
thread (--threads) so that this process's CPU time measures work done, not spin-waiting; on a shared
machine the wall clock also counts time spent waiting for other processes. Ratios are given from the
median CPU time (headline), the median wall time and the best (least disturbed) wall time. As a check
that does not depend on machine load, the hook functions alone are also timed on activations of the
same shape (one call per layer) and their cost is given as a fraction of the unmasked forward.
Goal: ratio <= 1.03.
Writes benchmarks/results/mask.json.

    python benchmarks/mask.py [--batch 2] [--seq 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from snip_lens.mask import NeuronMask
from snip_lens.models import load_model


def _batch(model, batch: int, seq: int) -> torch.Tensor:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)  # (batch, seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokens = _batch(model, args.batch, args.seq)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    k = int(args.fraction * d_mlp)
    neurons = [(l, int(i)) for l in range(n_layers) for i in torch.randperm(d_mlp)[:k]]
    masks = {
        "zero": NeuronMask.from_neurons(model, neurons),
        "scale": NeuronMask.from_neurons(model, neurons, mode="scale", values=0.5),
        "mean": NeuronMask.from_neurons(model, neurons, mode="mean", values=torch.randn(len(neurons))),
    }

    def timed(mask: NeuronMask | None) -> tuple[float, float]:
        with torch.no_grad(), (mask.applied(model) if mask is not None else contextlib.nullcontext()):
            wall, cpu = time.perf_counter(), time.process_time()
            model(tokens)
            return time.perf_counter() - wall, time.process_time() - cpu

    timed(None)  # warm-up
    names = ["none", *masks]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(args.repeats), desc="interleaved runs"):
        for name in names:
            w, c = timed(masks.get(name))
            wall[name].append(w)
            cpu[name].append(c)
    med = statistics.median
    # The hooks alone: one call per layer on a (batch, pos, d_mlp) activation, best of 20 rounds.
    act = torch.randn(*tokens.shape, d_mlp)
    hook_cpu = {}
    for m, mask in masks.items():
        fns = [mask.hook_fn(layer) for layer in mask.layers]
        rounds = []
        for _ in range(20):
            c = time.process_time()
            for fn in fns:
                fn(act, None)
            rounds.append(time.process_time() - c)
        hook_cpu[m] = min(rounds)
    result = {
        "model": "smollm2-135m",
        "tokens": list(tokens.shape),
        "masked_neurons": len(neurons),
        "hooks": n_layers,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        **{f"{n}_cpu_s": med(cpu[n]) for n in names},
        **{f"{n}_wall_s": med(wall[n]) for n in names},
        **{f"ratio_{m}": med(cpu[m]) / med(cpu["none"]) for m in masks},
        **{f"ratio_{m}_wall_median": med(wall[m]) / med(wall["none"]) for m in masks},
        **{f"ratio_{m}_wall_best": min(wall[m]) / min(wall["none"]) for m in masks},
        **{f"hooks_only_{m}_cpu_s": hook_cpu[m] for m in masks},
        **{f"ratio_{m}_hooks_only": 1 + hook_cpu[m] / med(cpu["none"]) for m in masks},
        "goal": "ratio <= 1.03",
    }
    print(f"SmolLM2-135M forward {tuple(tokens.shape)}, {len(neurons)} neurons masked on {n_layers} layers, "
          f"{args.repeats} interleaved runs, load average {result['load_average_1min']:.1f}")
    print(f"  {'':14}{'cpu s':>8}{'wall s':>8}  {'ratio cpu':>9}{'wall med':>9}{'wall best':>10}"
          f"{'hooks only':>11}")
    print(f"  {'unmasked':14}{med(cpu['none']):8.3f}{med(wall['none']):8.3f}")
    for m in masks:
        print(f"  {'masked ' + m:14}{med(cpu[m]):8.3f}{med(wall[m]):8.3f}  {result[f'ratio_{m}']:9.4f}"
              f"{result[f'ratio_{m}_wall_median']:9.4f}{result[f'ratio_{m}_wall_best']:10.4f}"
              f"{result[f'ratio_{m}_hooks_only']:11.4f}")
    out = Path(__file__).parent / "results" / "mask.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
