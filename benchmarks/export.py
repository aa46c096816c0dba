"""Compacted vs zeroed export of REAL top-k masks: parameters and MLP (and whole-model) time on SmolLM2-135M.

The masks are the ones a sweep makes: the activation method's scores (Pochinkov & Schoots: mean |act| on
forget / on retain, collected here on stdlib code vs pydoc prose, as the demo does; or ``--scores`` from a
finished run, e.g. ``snip_demo/scores/hybrid.safetensors``), top k = ``--k`` of all neurons, selected

- ``global``: the k best overall (uneven across layers, as every sweep mask is), and
- ``per-layer``: k/L best in each of the L layers (``--select per-layer``).

Each mask is exported ``compact=False`` (weights zeroed, the baseline) and ``compact=True``, and reloaded with
plain transformers. The MLPs of all 30 layers are timed on the same hidden states, interleaved, on one torch
thread, by this process's CPU time (robust on a shared machine) and wall clock; ratio = compact / zeroed of
the same run. The report's count of neurons that could not be removed is printed and stored. Writes
benchmarks/results/export.json.

    python benchmarks/export.py [--k 4%] [--scores FILE] [--windows 16] [--repeats 7]
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
from snip_lens.models import load_model
from snip_lens.select import mask_from_scores


def _tokens(model, batch: int, seq: int) -> torch.Tensor:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)  # (batch, seq)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _activation_scores(bridge, windows: int):
    """The sweep's activation scores: stdlib code (forget) vs pydoc prose (retain), ``windows`` x 128 tokens each."""
    from snip_lens.collect import collect
    from snip_lens.corpus import load_corpus
    from snip_lens.select import activation_scores

    corpora = {name: load_corpus(bridge, src, n_ctx=128, max_windows=windows, seed=0, name=name, max_doc_tokens=512)
               for name, src in (("forget", "code"), ("retain", "prose"))}
    records = collect(bridge, corpora, top_k=1, n_random=0, batch_size=8, progress=True)
    return activation_scores(records, model_name="smollm2-135m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="4%", help="neurons pruned: a count or a percentage of all 46,080")
    ap.add_argument("--scores", help="a saved NeuronScores file (default: activation scores computed here)")
    ap.add_argument("--windows", type=int, default=16, help="windows of 128 tokens per side for the scores")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bridge = load_model("smollm2-135m")
    n_layers, d_mlp = bridge.cfg.n_layers, bridge.cfg.d_mlp
    if args.scores:
        from snip_lens.score import NeuronScores

        scores = NeuronScores.load(args.scores, n_layers=n_layers, d_mlp=d_mlp)
        source = args.scores
    else:
        scores = _activation_scores(bridge, args.windows)
        source = f"activation scores, code vs prose, {args.windows} x 128 tokens per side"
    masks = {sel: mask_from_scores(bridge, scores, args.k, select=sel) for sel in ("global", "per-layer")}
    tokens = _tokens(bridge, args.batch, args.seq)
    masked_logits = {}
    for sel, mask in masks.items():
        with torch.no_grad(), mask.applied(bridge):
            masked_logits[sel] = bridge(tokens)

    names = [("zeroed", "global", False), ("compact", "global", True), ("compact", "per-layer", True)]
    with tempfile.TemporaryDirectory(prefix="snip-export-bench-") as tmp:
        reports, models, export_s = {}, {}, {}
        for kind, sel, compact in names:
            name = f"{kind}_{sel}"
            t = time.perf_counter()
            reports[name] = export_pruned(bridge, masks[sel], Path(tmp) / name, compact=compact)
            export_s[name] = time.perf_counter() - t
            models[name] = AutoModelForCausalLM.from_pretrained(Path(tmp) / name).eval()
        del bridge

    with torch.no_grad():
        rel = {name: ((m(tokens).logits - masked_logits[name.split("_", 1)[1]]).norm()
                      / masked_logits[name.split("_", 1)[1]].norm()).item() for name, m in models.items()}
        hidden = models["zeroed_global"].model.embed_tokens(tokens)  # (batch, seq, d_model)
        hidden = hidden / hidden.norm(dim=-1, keepdim=True) * hidden.shape[-1] ** 0.5
        mlp_out = {name: [layer.mlp(hidden) for layer in m.model.layers] for name, m in models.items()}
    mlp_diff = max((a - b).abs().max().item() for a, b in zip(mlp_out["zeroed_global"], mlp_out["compact_global"]))

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
    per_layer_counts = {sel: [sum(n.layer == layer for n in mask.neurons) for layer in range(n_layers)]
                        for sel, mask in masks.items()}
    result = {
        "model": "smollm2-135m",
        "scores": source,
        "k": args.k,
        "n_masked": len(masks["global"]),
        "pruned_per_layer": {sel: {"min": min(c), "max": max(c)} for sel, c in per_layer_counts.items()},
        "tokens": list(tokens.shape),
        "repeats": args.repeats,
        "load_average_1min": os.getloadavg()[0],
        "params_original": reports["zeroed_global"].params_before,
        "exports": {name: {"width": r.width, "params": models[name].num_parameters(),
                           "params_ratio": models[name].num_parameters() / r.params_before,
                           "n_removed": r.n_removed, "n_not_removed": r.n_not_removed, "notes": r.notes}
                    for name, r in reports.items()},
        "rel_err_vs_masked_bridge": rel,
        "max_abs_diff_mlp_zeroed_vs_compact": mlp_diff,
        "export_wall_s": export_s,
        "times": summary,
        "ratio_mlp_cpu": {name: summary[f"mlp_{name}"]["cpu_s"] / summary["mlp_zeroed_global"]["cpu_s"]
                          for name in models if name != "zeroed_global"},
        "ratio_mlp_wall": {name: summary[f"mlp_{name}"]["wall_s"] / summary["mlp_zeroed_global"]["wall_s"]
                           for name in models if name != "zeroed_global"},
        "ratio_model_cpu": {name: summary[f"model_{name}"]["cpu_s"] / summary["model_zeroed_global"]["cpu_s"]
                            for name in models if name != "zeroed_global"},
    }
    print(f"SmolLM2-135M, top {args.k} = {result['n_masked']} of {n_layers * d_mlp} neurons by {source}; tokens "
          f"{tuple(tokens.shape)}, load average {result['load_average_1min']:.1f}")
    for sel, c in per_layer_counts.items():
        print(f"  {sel:9} mask: {min(c)}..{max(c)} neurons pruned per layer")
    print(f"  parameters: original {result['params_original']:,}")
    for name, e in result["exports"].items():
        print(f"  {name:18} MLP width {e['width']:5}  parameters {e['params']:,} ({e['params_ratio']:.3f}x)  "
              f"removed {e['n_removed']} of {result['n_masked']}, {e['n_not_removed']} could not be removed")
        for note in e["notes"]:
            print(f"      note: {note}")
    print(f"  logits rel. error vs masked bridge: " + ", ".join(f"{n} {v:.2e}" for n, v in rel.items()))
    for name in models:
        z, c = summary["mlp_zeroed_global"], summary[f"mlp_{name}"]
        if name != "zeroed_global":
            print(f"  30 MLPs {name:18}: {c['cpu_s']:.3f} s cpu vs zeroed {z['cpu_s']:.3f} s  ->  ratio "
                  f"{result['ratio_mlp_cpu'][name]:.3f} cpu, {result['ratio_mlp_wall'][name]:.3f} wall; whole "
                  f"forward {result['ratio_model_cpu'][name]:.3f} cpu")
    out = Path(__file__).parent / "results" / "export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
