"""Cost of the offline explanation kinds on every SmolLM2-135M neuron, against one forward pass.

Builds the demo's probe corpus exactly as the sweep does (stdlib source vs pydoc prose, split by document,
``select_windows`` windows of ``n_ctx`` tokens per side), then times in one process:

- the baseline: one forward pass of the model over that probe corpus (batches of ``--batch-size``);
- collecting the activation records the input-centric explainer reads (the pipeline's defaults,
  ``CollectionConfig``; for reference);
- VocabProj (output-centric evidence) for all 46,080 neurons: weights only;
- the offline input-centric explainer for all 46,080 neurons (reading each neuron's records included);
- the offline output-centric and combined explainers for all neurons.

Each is reported in seconds and as a ratio to the forward pass. Writes benchmarks/results/explain_kinds.json.

    python benchmarks/explain_kinds.py [--select-windows 32] [--n-ctx 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from snip_lens import models as M
from snip_lens.collect import collect
from snip_lens.config import CollectionConfig
from snip_lens.corpus import TokenWindows, make_windows
from snip_lens.explain import ExplainConfig, explain
from snip_lens.explain.runner import output_projection
from snip_lens.sweep import DataConfig, load_side_texts, split_documents


def probe_windows(model, data: DataConfig) -> TokenWindows:
    """The sweep's records corpus: forget and retain selection windows together."""
    f_sel, _ = split_documents(load_side_texts(data.forget, data), data.eval_fraction, data.seed)
    r_sel, _ = split_documents(load_side_texts(data.retain, data), data.eval_fraction, data.seed)
    fw = make_windows(model, f_sel, n_ctx=data.n_ctx, max_windows=data.select_windows, seed=data.seed, name="forget",
                      max_doc_tokens=data.max_doc_tokens)
    rw = make_windows(model, r_sel, n_ctx=data.n_ctx, max_windows=data.select_windows, seed=data.seed, name="retain",
                      max_doc_tokens=data.max_doc_tokens)
    return TokenWindows(torch.cat([fw.tokens, rw.tokens]), fw.documents + [len(f_sel) + i for i in rw.documents],
                        "records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--select-windows", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    model = M.load_model(args.model)
    n_neurons = M.n_layers(model) * M.d_mlp(model)
    probe = probe_windows(model, DataConfig(n_ctx=args.n_ctx, select_windows=args.select_windows))
    n_tok = probe.tokens.numel()

    with torch.no_grad():  # warm-up on one batch, then the baseline
        model(probe.tokens[: args.batch_size])
        t = time.perf_counter()
        for s in range(0, len(probe.tokens), args.batch_size):
            model(probe.tokens[s:s + args.batch_size])
        forward_s = time.perf_counter() - t
    print(f"baseline: one forward pass over the probe corpus ({len(probe.tokens)} x {args.n_ctx} = {n_tok} tokens): "
          f"{forward_s:.1f} s")

    t = time.perf_counter()
    col = CollectionConfig()  # the records SNIP's pipeline collects (64 top, 32 random windows per neuron)
    records = collect(model, probe, top_k=col.top_k_records, n_random=col.random_records, batch_size=args.batch_size,
                      progress=False)
    collect_s = time.perf_counter() - t

    cfg_out = ExplainConfig(explanations="output")
    t = time.perf_counter()
    projection = output_projection(model, cfg_out, records)
    vocabproj_s = time.perf_counter() - t

    t = time.perf_counter()
    inp = explain(records, ExplainConfig(explanations="input"), progress=False)
    input_s = time.perf_counter() - t

    t = time.perf_counter()
    out = explain(None, cfg_out, projection=projection, model=model, progress=False)
    output_s = time.perf_counter() - t

    t = time.perf_counter()
    both = explain(records, ExplainConfig(explanations="both"), projection=projection, progress=False)
    both_s = time.perf_counter() - t
    assert len(inp) == len(out) == len(both) == n_neurons

    def entry(seconds: float) -> dict:
        return {"seconds": round(seconds, 2), "ratio_to_forward_pass": round(seconds / forward_s, 3)}

    res = {
        "model": M.model_name(model), "n_neurons": n_neurons, "probe_tokens": n_tok,
        "records": {"top_k": col.top_k_records, "n_random": col.random_records},
        "baseline_forward_pass": {"seconds": round(forward_s, 2), "batch_size": args.batch_size},
        "collect_records": entry(collect_s),
        "vocabproj_all_neurons": entry(vocabproj_s),
        "offline_input_explainer_all_neurons": entry(input_s),
        "offline_output_explainer_all_neurons": entry(output_s),
        "offline_output_total_with_vocabproj": entry(vocabproj_s + output_s),
        "offline_both_explainer_all_neurons": entry(both_s),
        "n_ok": {"input": sum(e.ok for e in inp), "output": sum(e.ok for e in out), "both": sum(e.ok for e in both)},
        "examples": {k: [e.explanation for e in v[:: n_neurons // 4][:4]] for k, v in
                     (("input", inp), ("output", out), ("both", both))},
        "load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("collect_records", "vocabproj_all_neurons", "offline_input_explainer_all_neurons",
                 "offline_output_explainer_all_neurons", "offline_both_explainer_all_neurons"):
        print(f"{name:40s} {res[name]['seconds']:8.1f} s = {res[name]['ratio_to_forward_pass']:.3f} x forward pass")
    path = Path(__file__).parent / "results" / "explain_kinds.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
