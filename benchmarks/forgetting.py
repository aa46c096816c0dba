"""Did it really forget? Generation-level forgetting and a relearning attack on SmolLM2-135M, two scenarios.

Scenarios (the forget / retain pairs of the offline demo and of one language):

- ``code``: forget = CPython standard-library source, retain = the English prose of ``pydoc_data.topics``
  (the demo's scenario); the auto detector picks ``python``;
- ``german``: forget = the German fortunes of Debian's ``fortunes-de`` (``/usr/share/games/fortunes/de``),
  retain = the English fortunes of ``fortunes`` (the package's own files, named below); one fortune (the text
  between two ``%`` lines) is one document; the auto detector picks ``language:de``.

Each scenario is one ``run_sweep`` (methods snip, activation, random at 2% and 4% of the neurons; SNIP in
the library's default configuration: offline explanations of both kinds, evidence match) with ``--eval generation`` and the relearning attack at 4% (AdamW, lr 1e-4, batch 4
windows of 64 tokens, measured after 2, 5 and 10 steps, exported and masked forms, plus the unpruned model).
Time: on 2 CPU cores shared with seven other jobs (load 10-15) the code scenario's selection alone took
27 minutes (explaining 46,080 neurons ~5, embedding their explanations ~11), one batch of 12 continuations
~90 s and one relearning step ~2 minutes, so the whole run needs a quiet machine (the script prints the time
of each scenario). Sizes: 16 selection and 12 evaluation windows of 64 tokens per side, 12 generation prompts
of 16 tokens per side with 32 new tokens. Every ratio printed is against the unpruned baseline measured in
the same run. Writes ``benchmarks/results/forgetting.json`` and each scenario's full sweep output
(results.json, plots/, report.html) under ``--out`` (default ``out/forgetting``).

    python benchmarks/forgetting.py [--scenarios code,german] [--out out/forgetting] [--threads 2]

On a machine too busy for the whole run, ``--from-scores generation|relearn`` reuses the neuron scores an
earlier (interrupted) run saved in ``--out/<scenario>/scores`` and runs one of the two checks on its own, at
sizes given by ``--prompts``, ``--decodings``, ``--steps`` and ``--k``; its numbers go under the scenario's
``reduced`` entry of the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from snip_lens import load_model
from snip_lens._io import atomic_write_json, atomic_write_text
from snip_lens.evaluate.generation import GenerationConfig
from snip_lens.evaluate.relearn import RelearnConfig
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parent.parent
FORTUNES = Path("/usr/share/games/fortunes")
ENGLISH_FILES = ["fortunes", "humorists", "wisdom", "people", "literature", "work", "science", "politics",
                 "education", "love", "pets", "food", "platitudes", "men-women", "miscellaneous"]
"""Files of Debian's ``fortunes`` package (English), its art files left out."""
SKIP_GERMAN = {"asciiart"}
"""Files of ``fortunes-de`` left out: pictures, not language."""


def fortune_entries(path: Path) -> list[str]:
    """The fortunes of one file: the texts between lines holding only ``%``."""
    entries, cur = [], []
    from unlearning import clean_fortune  # the same cleaning as the unlearning benchmark's scenarios

    for line in clean_fortune(path.read_text(encoding="utf-8", errors="replace")).splitlines():
        if line.strip() == "%":
            if cur:
                entries.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    if cur:
        entries.append("\n".join(cur).strip())
    return [e for e in entries if e]


def write_fortune_corpora(out: Path) -> tuple[Path, Path]:
    """German and English fortunes as JSONL corpora (one fortune per line); raises if the packages are missing."""
    de_dir = FORTUNES / "de"
    if not de_dir.is_dir() or not (FORTUNES / "fortunes").is_file():
        raise SystemExit(f"the german scenario needs Debian's fortunes and fortunes-de packages ({FORTUNES}); "
                         "install them with: apt-get install -y fortunes fortunes-de, or run --scenarios code")
    german = [e for p in sorted(de_dir.iterdir())
              if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in SKIP_GERMAN
              for e in fortune_entries(p)]
    english = [e for name in ENGLISH_FILES if (FORTUNES / name).is_file() for e in fortune_entries(FORTUNES / name)]
    paths = []
    for name, entries in (("fortunes-de", german), ("fortunes-en", english)):
        path = out / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps({"text": e}, ensure_ascii=False) + "\n" for e in entries))
        paths.append(path)
        print(f"{name}: {len(entries)} fortunes -> {path}")
    return paths[0], paths[1]


def scenario_config(forget: str, retain: str, max_docs: int | None) -> SweepConfig:
    return SweepConfig(
        model="smollm2-135m",
        data=DataConfig(forget=forget, retain=retain, n_ctx=64, select_windows=16, eval_windows=12,
                        max_docs=max_docs, seed=0),
        methods=["snip", "activation", "random"], ks=["2%", "4%"],
        generation=GenerationConfig(n_prompts=12, prompt_tokens=16, max_new_tokens=32, batch_size=12,
                                    detector="auto", seed=0),
        relearn=RelearnConfig(steps=[2, 5, 10], lr=1e-4, batch_size=4, relearn_windows=32, n_ctx=64,
                              ks=["4%"], seed=0))


def summarise(res: dict) -> dict:
    """The benchmark's numbers of one sweep: in-domain shares, fluency, top-1 and relearning recovery."""
    gen = res["generation"]
    out: dict = {"detector": gen["detector"], "reference_forget_in_domain": gen["reference_forget_in_domain"],
                 "reference_retain_in_domain": gen["reference_retain_in_domain"], "rows": []}
    for method, k, r in [("none", 0, res["baseline"])] + [(r["method"], r["k"], r) for r in res["runs"]]:
        row = {"method": method, "k": k, "k_percent": round(100 * k / res["n_neurons"], 2),
               "forget_top1": r["forget"]["top1"], "retain_top1": r["retain"]["top1"]}
        for dec, g in r["generation"].items():
            row[f"{dec}_forget_in_domain"] = g["forget_in_domain"]
            row[f"{dec}_retain_in_domain"] = g["retain_in_domain"]
            row[f"{dec}_retain_fluency"] = g["retain_fluency"]
        out["rows"].append(row)
    rel = res["relearn"]
    out["relearn"] = {"config": rel["config"], "original_forget_top1": rel["original_forget_top1"], "runs": [
        {key: r.get(key) for key in ("method", "form", "k", "steps", "forget_top1", "retain_top1", "recovery",
                                     "pruned_out_norm", "masked_max_abs_act", "seconds")} for r in rel["runs"]]}
    out["timings_s"] = res["timings_s"]
    return out


def print_summary(name: str, s: dict) -> None:
    base = s["rows"][0]
    print(f"\n=== {name}: detector {s['detector']['name']} (documents' own continuations in-domain: forget "
          f"{s['reference_forget_in_domain']:.2f}, retain {s['reference_retain_in_domain']:.2f})")
    print(f"{'method':<11}{'k%':>5}{'fgt top1':>10}{'ret top1':>10}{'greedy in-dom':>15}{'x base':>8}"
          f"{'sampled in-dom':>16}{'x base':>8}{'ret fluency g/s':>18}")
    for r in s["rows"]:
        def ratio(key: str) -> str:
            return f"{r[key] / base[key]:.2f}" if base[key] else "n/a"
        print(f"{r['method']:<11}{r['k_percent']:>5.1f}{r['forget_top1']:>10.3f}{r['retain_top1']:>10.3f}"
              f"{r['greedy_forget_in_domain']:>15.2f}{ratio('greedy_forget_in_domain'):>8}"
              f"{r['sampled_forget_in_domain']:>16.2f}{ratio('sampled_forget_in_domain'):>8}"
              f"{r['greedy_retain_fluency']:>10.3f}/{r['sampled_retain_fluency']:.3f}")
    rel = s["relearn"]
    print(f"relearning (forget top-1 at steps {rel['runs'][0]['steps']}; recovery after each):")
    for r in rel["runs"]:
        rec = "" if r["recovery"] is None else "  recovery " + ", ".join(
            "n/a" if v is None else f"{v:.2f}" for v in r["recovery"][1:])
        print(f"  {r['method']:<11}{r['form']:<9}k={r['k']:<5}" + ", ".join(f"{v:.3f}" for v in r["forget_top1"])
              + rec + f"  ({r['seconds']:.0f} s)")


def _merge_write(path: Path, name: str, part: str, value: dict) -> None:
    results = json.loads(path.read_text()) if path.exists() else {"model": "smollm2-135m", "scenarios": {}}
    results["scenarios"].setdefault(name, {}).setdefault("reduced", {})[part] = value
    atomic_write_json(path, results)


def from_scores(args: argparse.Namespace, name: str, model, out: Path, result_path: Path) -> None:
    """One check on the masks of an earlier run's saved scores (see the module docstring)."""
    from snip_lens.corpus import make_windows
    from snip_lens.evaluate.generation import GenerationEvaluator
    from snip_lens.evaluate.relearn import relearn_attack, relearn_documents
    from snip_lens.score import NeuronScores
    from snip_lens.select import mask_from_scores, parse_k
    from snip_lens.sweep import load_side_texts, split_documents

    if name == "code":
        cfg = scenario_config("code", "prose", None)
    else:
        de, en = write_fortune_corpora(out / "corpora")
        cfg = scenario_config(str(de), str(en), 3000)
    d = cfg.data
    forget, retain = load_side_texts(d.forget, d), load_side_texts(d.retain, d)
    f_sel, f_eval = split_documents(forget, d.eval_fraction, d.seed)
    r_sel, r_eval = split_documents(retain, d.eval_fraction, d.seed)
    n = model.cfg.n_layers * model.cfg.d_mlp
    ks = [parse_k(k, n) for k in args.k.split(",")]
    masks = {(m, k): mask_from_scores(model, NeuronScores.load(out / name / "scores" / f"{m}.safetensors"), k)
             for k in ks for m in cfg.methods}
    t0 = time.perf_counter()
    if args.from_scores == "generation":
        gcfg = GenerationConfig(**{**cfg.generation.to_json(), "n_prompts": args.prompts,
                                   "decodings": args.decodings.split(",")})
        ev = GenerationEvaluator(model, f_eval, r_eval, f_sel, r_sel, gcfg, progress=True)
        value = {**ev.describe(), "rows": []}
        for key, mask in [(("none", 0), None)] + list(masks.items()):
            res = ev.run(mask)
            value["rows"].append({"method": key[0], "k": key[1], "k_percent": round(100 * key[1] / n, 2),
                                  **{f"{dec}_{m}": g[m] for dec, g in res.items()
                                     for m in ("forget_in_domain", "retain_in_domain", "retain_fluency")},
                                  "examples": {dec: {s: g[f"{s}_examples"] for s in ("forget", "retain")}
                                               for dec, g in res.items()}})
            value["seconds"] = round(time.perf_counter() - t0, 1)
            _merge_write(result_path, name, "generation", value)
            r = value["rows"][-1]
            print(f"{name} generation {key[0]} k={key[1]}: " + ", ".join(
                f"{k2} {v:.3f}" for k2, v in r.items() if isinstance(v, float) and k2 != "k_percent"), flush=True)
    else:
        kw = dict(n_ctx=d.n_ctx, max_windows=d.eval_windows, seed=d.seed + 1, max_doc_tokens=d.max_doc_tokens)
        fw = make_windows(model, f_eval, name="forget-eval", **kw).tokens
        rw = make_windows(model, r_eval, name="retain-eval", **kw).tokens
        rcfg = RelearnConfig(**{**cfg.relearn.to_json(), "steps": [int(x) for x in args.steps.split(",")]})
        docs = relearn_documents(f_sel, f_eval)
        rl = make_windows(model, docs, n_ctx=rcfg.n_ctx, max_windows=rcfg.relearn_windows, seed=d.seed + 2).tokens
        for k in ks:
            res = relearn_attack(model, {m: masks[(m, k)] for m in cfg.methods}, rl, fw, rw, rcfg, progress=True)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            _merge_write(result_path, name, f"relearn_k{k}", res)
            print_summary_relearn(name, res)


def print_summary_relearn(name: str, rel: dict) -> None:
    print(f"{name} relearning (forget top-1 at steps {rel['runs'][0]['steps']}; recovery after each):")
    for r in rel["runs"]:
        rec = "" if r.get("recovery") is None else "  recovery " + ", ".join(
            "n/a" if v is None else f"{v:.2f}" for v in r["recovery"][1:])
        print(f"  {r['method']:<11}{r['form']:<9}k={r['k']:<5}" + ", ".join(f"{v:.3f}" for v in r["forget_top1"])
              + rec + f"  retain {r['retain_top1'][0]:.3f}->{r['retain_top1'][-1]:.3f}  ({r['seconds']:.0f} s)",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="code,german", help="comma-separated: code, german")
    p.add_argument("--out", default="out/forgetting", help="folder of the scenarios' sweep outputs")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--overwrite", action="store_true", help="rerun scenarios whose output holds another config")
    p.add_argument("--from-scores", choices=["generation", "relearn"], help="one check on saved scores only")
    p.add_argument("--prompts", type=int, default=12, help="--from-scores generation: prompts per side")
    p.add_argument("--decodings", default="greedy,sampled", help="--from-scores generation: decodings")
    p.add_argument("--steps", default="2,5,10", help="--from-scores relearn: step counts")
    p.add_argument("--k", default="2%,4%", help="--from-scores: k values")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = ROOT / args.out
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [n for n in names if n not in ("code", "german")]
    if bad:
        raise SystemExit(f"unknown scenario(s) {bad}; choose from code, german")
    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    result_path = ROOT / "benchmarks" / "results" / "forgetting.json"
    if args.from_scores:
        for name in names:
            from_scores(args, name, model, out, result_path)
        return 0
    results: dict = {"model": "smollm2-135m", "threads": torch.get_num_threads(), "scenarios": {}}
    if result_path.exists():  # a run of some scenarios keeps the others' numbers
        results["scenarios"] = json.loads(result_path.read_text())["scenarios"]
    for name in names:
        t = time.perf_counter()
        if name == "code":
            cfg = scenario_config("code", "prose", None)
        else:
            de, en = write_fortune_corpora(out / "corpora")
            cfg = scenario_config(str(de), str(en), 3000)  # 3,000 of the 25,000 fortunes
        res = run_sweep(cfg, out / name, model=model, overwrite=args.overwrite, progress=True)
        summary = summarise(res)
        summary["seconds"] = round(time.perf_counter() - t, 1)
        summary["config"] = cfg.to_json()
        if result_path.exists():  # another run may have written other scenarios meanwhile
            results["scenarios"] = {**json.loads(result_path.read_text())["scenarios"], **results["scenarios"]}
        results["scenarios"][name] = summary
        print_summary(name, summary)
        print(f"{name}: {summary['seconds'] / 60:.1f} min; full output in {out / name}")
        atomic_write_json(result_path, results)  # after each scenario: a later failure loses nothing
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min -> {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
