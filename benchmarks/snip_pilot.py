"""Pilot that fixed SNIP's offline default: which explanation kind (input, output, both) on the demo scenario.

Run once, on a *pilot split* of the demo scenario only (stdlib source vs pydoc prose, documents split with
``--seed 1``, while the benchmark and the demo use seed 0), before any other scenario is looked at. One
collection, one set of offline concepts, then per explanation kind: offline explanations, MiniLM
embeddings, SNIP scores, the top-k mask, held-out forget/retain top-1. To stay within a few minutes of
CPU, SNIP explains and scores one random share of the neurons (``--sample``, the same neurons for every
kind) and prunes its top k: a comparison between kinds, not the full method's figure. Random pruning (same k) is the
baseline measured in the same run. Writes benchmarks/results/snip_pilot.json.

    python benchmarks/snip_pilot.py [--k 2%] [--seed 1]
    python benchmarks/snip_pilot.py --quality --kinds input,both --out snip_pilot_quality.json
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
from snip_lens.concepts import extract_concepts
from snip_lens.corpus import TokenWindows, make_windows
from snip_lens.embed import get_embedder
from snip_lens.evaluate import lm_metrics
from snip_lens.explain import ExplainConfig, explain
from snip_lens.explain.runner import output_projection
from snip_lens.score import score_neurons
from snip_lens.select import activation_scores, mask_from_scores, parse_k, random_scores
from snip_lens.sweep import DataConfig, load_side_texts, split_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", default="2%")
    ap.add_argument("--seed", type=int, default=1, help="document split of the pilot (the benchmark uses 0)")
    ap.add_argument("--kinds", default="input,output,both")
    ap.add_argument("--sample", type=float, default=0.25,
                    help="share of neurons explained and scored (the same random sample for every kind; the "
                         "MiniLM embedding of 46k explanations per kind costs ~12 min on 2 shared cores)")
    ap.add_argument("--quality", action="store_true",
                    help="also each kind weighted by the embedding quality score (scored for the top 2k)")
    ap.add_argument("--out", default="snip_pilot.json", help="file name under benchmarks/results/")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "snip_lens" / "pilot-embed"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = M.load_model("smollm2-135m")
    n_layers, d_mlp = M.n_layers(model), M.d_mlp(model)
    k = parse_k(args.k, n_layers * d_mlp)
    d = DataConfig(seed=args.seed)
    f_sel, f_eval = split_documents(load_side_texts(d.forget, d), d.eval_fraction, d.seed)
    r_sel, r_eval = split_documents(load_side_texts(d.retain, d), d.eval_fraction, d.seed)

    def win(texts, n, seed, name):
        return make_windows(model, texts, n_ctx=d.n_ctx, max_windows=n, seed=seed, name=name,
                            max_doc_tokens=d.max_doc_tokens)

    fs, rs = win(f_sel, d.select_windows, d.seed, "forget"), win(r_sel, d.select_windows, d.seed, "retain")
    fe, re_ = win(f_eval, d.eval_windows, d.seed + 1, "fe"), win(r_eval, d.eval_windows, d.seed + 1, "re")
    probe = TokenWindows(torch.cat([fs.tokens, rs.tokens]), fs.documents + [len(f_sel) + i for i in rs.documents],
                         "records")
    records = collect(model, {"records": probe, "forget": fs, "retain": rs}, top_k=20, batch_size=8, progress=False)
    concepts = extract_concepts(f_sel, reference_texts=r_sel, seed=d.seed)
    embedder = get_embedder("local", cache_dir=args.cache, progress=False)
    projection = output_projection(model, ExplainConfig(explanations="output"), records)

    def evaluate(mask) -> dict:
        return {side: lm_metrics(model, toks, batch_size=8, mask=mask)["top1"]
                for side, toks in (("forget", fe.tokens), ("retain", re_.tokens))}

    base = evaluate(None)
    runs = {}
    rnd = evaluate(mask_from_scores(model, random_scores(n_layers, d_mlp, seed=0), k))
    runs["random"] = rnd
    runs["activation"] = evaluate(mask_from_scores(model, activation_scores(records), k))
    import random

    from snip_lens.types import NeuronId

    everyone = [NeuronId(lay, i) for lay in range(n_layers) for i in range(d_mlp)]
    sample = sorted(random.Random(0).sample(everyone, round(args.sample * len(everyone))))
    for kind in args.kinds.split(","):
        expl = explain(records, ExplainConfig(explanations=kind), projection=projection, model=model,
                       neurons=sample, progress=False)
        s = score_neurons(expl, concepts, embedder, n_layers=n_layers, d_mlp=d_mlp)
        if not args.quality:
            runs[f"snip-{kind}"] = evaluate(mask_from_scores(model, s, k))
            print(kind, runs[f"snip-{kind}"], flush=True)
            continue
        from snip_lens.quality import EmbeddingScorer, score_explanations

        candidates = set(s.top_k(2 * k))
        score_explanations([e for e in expl if e.neuron in candidates], records, EmbeddingScorer(embedder))
        w = score_neurons(expl, concepts, embedder, n_layers=n_layers, d_mlp=d_mlp, quality="embedding")
        runs[f"snip-{kind}+quality"] = evaluate(mask_from_scores(model, w, k))
        print(kind, "+quality", runs[f"snip-{kind}+quality"], flush=True)
    table = {}
    for name, r in runs.items():
        fd, rd = base["forget"] - r["forget"], base["retain"] - r["retain"]
        table[name] = {"forget_top1": round(r["forget"], 4), "retain_top1": round(r["retain"], 4),
                       "forget_drop": round(fd, 4), "retain_drop": round(rd, 4),
                       "forget_drop_vs_random": round(fd / (base["forget"] - rnd["forget"]), 2)
                       if base["forget"] != rnd["forget"] else None}
    res = {"scenario": "demo (stdlib code vs pydoc prose), pilot split", "seed": args.seed, "k": k,
           "snip_neuron_sample": args.sample,
           "k_spec": args.k, "baseline": {s: round(v, 4) for s, v in base.items()}, "runs": table,
           "concepts": concepts.concepts, "seconds": round(time.perf_counter() - t0, 1),
           "load_average_1min": round(os.getloadavg()[0], 2)}
    for name, r in table.items():
        print(f"{name:14s} forget drop {r['forget_drop']:+.3f} ({r['forget_drop_vs_random']}x random) "
              f"retain drop {r['retain_drop']:+.3f}")
    path = Path(__file__).parent / "results" / args.out
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
