"""Compacted vs zeroed export: parameter counts and MLP (and whole-model) forward time on SmolLM2-135M.

Half of every layer's neurons (random, seed 0) are pruned with a zero mask; the model is exported twice,
``compact=False`` (weights zeroed, 1536 neurons per MLP) and ``compact=True`` (768 neurons per MLP), and
both are reloaded with plain transformers. The MLPs of all 30 layers are timed on the same hidden states,
interleaved, on one torch thread, by this process's CPU time (robust on a shared machine) and wall clock;
ratio = compact / zeroed. Writes benchmarks/results/export.json.

    python benchmarks/export.py [--fraction 0.5] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from snip_lens.export import export_pruned
from snip_lens.mask import NeuronMask
from snip_lens.models import load_model


def _tokens(model, batch: int, seq: int) -> torch.Tensor:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)  # (batch, seq)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    bridge = load_model("smollm2-135m")
    n_layers, d_mlp = bridge.cfg.n_layers, bridge.cfg.d_mlp
    k = int(args.fraction * d_mlp)
    neurons = [(l, int(i)) for l in range(n_layers) for i in torch.randperm(d_mlp)[:k]]
    mask = NeuronMask.from_neurons(bridge, neurons)
    tokens = _tokens(bridge, args.batch, args.seq)
    with torch.no_grad(), mask.applied(bridge):
        masked_logits = bridge(tokens)

    with tempfile.TemporaryDirectory(prefix="snip-export-bench-") as tmp:
        reports, models, export_s = {}, {}, {}
        for name, compact in (("zeroed", False), ("compact", True)):
            t = time.perf_counter()
            reports[name] = export_pruned(bridge, mask, Path(tmp) / name, compact=compact)
            export_s[name] = time.perf_counter() - t
            models[name] = AutoModelForCausalLM.from_pretrained(Path(tmp) / name).eval()
        del bridge

    with torch.no_grad():
        logits = {name: m(tokens).logits for name, m in models.items()}
        hidden = models["zeroed"].model.embed_tokens(tokens)  # (batch, seq, d_model)
        hidden = hidden / hidden.norm(dim=-1, keepdim=True) * hidden.shape[-1] ** 0.5
        mlp_out = {name: [layer.mlp(hidden) for layer in m.model.layers] for name, m in models.items()}
    rel = {name: ((lg - masked_logits).norm() / masked_logits.norm()).item() for name, lg in logits.items()}
    mlp_diff = max((a - b).abs().max().item() for a, b in zip(mlp_out["zeroed"], mlp_out["compact"]))

    def run_mlps(m):
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp(hidden)

    def run_model(m):
        with torch.no_grad():
            m(tokens)

    times = {f"{what}_{name}": {"wall": [], "cpu": []} for what in ("mlp", "model") for name in models}
    for name in models:  # warm-up
        run_mlps(models[name])
    for _ in tqdm(range(args.repeats), desc="interleaved runs"):
        for name, m in models.items():
            for what, fn in (("mlp", run_mlps), ("model", run_model)):
                w, c = _timed(lambda: fn(m))
                times[f"{what}_{name}"]["wall"].append(w)
                times[f"{what}_{name}"]["cpu"].append(c)
    med = statistics.median
    summary = {key: {"cpu_s": med(v["cpu"]), "wall_s": med(v["wall"])} for key, v in times.items()}
    result = {
        "model": "smollm2-135m",
        "pruned_per_layer": k,
        "tokens": list(tokens.shape),
        "repeats": args.repeats,
        "load_average_1min": os.getloadavg()[0],
        "width_zeroed": reports["zeroed"].width,
        "width_compact": reports["compact"].width,
        "params_original": reports["zeroed"].params_before,
        "params_zeroed": models["zeroed"].num_parameters(),
        "params_compact": models["compact"].num_parameters(),
        "rel_err_vs_masked_bridge": rel,
        "max_abs_diff_mlp_zeroed_vs_compact": mlp_diff,
        "export_wall_s": export_s,
        "times": summary,
        "ratio_mlp_cpu": summary["mlp_compact"]["cpu_s"] / summary["mlp_zeroed"]["cpu_s"],
        "ratio_mlp_wall": summary["mlp_compact"]["wall_s"] / summary["mlp_zeroed"]["wall_s"],
        "ratio_model_cpu": summary["model_compact"]["cpu_s"] / summary["model_zeroed"]["cpu_s"],
        "ratio_model_wall": summary["model_compact"]["wall_s"] / summary["model_zeroed"]["wall_s"],
    }
    print(f"SmolLM2-135M, {k} of {d_mlp} neurons pruned in each of {n_layers} layers, tokens {tuple(tokens.shape)}, "
          f"load average {result['load_average_1min']:.1f}")
    print(f"  parameters: original {result['params_original']:,}  zeroed {result['params_zeroed']:,}  "
          f"compact {result['params_compact']:,} ({result['params_compact'] / result['params_original']:.3f}x)")
    print(f"  MLP width: {result['width_zeroed']} -> {result['width_compact']}")
    print(f"  logits rel. error vs masked bridge: zeroed {rel['zeroed']:.2e}, compact {rel['compact']:.2e}")
    for what in ("mlp", "model"):
        z, c = summary[f"{what}_zeroed"], summary[f"{what}_compact"]
        label = "30 MLPs " if what == "mlp" else "forward "
        print(f"  {label}: zeroed {z['cpu_s']:.3f} s cpu / {z['wall_s']:.3f} s wall, compact {c['cpu_s']:.3f} s cpu"
              f" / {c['wall_s']:.3f} s wall  ->  ratio {result[f'ratio_{what}_cpu']:.3f} cpu,"
              f" {result[f'ratio_{what}_wall']:.3f} wall")
    out = Path(__file__).parent / "results" / "export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
