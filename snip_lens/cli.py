"""The ``snip`` command line: thin wiring over the library's functions (each subcommand calls the API)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snip", description="Interpretable machine unlearning (SNIP).")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    # Each stage registers its subcommand here; the functions they call live in the library.
    _add_demo(sub)
    _add_run(sub)
    return p


def _sweep_args(sp: argparse.ArgumentParser, *, demo: bool) -> None:
    sp.add_argument("--out", default="snip_demo" if demo else "snip_run",
                    help="output directory (results.json, plots/, report.html, masks/)")
    sp.add_argument("--overwrite", action="store_true", help="replace results of a different config in --out")
    sp.add_argument("--methods", default="snip,hybrid,activation,random",
                    help="comma-separated: snip, hybrid, activation, activation-freq, random, keyword, llm-judge")
    sp.add_argument("--k", default="0.5%,1%,2%,4%", help="comma-separated counts or percentages of all neurons")
    sp.add_argument("--select-windows", type=int, default=32, help="windows per side for selection")
    sp.add_argument("--eval-windows", type=int, default=16, help="held-out windows per side for evaluation")
    sp.add_argument("--n-ctx", type=int, default=128, help="tokens per window")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--explainer", default="heuristic", choices=["heuristic", "openai", "local"])
    sp.add_argument("--import-explanations", help="published explanations file (OpenAI, DeepDecipher, Neuronpedia)")
    sp.add_argument("--min-explanation-score", type=float)
    sp.add_argument("--concepts", default="auto", choices=["auto", "llm", "distinctive"])
    sp.add_argument("--llm-model", help="chat model for explanations/concepts/judge, e.g. gpt-4o-mini")
    sp.add_argument("--base-url", help="OpenAI-compatible server root, e.g. http://localhost:8000/v1")
    sp.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the API key")
    sp.add_argument("--embedder", default="local", help="local | openai:text-embedding-3-small | a directory")
    sp.add_argument("--keywords", default="", help="comma-separated keywords for the keyword method")
    sp.add_argument("--hybrid-weight", type=float, default=0.5)
    sp.add_argument("--cbt", default="", help="CBT configs to evaluate, e.g. P,V")
    sp.add_argument("--cbt-source", default="hf", help="hf | a JSONL file in the HF cbt schema | prose")
    sp.add_argument("--cbt-items", type=int, default=200)
    sp.add_argument("--toxicity", action="store_true", help="also measure the toxicity rate")
    sp.add_argument("--toxicity-n", type=int, default=1000)
    sp.add_argument("--toxicity-scorer", default="detoxify", choices=["detoxify", "profanity"])
    sp.add_argument("--detoxify-checkpoint", help="local detoxify checkpoint (offline)")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sweep_config(args: argparse.Namespace) -> "object":
    from .sweep import DataConfig, SweepConfig

    data = DataConfig(forget=args.forget, retain=args.retain, n_ctx=args.n_ctx, select_windows=args.select_windows,
                      eval_windows=args.eval_windows, max_docs=getattr(args, "max_docs", None),
                      text_field=getattr(args, "text_field", "text"), seed=args.seed)
    return SweepConfig(
        model=args.model, data=data, methods=_split(args.methods), ks=_split(args.k), explainer=args.explainer,
        import_explanations=args.import_explanations, min_explanation_score=args.min_explanation_score,
        concepts=args.concepts, llm_model=args.llm_model, base_url=args.base_url, api_key_env=args.api_key_env,
        embedder=args.embedder, keywords=_split(args.keywords), hybrid_weight=args.hybrid_weight,
        batch_size=args.batch_size, cbt=_split(args.cbt), cbt_source=args.cbt_source, cbt_items=args.cbt_items,
        toxicity=args.toxicity, toxicity_n=args.toxicity_n, toxicity_scorer=args.toxicity_scorer,
        detoxify_checkpoint=args.detoxify_checkpoint, seed=args.seed)


def _run_sweep_cmd(args: argparse.Namespace) -> int:
    from .sweep import run_sweep, summary_table

    config = _sweep_config(args)
    results = run_sweep(config, args.out, overwrite=args.overwrite)
    print(summary_table(results))
    print(f"\nresults: {args.out}/results.json  plots: {args.out}/plots/  report: {args.out}/report.html")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("demo", help="offline SNIP demo on SmolLM2-135M: forget Python code, retain English prose",
                        description="Collect -> explain (heuristic) -> concepts (offline) -> embed -> score -> "
                        "sweep over methods and k on SmolLM2-135M, fully offline. Forget = CPython stdlib "
                        "source, retain = pydoc topics prose, each with held-out evaluation documents.")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--forget", default="code")
    sp.add_argument("--retain", default="prose")
    _sweep_args(sp, demo=True)
    sp.set_defaults(func=_run_sweep_cmd)


def _add_run(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("run", help="unlearn your own forget set: select, prune, evaluate, report")
    sp.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, a HF name or a local directory")
    sp.add_argument("--forget", required=True,
                    help="code | prose | FILE | DIR | hf:NAME[:CONFIG] | cbt:P[:FILE] | civil-toxic[:FILE]")
    sp.add_argument("--retain", required=True, help="same forms as --forget")
    sp.add_argument("--max-docs", type=int, help="cap on documents read per corpus")
    sp.add_argument("--text-field", default="text", help="text field of JSONL files / HF datasets")
    _sweep_args(sp, demo=False)
    sp.set_defaults(func=_run_sweep_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"snip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
