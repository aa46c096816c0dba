"""Pilot that fixed SNIP's offline default: which explanation kind (input, output, both) and which match
(embedding: the paper's max cosine of sentence embeddings; evidence: the explanation's evidence tokens
weighted by the forget set's term log-odds) on the demo scenario.

Run on a *pilot split* of the demo scenario (stdlib source vs pydoc prose, documents split with ``--seed 1``,
while the benchmark and the demo use seed 0); the kind and the match were chosen this way before any other
scenario was looked at. One
collection, one set of offline concepts (with their term weights), then per explanation kind: offline
explanations of every neuron; the evidence match over all neurons; and, because embedding 46k explanations
per kind costs minutes, both matches over one random share of the neurons (``--sample``, the same neurons
for every kind; the top k of that share is pruned: a comparison between matches, not the full method's
figure). Random and activation pruning (same k; activation also restricted to the sample) are the
baselines measured in the same run. Writes benchmarks/results/snip_pilot.json.

    python benchmarks/snip_pilot.py [--ks 2%,4%] [--seed 1] [--sample 0.25]

``--terms word,token --no-embedding --out snip_pilot_terms.json`` compares the evidence match's term weights
on the same split, skipping the embedding match: word terms only (``concepts.terms``, the match before
token terms), and word plus model-token terms (``concepts.token_terms``,
:func:`snip_lens.concepts.token_terms`; each token weighs the larger of its two readings, the library's
default). ``--forget``/``--retain`` take any corpus the sweep reads, e.g. the German pilot:

    python benchmarks/snip_pilot.py --terms word,token --no-embedding --forget out/unlearning/german-vs-english/data/forget.jsonl --retain out/unlearning/german-vs-english/data/retain.jsonl --out snip_pilot_terms_german.json

(those files are written by ``benchmarks/unlearning.py``; the pilot splits them with seed 1, the benchmark
with seed 0).

``--records TOP,RANDOM`` sets the records collected per neuron (default: the library's). The results
``snip_pilot_records.json`` and ``snip_pilot_records_german.json`` measure the current default (peaks of
64 top windows and the activity over 32 random windows, ``InputEvidence.peaks`` and ``.active``) with
``--terms token --no-embedding``, and ``..._small.json`` the same readings on the records collected before
(``--records 20,5``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from snip_lens import models as M
from snip_lens.collect import collect
from snip_lens.concepts import extract_concepts
from snip_lens.config import CollectionConfig
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
    ap.add_argument("--ks", default="2%,4%")
    ap.add_argument("--seed", type=int, default=1, help="document split of the pilot (the benchmark uses 0)")
    ap.add_argument("--kinds", default="input,output,both")
    ap.add_argument("--sample", type=float, default=0.25,
                    help="share of neurons scored by both matches (embedding is the costly one)")
    ap.add_argument("--terms", default="word",
                    help="term weights of the evidence match, comma-separated: word (concepts.terms only), token "
                         "(word terms and the model's token terms, concepts.token_terms: the library's default)")
    ap.add_argument("--forget", help="forget corpus (default: the demo's, stdlib source)")
    ap.add_argument("--retain", help="retain corpus (default: the demo's, pydoc prose)")
    ap.add_argument("--no-embedding", action="store_true", help="skip the embedding match (and its sample runs)")
    ap.add_argument("--records", default=f"{CollectionConfig.top_k_records},{CollectionConfig.random_records}",
                    help="TOP,RANDOM records collected per neuron (default: the library's, CollectionConfig)")
    ap.add_argument("--out", default="snip_pilot.json", help="file name under benchmarks/results/")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "snip_lens" / "pilot-embed"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = M.load_model("smollm2-135m")
    n_layers, d_mlp = M.n_layers(model), M.d_mlp(model)
    ks = {spec: parse_k(spec, n_layers * d_mlp) for spec in args.ks.split(",")}
    d = DataConfig(seed=args.seed, **{side: getattr(args, side) for side in ("forget", "retain")
                                      if getattr(args, side)})
    f_sel, f_eval = split_documents(load_side_texts(d.forget, d), d.eval_fraction, d.seed)
    r_sel, r_eval = split_documents(load_side_texts(d.retain, d), d.eval_fraction, d.seed)

    def win(texts, n, seed, name):
        return make_windows(model, texts, n_ctx=d.n_ctx, max_windows=n, seed=seed, name=name,
                            max_doc_tokens=d.max_doc_tokens)

    fs, rs = win(f_sel, d.select_windows, d.seed, "forget"), win(r_sel, d.select_windows, d.seed, "retain")
    fe, re_ = win(f_eval, d.eval_windows, d.seed + 1, "fe"), win(r_eval, d.eval_windows, d.seed + 1, "re")
    probe = TokenWindows(torch.cat([fs.tokens, rs.tokens]), fs.documents + [len(f_sel) + i for i in rs.documents],
                         "records")
    try:
        n_top, n_random = (int(x) for x in args.records.split(","))
    except ValueError:
        raise SystemExit(f"--records takes TOP,RANDOM (two integers, e.g. 64,32), got {args.records!r}") from None
    records = collect(model, {"records": probe, "forget": fs, "retain": rs}, top_k=n_top, n_random=n_random,
                      batch_size=8, progress=False)
    concepts = extract_concepts(f_sel, reference_texts=r_sel, seed=d.seed)
    term_kinds = args.terms.split(",")
    bad = [t for t in term_kinds if t not in ("word", "token")]
    if bad:
        raise SystemExit(f"--terms takes word and/or token, got {bad}")
    concepts_of = {"word": concepts}
    if "token" in term_kinds:
        from snip_lens.concepts import with_evidence_terms

        concepts_of["token"] = with_evidence_terms(concepts, f_sel, r_sel, model)
    embedder = None if args.no_embedding else get_embedder("local", cache_dir=args.cache, progress=False)
    projection = output_projection(model, ExplainConfig(explanations="output"), records)

    def evaluate(mask) -> dict:
        return {side: lm_metrics(model, toks, batch_size=8, mask=mask)["top1"]
                for side, toks in (("forget", fe.tokens), ("retain", re_.tokens))}

    base = evaluate(None)
    import random

    from snip_lens.score import NeuronScores
    from snip_lens.types import NeuronId

    everyone = [NeuronId(lay, i) for lay in range(n_layers) for i in range(d_mlp)]
    sample = sorted(random.Random(0).sample(everyone, round(args.sample * len(everyone))))
    in_sample = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    for n in sample:
        in_sample[n.layer, n.index] = True

    def restrict(s: NeuronScores) -> NeuronScores:
        return NeuronScores(torch.where(in_sample, s.scores, torch.tensor(float("-inf"), dtype=s.scores.dtype)),
                            s.method, s.labels, secondary=s.secondary, secondary_name=s.secondary_name)

    runs: dict[str, dict] = {}

    def measure(name: str, s: NeuronScores) -> None:
        for spec, k in ks.items():
            r = evaluate(mask_from_scores(model, s, k))
            runs[f"{name}@{spec}"] = {"method": name, "k": spec, **r}
            print(name, spec, {key: round(base[key] - v, 4) for key, v in r.items()}, flush=True)

    rnd = random_scores(n_layers, d_mlp, seed=0)
    act = activation_scores(records)
    measure("random", rnd)
    measure("activation", act)
    measure("activation (sample)", restrict(act))
    for kind in args.kinds.split(","):
        expl = explain(records, ExplainConfig(explanations=kind), projection=projection, model=model,
                       progress=False)
        for terms in term_kinds:
            tag = "evidence, word terms" if terms == "word" else "evidence, word and token terms"
            measure(f"snip-{kind} {tag}", score_neurons(expl, concepts_of[terms], None, n_layers=n_layers,
                                                        d_mlp=d_mlp, match="evidence"))
        if embedder is None:
            continue
        sub = [e for e in expl if in_sample[e.neuron.layer, e.neuron.index]]
        measure(f"snip-{kind} evidence (sample)", score_neurons(sub, concepts, None, n_layers=n_layers,
                                                              d_mlp=d_mlp, match="evidence"))
        measure(f"snip-{kind} embedding (sample)", score_neurons(sub, concepts, embedder, n_layers=n_layers,
                                                               d_mlp=d_mlp, match="embedding"))
    table = {}
    for key, r in runs.items():
        fd, rd = base["forget"] - r["forget"], base["retain"] - r["retain"]
        rnd_fd = base["forget"] - runs[f"random@{r['k']}"]["forget"]
        table[key] = {"method": r["method"], "k": r["k"], "forget_top1": round(r["forget"], 4),
                      "retain_top1": round(r["retain"], 4), "forget_drop": round(fd, 4), "retain_drop": round(rd, 4),
                      "forget_drop_vs_random": round(fd / rnd_fd, 2) if rnd_fd > 0 else None}
    scenario = ("demo (stdlib code vs pydoc prose)" if not (args.forget or args.retain)
                else f"{d.forget} vs {d.retain}")
    res = {"scenario": f"{scenario}, pilot split", "seed": args.seed,
           "command": "python benchmarks/snip_pilot.py " + " ".join(sys.argv[1:]),
           "ks": {spec: k for spec, k in ks.items()}, "sample": args.sample,
           "records": {"top_k": n_top, "n_random": n_random},
           "baseline": {s: round(v, 4) for s, v in base.items()}, "runs": table,
           "concepts": concepts.concepts, "seconds": round(time.perf_counter() - t0, 1),
           "load_average_1min": round(os.getloadavg()[0], 2)}
    for r in table.values():
        print(f"{r['method']:34s} {r['k']:>4s} forget drop {r['forget_drop']:+.3f} ({r['forget_drop_vs_random']}x "
              f"random) retain drop {r['retain_drop']:+.3f}")
    path = Path(__file__).parent / "results" / args.out
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
