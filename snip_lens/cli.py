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
    _add_concepts(sub)
    _add_score(sub)
    _add_search(sub)
    _add_explain(sub)
    _add_collect(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_relearn(sub)
    return p


RUN_EXAMPLE = """example (offline, a few minutes on a laptop CPU):
  snip run --model smollm2-135m --forget my_code/ --retain notes.txt --k 1%,2% --out my_run

  Against a local OpenAI-compatible server that needs no key (vLLM, llama.cpp, transformers serve):
  snip run --model smollm2-135m --forget code --retain prose --explainer openai \\
      --llm-model Qwen2.5-7B-Instruct --base-url http://localhost:8000/v1 --api-key-env none --out my_run

Rerun the same command after an interruption: it resumes from what was saved."""


def _sweep_args(sp: argparse.ArgumentParser, *, demo: bool) -> None:
    from .config import add_run_flags

    sp.add_argument("--out", default="snip_demo" if demo else "snip_run",
                    help="output directory (results.json, plots/, report.html, masks/)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace saved artifacts of a different configuration in --out")
    # Every setting of the run is a field of a stage config in snip_lens/config.py: the flags come from there.
    add_run_flags(sp, required={} if demo else {"model": ("name",), "data": ("forget", "retain")})
    # Optional evaluations whose settings are nested configs (EvaluationConfig.generation / .relearn).
    sp.add_argument("--eval", default="", help="further evaluations, comma-separated: generation")
    sp.add_argument("--detector", default="auto", help="generation domain detector: auto | python | "
                    "language:XX (ISO 639-1, e.g. language:de) | classifier")
    sp.add_argument("--generation-prompts", type=int, default=16, help="generation: prompts per side")
    sp.add_argument("--relearn", default="", help="relearning attack after the sweep: step counts, e.g. 5,10,20")
    sp.add_argument("--relearn-forms", default="exported,masked", help="forms attacked: exported, masked")
    sp.add_argument("--relearn-lr", type=float, default=5e-5, help="AdamW learning rate of the attack")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _generation_config(args: argparse.Namespace) -> "object":
    evals = _split(args.eval)
    unknown = [e for e in evals if e != "generation"]
    if unknown:
        raise ValueError(f"unknown --eval {unknown}; choose from: generation")
    if "generation" not in evals:
        return None
    from .evaluate.generation import GenerationConfig

    return GenerationConfig(n_prompts=args.generation_prompts, detector=args.detector, seed=args.data__seed)


def _relearn_config(args: argparse.Namespace) -> "object":
    if not args.relearn:
        return None
    from .evaluate.relearn import RelearnConfig

    return RelearnConfig(steps=args.relearn, forms=args.relearn_forms, lr=args.relearn_lr, seed=args.data__seed)


def _sweep_config(args: argparse.Namespace) -> "object":
    """The run's :class:`~snip_lens.config.RunConfig`: the derived flags plus the nested evaluation configs."""
    from .config import run_config_from_args

    config = run_config_from_args(args)
    config.evaluate.generation = _generation_config(args)
    config.evaluate.relearn = _relearn_config(args)
    return config


def _run_sweep_cmd(args: argparse.Namespace) -> int:
    from .sweep import run_sweep, summary_table

    config = _sweep_config(args)
    results = run_sweep(config, args.out, overwrite=args.overwrite)
    print(summary_table(results))
    ex = results.get("explanations") or {}
    if ex.get("degenerate"):
        print(f"\nwarning: the explanations look degenerate ({'; '.join(ex['reasons'])}); see report.html")
    print(f"\nresults: {args.out}/results.json  plots: {args.out}/plots/  report: {args.out}/report.html")
    return 0


def _sweep_interrupted(args: argparse.Namespace) -> str:
    from .sweep import describe_saved

    return (f"kept in {args.out}: {describe_saved(args.out)}; run the same command again to resume from there")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("demo", help="offline SNIP demo on SmolLM2-135M: forget Python code, retain English prose",
                        description="Collect -> explain (heuristic) -> concepts (offline) -> embed -> score -> "
                        "sweep over methods and k on SmolLM2-135M, fully offline. Forget = CPython stdlib "
                        "source, retain = pydoc topics prose, each with held-out evaluation documents.",
                        epilog="example: snip demo --k 1%,2% --out snip_demo",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _sweep_args(sp, demo=True)
    sp.set_defaults(func=_run_sweep_cmd, on_interrupt=_sweep_interrupted)


def _add_run(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("run", help="unlearn your own forget set: select, prune, evaluate, report",
                        description="Select neurons with each method at each k, prune them with a mask, and "
                        "evaluate forget and retain data held out from selection. Every argument is checked "
                        "before the model loads.", epilog=RUN_EXAMPLE,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _sweep_args(sp, demo=False)
    sp.set_defaults(func=_run_sweep_cmd, on_interrupt=_sweep_interrupted)


def _model_flags(sp: argparse.ArgumentParser, *, name: bool = True, required: bool = False,
                 default: str | None = None, help_overrides: dict[str, str] | None = None) -> None:
    """--model (unless ``name`` is False), --device, --dtype, --device-map: the model stage's flags."""
    from .config import ModelConfig, add_stage_flags

    only = ("name", "device", "dtype", "device_map") if name else ("device", "dtype", "device_map")
    add_stage_flags(sp, ModelConfig, "model", only=only, required=("name",) if required else (),
                    defaults={"name": default} if default else None, help_overrides=help_overrides)


def _model_config(args: argparse.Namespace, **fixed: object):  # noqa: ANN202 - a ModelConfig
    from .config import ModelConfig, stage_from_args

    return stage_from_args(ModelConfig, args, "model", **fixed)


def _llm_flags(sp: argparse.ArgumentParser, *, default_model: str | None = None,
               only: tuple[str, ...] = ("model", "base_url", "api_key_env", "probe_timeout")) -> None:
    from .config import LLMServerConfig, add_stage_flags

    add_stage_flags(sp, LLMServerConfig, "llm", only=only,
                    defaults={"model": default_model} if default_model else None)


def _llm_server(args: argparse.Namespace, **fixed: object):  # noqa: ANN202 - an LLMServerConfig
    from .config import LLMServerConfig, stage_from_args

    return stage_from_args(LLMServerConfig, args, "llm", **fixed)


def _concepts_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checks import check_not_binary
    from .concepts import extract_concepts
    from .corpus import load_texts
    from .llm import probe_server

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name, e.g. --out {out / 'concepts.json'}")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite or choose another --out")
    server = _llm_server(args)
    forget = load_texts(args.forget, max_docs=args.max_docs, seed=args.seed)
    check_not_binary(forget, args.forget, "--forget")
    reference = None
    if args.reference:
        reference = load_texts(args.reference, max_docs=args.max_docs, seed=args.seed)
        check_not_binary(reference, args.reference, "--reference")
    client = None
    if server.model:
        client = server.llm_config()
        probe_server(client, timeout=server.probe_timeout)
    concepts = extract_concepts(forget, client=client, n_samples=args.n_samples, seed=args.seed,
                                reference_texts=reference, n_concepts=args.n_concepts, cache_dir=args.cache_dir)
    if args.tokenizer:
        from .concepts import with_evidence_terms
        from .config import ModelConfig

        concepts = with_evidence_terms(concepts, forget, reference, ModelConfig(name=args.tokenizer).load())
    concepts.save(out)
    for i, c in enumerate(concepts.concepts, 1):
        print(f"{i}. {c}")
    print(f"\n{len(concepts.concepts)} concepts ({concepts.source}) -> {out}")
    return 0


def _add_concepts(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("concepts", help="SNIP step 2: the concepts of a forget set (LLM, or offline distinctive words)")
    sp.add_argument("--forget", required=True, help="code | prose | FILE | DIR | hf:NAME")
    sp.add_argument("--reference", help="reference corpus for the offline fallback (default: English pydoc topics)")
    sp.add_argument("--max-docs", type=int, help="cap on documents read per corpus")
    _llm_flags(sp)
    sp.add_argument("--n-samples", type=int, default=10, help="distinct forget documents shown to the LLM")
    sp.add_argument("--n-concepts", type=int, default=30, help="concepts kept by the offline fallback")
    sp.add_argument("--tokenizer", metavar="MODEL",
                    help="also weigh this model's tokens, forget set vs reference, for the evidence match (the "
                         "model whose neurons will be scored; without it the match reads word terms only)")
    sp.add_argument("--cache-dir", help="cache of LLM answers")
    sp.add_argument("--seed", type=int, default=0, help="seed of the documents sampled for the LLM")
    sp.add_argument("--out", default="concepts.json", help="output JSON file")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sp.set_defaults(func=_concepts_cmd)


def _read_explanations(path: str) -> list:
    from .explain import load_explanations

    return load_explanations(path)


def _embedder_from_args(args: argparse.Namespace):  # noqa: ANN202 - an Embedder
    from pathlib import Path

    from .embed import get_embedder
    from .models import cache_dir

    server = _llm_server(args)
    cache = None if args.no_cache else (args.cache_dir or Path(cache_dir()) / "embeddings")
    return get_embedder(args.embed__embedder, cache_dir=cache, base_url=server.base_url,
                        api_key_env=server.api_key_env)


def _embedder_args(sp: argparse.ArgumentParser, *, match: bool = False) -> None:
    from .config import EmbeddingConfig, add_stage_flags

    add_stage_flags(sp, EmbeddingConfig, "embed", only=None if match else ("embedder",))
    _llm_flags(sp, only=("base_url", "api_key_env"))
    sp.add_argument("--cache-dir", help="embedding cache (default: the snip_lens cache directory)")
    sp.add_argument("--no-cache", action="store_true", help="do not cache embeddings")


def _score_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .score import score_neurons
    from .types import DatasetConcepts

    out = Path(args.out if args.out.endswith(".safetensors") else args.out + ".safetensors")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite or choose another --out")
    explanations = _read_explanations(args.explanations)
    concepts = DatasetConcepts.load(args.concepts)
    name = args.model or ""
    if args.model:
        from . import models as M

        model = _model_config(args, name=args.model).load()
        n_layers, d_mlp = M.n_layers(model), M.d_mlp(model)
        name = M.model_name(model)
    elif args.shape:
        try:
            n_layers, d_mlp = (int(x) for x in args.shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape {args.shape!r} is not LAYERSxNEURONS, e.g. 30x1536") from None
    else:
        n_layers = 1 + max(e.neuron.layer for e in explanations)
        d_mlp = 1 + max(e.neuron.index for e in explanations)
        logging.getLogger(__name__).warning("model shape inferred from the explanations: %dx%d (give --shape or "
                                            "--model to be sure)", n_layers, d_mlp)
    embedder = _embedder_from_args(args) if args.embed__match != "evidence" else None
    if embedder is None and args.embed__embedder != "local":
        logging.getLogger(__name__).warning("--embedder %s is not used: the evidence match embeds nothing (add "
                                            "--match embedding or --match both)", args.embed__embedder)
    if args.embed__match != "embedding":
        if not concepts.token_terms:
            logging.getLogger(__name__).warning(
                "%s holds no token terms: evidence tokens are weighed by their word terms only (word pieces get "
                "no weight); write the concepts with `snip concepts --tokenizer MODEL`", args.concepts)
        elif name and concepts.tokenizer != name:
            logging.getLogger(__name__).warning(
                "%s weighs the tokens of %s, but the neurons are of %s: evidence tokens the two do not share are "
                "weighed by their word terms", args.concepts, concepts.tokenizer, name)
    scores = score_neurons(explanations, concepts, embedder, n_layers=n_layers, d_mlp=d_mlp,
                           model_name=name, match=args.embed__match)
    path = scores.save(out)
    for nid in scores.top_k(min(args.show, int(scores.scores.isfinite().sum()))):
        print(f"{nid}\t{scores.scores[nid.layer, nid.index]:.3f}\t{scores.labels.get(nid, '')}")
    print(f"\nscores of {n_layers}x{d_mlp} neurons -> {path} (+ {path.with_suffix('.json').name})")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("score", help="SNIP step 3: score neurons by how their explanations match the concepts")
    sp.add_argument("--explanations", required=True, help="explanations JSONL (snip explain)")
    sp.add_argument("--concepts", required=True, help="concepts JSON (snip concepts)")
    sp.add_argument("--model", help="model whose shape to use (loaded), e.g. smollm2-135m")
    _model_flags(sp, name=False)
    sp.add_argument("--shape", help="model shape LAYERSxNEURONS instead of --model, e.g. 30x1536")
    sp.add_argument("--out", default="scores", help="output (.safetensors and .json)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sp.add_argument("--show", type=int, default=10, help="top neurons printed")
    _embedder_args(sp, match=True)
    sp.set_defaults(func=_score_cmd)


def _search_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .score import NeuronIndex

    embedder = _embedder_from_args(args)
    index = None
    if args.index and (Path(args.index) / "index.faiss").exists():
        index = NeuronIndex.load(args.index, embedder)
        if args.explanations and not index.built_from(_read_explanations(args.explanations)):
            # The index is derived from explanations only: rebuild it rather than answer from stale ones.
            print(f"snip search: index {args.index} was built from other explanations than {args.explanations} "
                  "(its recorded digest differs); rebuilding it", file=sys.stderr)
            index = None
    if index is None:
        if not args.explanations:
            raise ValueError("give --explanations FILE (or --index DIR of a saved index)")
        index = NeuronIndex.build(_read_explanations(args.explanations), embedder, kind=args.kind)
        if args.index:
            index.save(args.index)
    for nid, sim, text in index.search(args.query, args.k):
        print(f"{nid}\t{sim:.3f}\t{text}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("search", help="find the neurons whose explanations best match a free-text query")
    sp.add_argument("query", help='what to look for, e.g. "function definitions in Python"')
    sp.add_argument("--explanations", help="explanations JSONL (snip explain)")
    sp.add_argument("--index", help="directory of a saved neuron index: loaded if present, else built and saved")
    sp.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf"], help="FAISS index type")
    sp.add_argument("-k", type=int, default=10, help="neurons to show")
    _embedder_args(sp)
    sp.set_defaults(func=_search_cmd)


def _explain_cmd(args: argparse.Namespace) -> int:
    from .explain import ExplainConfig, explain_to_file
    from .llm import LLMConfig, probe_server
    from .types import NeuronId

    if args.deprecated_model:
        print("snip explain: --model is deprecated here (it named the LLM, while --model names the subject "
              "model everywhere else); use --llm-model", file=sys.stderr)
    server = _llm_server(args, **({"model": args.deprecated_model} if args.deprecated_model else {}))
    neurons = [NeuronId.parse(t) for t in args.neurons.split(",") if t.strip()] if args.neurons else None
    if args.records is None and args.import_file is None:
        raise ValueError("nothing to explain: give --records DIR (from snip collect) or --import FILE")
    llm = None
    if args.explainer == "openai" and not args.import_file:
        if not server.model:
            raise ValueError("--explainer openai needs an LLM: name it with --llm-model, e.g. --llm-model gpt-4o-mini")
        llm = LLMConfig(model=server.model, base_url=server.base_url, api_key_env=server.api_key_env,
                        concurrency=args.concurrency, temperature=args.temperature, max_retries=args.max_retries)
    # The --explainer local chat model runs where, and in the dtype, the model flags say (checked here, before
    # anything loads).
    chat = _model_config(args, name=args.local_model)
    config = ExplainConfig(kind=args.explainer, llm=llm, local_model=args.local_model,
                           local_device=chat.device, local_dtype=chat.dtype,
                           max_records=args.max_records, few_shot=not args.no_few_shot,
                           explanations=args.explanations)
    records = None
    if args.records:
        from .collect import ActivationRecords

        records = ActivationRecords.load(args.records)
    subject = None
    if config.needs_model and not args.import_file:
        name = args.subject_model or (records.model_name if records is not None else None)
        if not name:
            raise ValueError(f"--explanations {args.explanations} reads the subject model's weights: pass "
                             "--subject-model NAME (or --records from that model)")
        subject = _model_config(args, name=name).load()
    if llm is not None:
        probe_server(llm, timeout=server.probe_timeout)
    if args.batch_api:
        _explain_batched(args, records, config, neurons)
    try:
        result = explain_to_file(args.out, records=records, config=config, import_path=args.import_file,
                                 min_score=args.min_score, neurons=neurons, cache_dir=args.cache_dir,
                                 n_layers=args.n_layers, d_mlp=args.d_mlp, overwrite=args.overwrite,
                                 model=subject)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    from .checks import explanation_stats, warn_if_degenerate

    n_ok = sum(e.ok for e in result)
    n_open = sum(bool(e.error and "circuit breaker open" in e.error) for e in result)
    print(f"{n_ok} of {len(result)} neurons explained -> {args.out}")
    warn_if_degenerate(explanation_stats(result), args.out)
    if n_open:
        first = next(e.error for e in result if e.error and "circuit breaker open" in e.error)
        print(f"snip explain: error: stopped after repeated identical failures; {n_open} neurons were not sent "
              f"({first.split('request not sent: ', 1)[-1]}). The {n_ok} that succeeded are cached: fix the server "
              "and rerun with --overwrite to ask only for the rest", file=sys.stderr)
        return 1
    return 0 if n_ok or not result else 1


def _explain_interrupted(args: argparse.Namespace) -> str:
    cache = args.cache_dir or f"{args.out}.cache"
    return f"answers received so far are cached in {cache}; rerun the same command to ask only for the rest"


def _explain_batched(args: argparse.Namespace, records: object, config: object, neurons: object) -> None:
    """Answer every uncached neuron through the OpenAI Batch API into the per-neuron cache that
    explain_to_file then reads (only requests whose batch line failed are then sent live)."""
    from pathlib import Path

    from .explain import explain
    from .llm_batch import BatchConfig, run_batched

    if config.llm is None or records is None:
        raise ValueError("--batch-api needs --explainer openai and --records DIR")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    cache = args.cache_dir or str(out.with_name(out.name + ".cache"))
    run_batched(lambda client: explain(records, config, neurons=neurons, cache_dir=cache, client=client,
                                       progress=False),
                config.llm, BatchConfig(args.batch_api, poll_interval=args.batch_poll, max_wait=args.batch_max_wait))


def _add_explain(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("explain", help="SNIP step 1: explain MLP neurons in words (or import published ones)")
    sp.add_argument("--records", help="directory of collected activation records (snip collect)")
    sp.add_argument("--explainer", default="heuristic", choices=["heuristic", "openai", "local"],
                    help="heuristic (offline rules), openai (an OpenAI-compatible LLM: --llm-model) or local (a "
                    "small in-process chat model: --local-model)")
    _llm_flags(sp, default_model="gpt-4o-mini")
    sp.add_argument("--model", dest="deprecated_model", metavar="LLM",
                    help="deprecated alias of --llm-model (the LLM, not the subject model)")
    sp.add_argument("--explanations", default="input", choices=["input", "output", "both"],
                    help="evidence explanations rest on: top-activating inputs, VocabProj output tokens, or both")
    sp.add_argument("--subject-model", help="model whose neurons are explained, for output evidence "
                    "(default: the model the --records come from)")
    _model_flags(sp, name=False, help_overrides={
        "device": "where the subject model (output evidence) and the --explainer local chat model run: cpu, "
                  "cuda, cuda:N, mps or auto",
        "dtype": "dtype of the subject model and of the --explainer local chat model: float32, bfloat16 or "
                 "float16 (aliases fp32, bf16, fp16)"})
    sp.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    sp.add_argument("--temperature", type=float, default=1.0, help="LLM sampling temperature, in [0, 2]")
    sp.add_argument("--max-retries", type=int, default=5,
                    help="retries of a request after 429/5xx/timeouts/connection errors")
    sp.add_argument("--local-model", default="smollm2-135m", help="chat model for --explainer local")
    sp.add_argument("--max-records", type=int, default=10, help="top-activating windows shown per neuron")
    sp.add_argument("--no-few-shot", action="store_true", help="omit the three few-shot example neurons")
    sp.add_argument("--neurons", help="only these neurons, e.g. 'L3/N17,3:18'")
    sp.add_argument("--cache-dir", help="per-neuron answer cache (default: <out>.cache)")
    sp.add_argument("--out", required=True, help="explanations JSONL to write")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sp.add_argument("--import", dest="import_file",
                    help="import published explanations instead (OpenAI JSONL, DeepDecipher, Neuronpedia)")
    sp.add_argument("--min-score", type=float, help="drop imported explanations scored below this")
    sp.add_argument("--n-layers", type=int, help="model layers, to check imported indices (default: from --records)")
    sp.add_argument("--d-mlp", type=int, help="neurons per layer, to check imported indices")
    sp.add_argument("--batch-api", metavar="DIR",
                    help="send the requests through the OpenAI Batch API, keeping its state in DIR (rerun to resume)")
    sp.add_argument("--batch-poll", type=float, default=60.0, help="seconds between batch status checks")
    sp.add_argument("--batch-max-wait", type=float,
                    help="stop waiting after this many seconds (batches keep running; rerun to continue)")
    sp.set_defaults(func=_explain_cmd, on_interrupt=_explain_interrupted)


def _collect_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .collect import collect, parse_layers
    from .corpus import load_corpus

    try:
        before, after = (int(x) for x in args.context.split(","))
    except ValueError:
        raise ValueError(f"--context {args.context!r} is not BEFORE,AFTER, e.g. 32,8") from None
    specs = args.corpus or ["code"]
    named = [s.split("=", 1) if "=" in s else [s, s] for s in specs]
    if len({n for n, _ in named}) != len(named):
        raise ValueError(f"--corpus names repeat in {specs}; name them, e.g. --corpus forget=code --corpus retain=prose")
    from .config import check_out_dir
    from .sweep import check_context

    check_out_dir(args.out)
    dirs = {name for name, source in named if Path(source).expanduser().is_dir()}
    if args.glob is not None and not dirs:
        raise ValueError(f"--glob {args.glob!r} narrows a directory corpus, but no --corpus is a directory")
    layers = parse_layers(args.layers) if args.layers else None
    model = _model_config(args).load()
    check_context(model, args.n_ctx)
    corpora = {name: load_corpus(model, source, n_ctx=args.n_ctx, max_windows=args.windows, seed=args.seed,
                                 split=args.split, text_field=args.text_field, max_docs=args.max_docs, name=name,
                                 max_doc_tokens=args.max_doc_tokens or None,
                                 glob=args.glob if name in dirs else None)
               for name, source in named}
    executor = None
    if args.ray is not None:
        from .sharding import ModelSpec, RayExecutor

        executor = RayExecutor(ModelSpec(name=args.model__name), address=None if args.ray == "local" else args.ray,
                               n_actors=args.ray_actors, num_gpus=args.ray_gpus_per_actor,
                               num_cpus=args.ray_cpus_per_actor)
    try:
        rec = collect(model, corpora, layers=layers, top_k=args.top_k, context=(before, after),
                      n_random=args.n_random, batch_size=args.batch_size, out_dir=args.out,
                      progress=not args.no_progress, seed=args.seed, shard_windows=args.shard_windows,
                      overwrite=args.overwrite, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    n_tok = {name: int(st.count[0, 0]) for name, st in rec.stats.items()}
    print(f"{rec.n_neurons} neurons (layers {rec.layers[0]}..{rec.layers[-1]}) of {rec.model_name}; tokens per corpus "
          f"{n_tok}; top {rec.top_k} records from {rec.records_corpus!r} -> {args.out}")
    return 0


def _add_collect(sub: argparse._SubParsersAction) -> None:
    from .config import CollectionConfig

    sp = sub.add_parser("collect", help="SNIP step 1 input: top-activating records and activation statistics",
                        description="Stream corpora through the model and keep, for every MLP neuron, its top-k "
                        "activating windows, a few random windows, and activation statistics per corpus. "
                        "Resumable: rerun the same command after an interruption.")
    _model_flags(sp)
    sp.add_argument("--corpus", action="append",
                    help="SOURCE or NAME=SOURCE (repeatable); SOURCE is code | prose | FILE | DIR | hf:NAME[:CONFIG]. "
                    "Records come from the corpus named 'records', else the first. Default: code")
    sp.add_argument("--windows", type=int, help="windows per corpus (default: all)")
    sp.add_argument("--n-ctx", type=int, default=128, help="tokens per window")
    sp.add_argument("--top-k", type=int, default=None,
                    help=f"top-activating records per neuron (default {CollectionConfig.top_k_records}, fewer when "
                    "the records corpus is smaller)")
    sp.add_argument("--layers", help="layers, e.g. 0-14 or 0,3,5-7 (default: all)")
    sp.add_argument("--context", default="32,8", help="tokens kept BEFORE,AFTER the activating token")
    sp.add_argument("--n-random", type=int, default=CollectionConfig.random_records,
                    help="random non-top records per neuron (what it does on typical text; default "
                    f"{CollectionConfig.random_records})")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    sp.add_argument("--shard-windows", type=int, default=256, help="windows between checkpoints")
    sp.add_argument("--max-docs", type=int, help="cap on documents read per corpus")
    sp.add_argument("--max-doc-tokens", type=int, default=512,
                    help="tokens kept from each document, so a few long files cannot fill the corpus (0: all)")
    sp.add_argument("--split", default="train", help="split of hf: datasets")
    sp.add_argument("--text-field", default="text", help="text field of JSONL files / HF datasets")
    sp.add_argument("--glob", help="read only matching files of a directory corpus, e.g. '*.c' or 'docs/**/*.rst' "
                    "(default: every text file under it; binary files are skipped)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the window order and the random records")
    sp.add_argument("--out", required=True, help="output directory (activations.safetensors + records.json)")
    sp.add_argument("--overwrite", action="store_true", help="replace results of a different config in --out")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="collect the shards (--shard-windows each) on Ray actors: a local cluster, or the one at "
                    "ADDRESS (auto, ray://HOST:10001)")
    sp.add_argument("--ray-actors", type=int, help="model replicas (default: one per GPU, else one per CPU)")
    sp.add_argument("--ray-gpus-per-actor", type=float,
                    help="GPUs per replica (default 1 when the cluster has GPUs); more for a device_map over GPUs")
    sp.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs (torch threads) per replica")
    sp.set_defaults(func=_collect_cmd, on_interrupt=lambda a: f"the last checkpoint in {a.out} is kept; rerun the "
                    "same command to resume from it")

def _eval_load(args: argparse.Namespace) -> tuple:
    if args.out:
        from pathlib import Path

        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is a directory; give a JSON file name")
    model = _model_config(args).load()
    if getattr(args, "n_ctx", None):
        from .sweep import check_context

        check_context(model, args.n_ctx)
    mask = None
    if args.mask:
        from .mask import NeuronMask

        mask = NeuronMask.load(args.mask, model)
    return model, mask


def _eval_report(args: argparse.Namespace, result: dict) -> int:
    import json

    text = json.dumps(result, indent=2, default=str)
    if args.out:
        from pathlib import Path

        from .evaluate._common import write_json_atomic

        write_json_atomic(Path(args.out), result)
    print(text)
    return 0


def _evaluate_lm_cmd(args: argparse.Namespace) -> int:
    from .corpus import load_corpus
    from .evaluate import lm_metrics

    model, mask = _eval_load(args)
    windows = load_corpus(model, args.corpus, n_ctx=args.n_ctx, max_windows=args.windows, seed=args.seed,
                          split=args.split, text_field=args.text_field)
    res = lm_metrics(model, windows.tokens, batch_size=args.batch_size, mask=mask, progress=True)
    return _eval_report(args, {"corpus": args.corpus, "mask": args.mask, **res})


def _evaluate_cbt_cmd(args: argparse.Namespace) -> int:
    from .evaluate import build_cloze_items, cbt_accuracy, load_cbt

    model, mask = _eval_load(args)
    if args.source == "prose":
        import pydoc_data.topics

        if args.config not in ("P", "V"):
            raise ValueError(f"--source prose builds CBT-P or CBT-V items only, not --config {args.config}")
        texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
        items = build_cloze_items(texts, args.config, n_items=args.max_items or 100, seed=args.seed)
    else:
        items = load_cbt(args.source, args.config, split=args.split, max_items=args.max_items)
    res = cbt_accuracy(model, items, mask=mask, use_kv_cache=not args.no_kv_cache, progress=True)
    return _eval_report(args, {"source": args.source, "config": args.config, "mask": args.mask, **res})


def _evaluate_toxicity_cmd(args: argparse.Namespace) -> int:
    from .evaluate import ToxicityConfig, toxicity_rate

    model, mask = _eval_load(args)
    cfg = ToxicityConfig(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                         scorer=args.scorer, detoxify_checkpoint=args.detoxify_checkpoint,
                         detoxify_config=args.detoxify_config)
    res = toxicity_rate(model, cfg, mask=mask, progress=True)
    return _eval_report(args, {"config": cfg.to_json(), "mask": args.mask, **res})


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("evaluate", help="evaluate a model, optionally with a neuron mask: lm | cbt | toxicity",
                        description="Held-out evaluations of a model, optionally pruned by a saved neuron mask.")
    ev = sp.add_subparsers(dest="evaluation", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        _model_flags(p)
        p.add_argument("--mask", help="a neuron mask file (safetensors) to apply during the evaluation")
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the evaluation")
        p.add_argument("--out", help="also write the result to this JSON file")

    p = ev.add_parser("lm", help="next-token loss, top-1 and top-10 accuracy on a corpus")
    common(p)
    p.add_argument("--corpus", required=True, help="code | prose | FILE | DIR | hf:NAME[:CONFIG]")
    p.add_argument("--windows", type=int, default=32, help="windows evaluated")
    p.add_argument("--n-ctx", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--split", default="test", help="split of hf: datasets")
    p.add_argument("--text-field", default="text", help="text field of JSONL files / HF datasets")
    p.set_defaults(func=_evaluate_lm_cmd)

    p = ev.add_parser("cbt", help="Children's Book Test cloze accuracy")
    common(p)
    p.add_argument("--source", default="hf", help="hf | a JSONL file in the HF cbt schema | prose (built items)")
    p.add_argument("--config", default="P", choices=["P", "V", "NE", "CN"],
                   help="CBT part: P (prepositions), V (verbs), NE (named entities), CN (common nouns)")
    p.add_argument("--split", default="test", help="split of the hf dataset")
    p.add_argument("--max-items", type=int, help="items evaluated (default: all; 100 for prose)")
    p.add_argument("--no-kv-cache", action="store_true", help="score each option with a full forward (slow)")
    p.set_defaults(func=_evaluate_cbt_cmd)

    p = ev.add_parser("toxicity", help="percentage of toxic generations from the paper's prompt")
    common(p)
    p.add_argument("--n", type=int, default=1000, help="generations")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, default=50, help="generations per forward pass")
    p.add_argument("--scorer", default="detoxify", choices=["detoxify", "profanity"],
                   help="detoxify (offline: --detoxify-checkpoint) or profanity (a word list)")
    p.add_argument("--detoxify-checkpoint", help="local Detoxify .ckpt file (offline)")
    p.add_argument("--detoxify-config", help="local directory with bert-base-uncased config/tokenizer (offline)")
    p.set_defaults(func=_evaluate_toxicity_cmd)


def _export_cmd(args: argparse.Namespace) -> int:
    from .export import export_pruned
    from .mask import NeuronMask
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is an existing file; give a directory for the model")
    if bool(args.mask) == bool(args.scores):
        raise ValueError("give either --mask FILE, or --scores FILE with --k (and optionally --select)")
    if args.mask and (args.k or args.select != "global"):
        raise ValueError("--k and --select choose neurons from --scores; a --mask already lists its neurons")
    if args.scores and not args.k:
        raise ValueError("--scores needs --k, e.g. --k 2% (and --select per-layer for a fully compact model)")
    model = _model_config(args).load()
    if args.mask:
        mask = NeuronMask.load(args.mask, model=model)
    else:
        from . import models as M
        from .score import NeuronScores
        from .select import mask_from_scores

        scores = NeuronScores.load(args.scores, n_layers=M.n_layers(model), d_mlp=M.d_mlp(model))
        mask = mask_from_scores(model, scores, args.k, select=args.select)
    report = export_pruned(model, mask, args.out, compact=args.compact, overwrite=args.overwrite)
    print(f"wrote {report.out_dir}: {report.architecture}, {report.mode} mask of {report.n_masked} neurons, "
          f"MLP width {report.d_mlp_before} -> {report.width}, parameters {report.params_before:,} -> "
          f"{report.params_after:,}")
    print(f"removed {report.n_removed} of the {report.n_masked} masked neurons from the weights; "
          f"{report.n_not_removed} could not be removed" + (":" if report.n_not_removed else ""))
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("export", help="write a pruned model as a plain Hugging Face model directory",
                        description="Bake a saved NeuronMask (or the top k of saved scores) into a copy of the "
                        "model's weights and write a directory that transformers.AutoModelForCausalLM."
                        "from_pretrained loads as is.")
    _model_flags(sp, required=True)
    sp.add_argument("--mask", help="mask file written by NeuronMask.save (.safetensors), e.g. a sweep's masks/*")
    sp.add_argument("--scores", help="instead of --mask: scores file (snip score, a sweep's scores/*) and --k")
    sp.add_argument("--k", help="with --scores: neurons to prune, a count or a percentage like 2%%")
    sp.add_argument("--select", default="global", choices=["global", "per-layer"],
                    help="with --scores: the k best overall, or k/L per layer (fully compactable)")
    sp.add_argument("--out", required=True, help="output model directory")
    sp.add_argument("--compact", action="store_true",
                    help="remove pruned neurons (smaller MLPs): one MLP width for all layers, so a layer that "
                    "pruned fewer limits it; per-layer masks shrink fully")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sp.set_defaults(func=_export_cmd)


def _relearn_cmd(args: argparse.Namespace) -> int:
    from .evaluate.relearn import RelearnConfig, relearn_mask, relearn_table
    from .mask import NeuronMask
    from .report import format_table
    from .sweep import DataConfig

    model = _model_config(args).load()
    mask = NeuronMask.load(args.mask, model=model)
    data = DataConfig(forget=args.forget, retain=args.retain, n_ctx=args.n_ctx, eval_windows=args.eval_windows,
                      eval_fraction=args.eval_fraction, max_docs=args.max_docs,
                      max_doc_tokens=args.max_doc_tokens or None, seed=args.seed)
    config = RelearnConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, forms=args.forms,
                           relearn_windows=args.relearn_windows, seed=args.seed)
    try:
        result = relearn_mask(model, mask, data, config, label=args.label, out_dir=args.out, random_seed=args.seed,
                              overwrite=args.overwrite)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    print(format_table(relearn_table(result)))
    print(f"\nresults: {args.out}/relearn.json  plot: {args.out}/relearn_forget_top1.png")
    return 0


def _add_relearn(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("relearn", help="relearning attack: fine-tune a pruned model on forget data, re-measure",
                        description="Fine-tune copies of the model pruned by --mask (exported: zeroed weights, all "
                        "trainable; masked: hooks stay on), of the unpruned model and of a random mask of the same "
                        "size on forget documents disjoint from the held-out ones, and measure forget / retain "
                        "top-1 after each step count. The data is split as `snip run` splits it.")
    _model_flags(sp, required=True)
    sp.add_argument("--mask", required=True, help="mask file written by NeuronMask.save (e.g. a sweep's masks/)")
    sp.add_argument("--label", default="mask", help="name of the mask in the results, e.g. snip")
    sp.add_argument("--forget", required=True, help="code | prose | FILE | DIR | hf:NAME[:CONFIG]")
    sp.add_argument("--retain", required=True, help="same forms as --forget")
    sp.add_argument("--steps", default="5,10,20", help="optimiser steps after which to measure")
    sp.add_argument("--forms", default="exported,masked", help="forms attacked: exported, masked")
    sp.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    sp.add_argument("--batch-size", type=int, default=4, help="relearn windows per step")
    sp.add_argument("--relearn-windows", type=int, default=32, help="windows of the relearn split")
    sp.add_argument("--n-ctx", type=int, default=128, help="tokens per window")
    sp.add_argument("--eval-windows", type=int, default=16, help="held-out windows per side")
    sp.add_argument("--eval-fraction", type=float, default=0.3, help="fraction of documents held out")
    sp.add_argument("--max-docs", type=int, help="cap on documents read per corpus")
    sp.add_argument("--max-doc-tokens", type=int, default=512, help="tokens kept from each document (0: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the relearn batches and the random mask")
    sp.add_argument("--out", required=True, help="output directory (relearn.json, relearn_forget_top1.png)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing relearn.json in --out")
    sp.set_defaults(func=_relearn_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .llm import LLMError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        note = getattr(args, "on_interrupt", None)
        print(f"\nsnip {args.command}: interrupted; " + (note(args) if note else "nothing was written"),
              file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, LLMError) as exc:  # OSError: missing files, unreachable hub
        print(f"snip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
