"""Unlearning experiments end to end: collect -> explain -> concepts -> embed -> score -> prune -> evaluate.

``run_sweep`` runs every selection method at every k on held-out forget and retain data and writes

- ``results.json``: ``{"model", "n_neurons", "baseline": {"forget", "retain"}, "runs": [{"method", "k",
  "forget": {"loss", "top1", "top10"}, "retain": {...}, "extra": {...}, "ties_at_cut": {...}}], "skipped":
  [{"method", "k", "reason"}]}`` (CBT / toxicity under ``extra``; ``ties_at_cut`` says how many neurons the
  tie-break decided between, see ``NeuronScores.cut_ties``; ``skipped`` the runs a method could not fill),
- ``plots/*.png`` (metric vs k, one line per method), ``report.md`` / ``report.html`` (what was removed),
- ``masks/<method>_k<k>.safetensors`` (each run's mask), ``config.json`` (the resolved config, no secrets),
- the intermediate artifacts (activation records, explanations, concepts, scores) so a rerun reuses them.

The data is split by document before anything is collected: selection never sees the evaluation windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from . import models as M
from ._io import atomic_write_json, iter_jsonl
from .evaluate.generation import GenerationConfig
from .evaluate.relearn import RelearnConfig
from .config import CollectionConfig, DataConfig, RunConfig, from_flat
from .report import (
    MethodDetail,
    PrunedNeuron,
    format_table,
    neuron_evidence,
    plot_results,
    results_table,
    write_report,
)
from .select import (
    JUDGE_SHORTLISTS,
    METHODS,
    activation_scores,
    explanation_quality,
    hybrid_scores,
    judge_shortlist,
    keyword_scores,
    llm_judge_scores,
    mask_from_scores,
    parse_k,
    parse_mask_mode,
    random_scores,
)

logger = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """One unlearning experiment as one flat config (deprecated: use :class:`snip_lens.config.RunConfig`, composed
    of the stage configs; :meth:`to_run_config` converts, and ``run_sweep`` accepts either)."""

    model: str = "smollm2-135m"
    """Model name or directory for ``load_model`` (ignored when a model object is passed)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Forget / retain data."""
    methods: list[str] = field(default_factory=lambda: ["snip", "hybrid", "activation", "random"])
    """Selection methods to compare, from ``snip_lens.select.METHODS``."""
    ks: list[str] = field(default_factory=lambda: ["0.5%", "1%", "2%", "4%"])
    """Neurons to prune: counts ("500") or percentages of all MLP neurons ("2%")."""
    explainer: Literal["heuristic", "openai", "local"] = "heuristic"
    """Who explains neurons (step 1)."""
    explanations: Literal["input", "output", "both"] = "both"
    """Evidence the explanations rest on: top-activating inputs, VocabProj output tokens, or both (default:
    both, the ensemble Gur-Arieh et al. 2025 found best on input and output evaluations)."""
    quality_weight: Literal["none", "embedding", "simulator"] = "none"
    """Weight SNIP's scores by explanation quality (offline embedding AUROC, or the LLM simulator)."""
    import_explanations: str | None = None
    """Use published explanations from this file instead of explaining (OpenAI/DeepDecipher/Neuronpedia)."""
    min_explanation_score: float | None = None
    """With imported explanations: drop those scoring below this."""
    concepts: Literal["auto", "llm", "distinctive"] = "auto"
    """Forget-set concepts (step 2): an LLM, or the offline distinctive-words fallback; "auto" uses the LLM
    when ``llm_model`` is set."""
    llm_model: str | None = None
    """Chat model for the openai explainer, LLM concepts and the llm-judge baseline."""
    base_url: str | None = None
    """OpenAI-compatible server root (vLLM, Ollama, llama.cpp); None for OpenAI."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written anywhere)."""
    embedder: str = "local"
    """Embedding model: "local" (offline MiniLM), "openai:text-embedding-3-small", or a local directory."""
    match: Literal["evidence", "embedding", "both"] = "evidence"
    """How SNIP matches explanations with concepts (``score.score_neurons``): evidence, embedding (the
    paper's max cosine) or both."""
    keywords: list[str] = field(default_factory=list)
    """Keywords for the keyword baseline."""
    hybrid_weight: float = 0.05
    """Weight of the concept term in the hybrid method (see ``select.hybrid_scores``)."""
    judge_candidates: int | None = None
    """The llm-judge rates this many neurons (a shortlist, see ``judge_shortlist``), one LLM call each; at
    least the largest k (checked before any LLM call). None: exactly the largest k."""
    judge_shortlist: Literal["snip+activation", "snip", "activation", "random"] = "snip+activation"
    """How the judge's shortlist is chosen (``select.judge_shortlist``): by default the tops of the SNIP and
    activation rankings in turn, so that the judge's ranking does not depend on SNIP's alone."""
    select: Literal["global", "per-layer"] = "global"
    """Top-k over all neurons ("global"), or k/L in each of the L layers ("per-layer": masks that an export
    compacts fully, see ``snip export --compact``)."""
    top_k_records: int = CollectionConfig.top_k_records
    """Top activating records kept per neuron for the explainer."""
    random_records: int = CollectionConfig.random_records
    """Records around random tokens kept per neuron (``CollectionConfig.random_records``)."""
    batch_size: int = 8
    """Windows per forward pass."""
    cbt: list[str] = field(default_factory=list)
    """CBT configs to evaluate ("P", "V", "NE", "CN"), from ``cbt_source``."""
    cbt_source: str = "hf"
    """"hf" (online), a JSONL file in the HF schema, or "prose" to build CBT-P/V-style items from prose."""
    cbt_items: int = 200
    """CBT items evaluated per config."""
    toxicity: bool = False
    """Also measure the toxicity rate (paper section 4)."""
    toxicity_n: int = 1000
    """Generations for the toxicity rate."""
    toxicity_scorer: Literal["detoxify", "profanity"] = "detoxify"
    """Toxicity scorer; detoxify offline needs ``detoxify_checkpoint``."""
    detoxify_checkpoint: str | None = None
    """Local detoxify checkpoint path for offline use."""
    detoxify_config: str | None = None
    """Local directory with the config and tokenizer files of the checkpoint's transformer
    (``bert-base-uncased``); with ``detoxify_checkpoint`` the scorer needs no network at all."""
    seed: int = 0
    """Seed for the random baseline."""
    mask_mode: str = "zero"
    """How pruned neurons are masked: "zero", "mean" (their mean activation on the retain selection windows)
    or "scale:F" (activation times F; negative F flips it)."""
    generation: GenerationConfig | None = None
    """Generation-level forgetting (CLI ``--eval generation``); None skips it."""
    relearn: RelearnConfig | None = None
    """Relearning attack after the sweep (CLI ``--relearn STEPS``); None skips it."""

    def __post_init__(self) -> None:
        parse_mask_mode(self.mask_mode)
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if isinstance(self.relearn, dict):
            self.relearn = RelearnConfig(**self.relearn)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError("SweepConfig.methods is empty; give at least one method, e.g. snip")
        if not self.ks:
            raise ValueError("SweepConfig.ks is empty; give at least one k, e.g. 1% or 500")
        if "keyword" in self.methods and not self.keywords:
            raise ValueError("the keyword method needs keywords: set keywords (CLI: --keywords python,code)")
        if "llm-judge" in self.methods and not self.llm_model:
            raise ValueError("the llm-judge method needs an LLM: set llm_model (CLI: --llm-model gpt-4o-mini)")
        if self.explanations not in ("input", "output", "both"):
            raise ValueError(f"SweepConfig.explanations must be 'input', 'output' or 'both', got "
                             f"{self.explanations!r} (CLI: --explanations input|output|both)")
        if self.quality_weight not in ("none", "embedding", "simulator"):
            raise ValueError(f"SweepConfig.quality_weight must be 'none', 'embedding' or 'simulator', got "
                             f"{self.quality_weight!r}")
        if self.quality_weight == "simulator" and not self.llm_model:
            raise ValueError("quality_weight 'simulator' needs llm_model (CLI: --llm-model gpt-4o-mini)")
        if self.explainer == "openai" and not self.llm_model:
            raise ValueError("explainer 'openai' needs llm_model (CLI: --llm-model gpt-4o-mini)")
        if self.concepts == "llm" and not self.llm_model:
            raise ValueError("concepts 'llm' needs llm_model (CLI: --llm-model gpt-4o-mini)")
        if self.judge_candidates is not None and (not isinstance(self.judge_candidates, int)
                                                  or self.judge_candidates < 1):
            raise ValueError(f"SweepConfig.judge_candidates={self.judge_candidates!r} must be a positive number of "
                             "neurons, or None for the largest k (CLI: --judge-candidates 5000)")
        if self.judge_shortlist not in JUDGE_SHORTLISTS:
            raise ValueError(f"unknown judge_shortlist {self.judge_shortlist!r}; choose from {list(JUDGE_SHORTLISTS)}")
        if self.select not in ("global", "per-layer"):
            raise ValueError(f"unknown select {self.select!r}; choose 'global' or 'per-layer' (CLI: --select)")
        bad = [c for c in self.cbt if c not in ("P", "V", "NE", "CN")]
        if bad:
            raise ValueError(f"unknown CBT config(s) {bad}; choose from P, V, NE, CN")

    def to_json(self) -> dict:
        """The resolved config; holds the NAME of the key variable, never a key."""
        return dataclasses.asdict(self)

    def to_run_config(self) -> RunConfig:
        """The same experiment as a :class:`RunConfig` (each field goes to its stage, see ``config.FLAT_NAMES``)."""
        return from_flat({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def as_run_config(config: RunConfig | SweepConfig) -> RunConfig:
    """``config`` as a :class:`RunConfig` (a flat :class:`SweepConfig` is converted)."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, SweepConfig):
        return config.to_run_config()
    raise TypeError(f"run_sweep takes a RunConfig (or a SweepConfig), got {type(config).__name__}")


# ---- data ------------------------------------------------------------------------------------------


def load_side_texts(spec: str, data: DataConfig, max_docs: int | None = None, *, side: str = "forget") -> list[str]:
    """Texts of one corpus spec (at most ``max_docs``, a seeded random draw), including the paper's sources;
    binary input (a binary file named .txt) is refused naming ``side``'s flag."""
    from .checks import check_not_binary

    texts = _side_texts(spec, data, max_docs)
    check_not_binary(texts, spec, f"--{side}")
    return texts


def _side_texts(spec: str, data: DataConfig, max_docs: int | None) -> list[str]:
    from .corpus import load_texts

    if spec.startswith("cbt:"):
        from .evaluate import load_cbt

        _, config, *rest = spec.split(":", 2)
        source = rest[0] if rest else "hf"
        items = load_cbt(source, config=config, split="train")
        if max_docs is not None and max_docs < len(items):
            # "randomly selected CBT training samples": a seeded draw, kept in file order
            items = [items[i] for i in sorted(random.Random(data.seed).sample(range(len(items)), max_docs))]
        return [cbt_item_text(it) for it in items]
    if spec == "civil-toxic" or spec.startswith("civil-toxic:"):
        path = spec.split(":", 1)[1] if ":" in spec else None
        return toxic_comments(path, n=max_docs or 500, seed=data.seed)
    glob = data.glob if data.glob is not None and Path(spec).expanduser().is_dir() else None
    return load_texts(spec, text_field=data.text_field, max_docs=max_docs, seed=data.seed, glob=glob)


def load_sides(data: DataConfig) -> tuple[list[str], list[str]]:
    """(forget texts, retain texts), each side with its own cap (``max_docs``, ``retain_max_docs``)."""
    if data.glob is not None and not any(Path(s).expanduser().is_dir() for s in (data.forget, data.retain)):
        raise ValueError(f"glob {data.glob!r} narrows a directory corpus, but neither forget ({data.forget!r}) nor "
                         f"retain ({data.retain!r}) is a directory; drop --glob or give a directory")
    forget = load_side_texts(data.forget, data, data.max_docs, side="forget")
    retain = load_side_texts(data.retain, data, data.retain_max_docs, side="retain")
    if data.forget == data.retain or forget == retain:
        raise ValueError(f"forget ({data.forget!r}) and retain ({data.retain!r}) data are identical: unlearning "
                         "needs a retain set that differs from what should be forgotten")
    return forget, retain


def cbt_item_text(item: Any) -> str:
    """A CBT item as running text: its context sentences and the question with the answer filled in."""
    return " ".join(list(item.context) + [item.question.replace("XXXXX", item.answer)])


def toxic_comments(path: str | None, *, n: int = 500, threshold: float = 0.8, seed: int = 0) -> list[str]:
    """``n`` random comments with toxicity > ``threshold`` from Civil Comments (the paper's forget set).

    ``path`` None reads the HF dataset ``google/civil_comments`` (online); otherwise a JSONL file of the same
    schema (``text``, ``toxicity``).
    """
    rows: list[dict]
    if path is None:
        try:
            from datasets import load_dataset

            ds = load_dataset("google/civil_comments", split="train")
        except Exception as exc:  # noqa: BLE001 - reported with the offline alternative
            raise FileNotFoundError(
                "could not load the Civil Comments dataset from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}); offline, pass a local JSONL with fields 'text' and 'toxicity' "
                "as civil-toxic:PATH") from exc
        rows = [r for r in ds if r["toxicity"] > threshold]
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Civil Comments file {path!r} does not exist")
        rows = []
        for i, r in iter_jsonl(p):
            for key in ("text", "toxicity"):
                if key not in r:
                    raise ValueError(f"{path}:{i} has no field {key!r}; Civil Comments rows need 'text' and 'toxicity'")
            if float(r["toxicity"]) > threshold:
                rows.append(r)
    if not rows:
        raise ValueError(f"no comment with toxicity > {threshold} in {path or 'google/civil_comments'}")
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [str(r["text"]) for r in rows[:n]]


def split_documents(texts: list[str], fraction: float, seed: int, *,
                    side: str = "corpus") -> tuple[list[str], list[str]]:
    """(selection docs, held-out evaluation docs): a seeded split by document, so no text is in both.

    ``side`` names the corpus in the error raised when it has fewer than 2 documents."""
    if len(texts) < 2:
        raise ValueError(f"the {side} corpus has {len(texts)} document; need at least 2 documents to hold some "
                         "out for evaluation: give more documents (a .jsonl with one per line, a directory of "
                         "files, or a .txt with blank-line-separated paragraphs)")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    held = set(order[:n_eval])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


# ---- the sweep -------------------------------------------------------------------------------------


def judge_candidates(config: SweepConfig, ks: list[int], n_neurons: int) -> int:
    """How many neurons the llm-judge rates: ``config.judge_candidates``, or the largest k when None.

    Raises before any LLM call when the shortlist could not fill the largest k (every judge call would be
    paid for, then the largest k would fail) or is larger than the model. 0 when llm-judge is not run.
    """
    if "llm-judge" not in config.methods:
        return 0
    largest = max(ks) if ks else 0
    n = config.judge_candidates if config.judge_candidates is not None else largest
    if n < largest:
        raise ValueError(f"judge_candidates={n} is smaller than the largest k={largest}: the llm-judge could not "
                         f"prune {largest} neurons from a shortlist of {n}; raise --judge-candidates to at least "
                         f"{largest} (or leave it unset) or lower the largest k")
    if n > n_neurons:
        raise ValueError(f"judge_candidates={n} is more than the model's {n_neurons} neurons; give at most {n_neurons}")
    return max(n, 1)



def _llm_config(cfg: RunConfig) -> Any:
    return cfg.llm.llm_config()


SAVED_ARTIFACTS = ("records", "explanations.jsonl", "concepts.json", "results.json")
"""The artifacts of a run directory that a rerun reuses or protects (see ``config.ARTIFACT_STAGES``)."""


def _conflicts(config: RunConfig, out: Path) -> list[str]:
    """The saved artifacts in ``out`` that a different config produced (what ``overwrite`` would replace).

    Only artifacts that exist count: a config differing from the saved one only in settings of stages never
    computed (an interrupted or failed run) reuses ``out`` as is.
    """
    present = [a for a in SAVED_ARTIFACTS if (out / a).exists()]
    if not present:
        return []
    cfg_path = out / "config.json"
    try:
        old = RunConfig.from_json(json.loads(cfg_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        logger.info("cannot read %s (%s): treating %s as results of another config", cfg_path, exc, present)
        return present
    jsonish = lambda d: json.loads(json.dumps(d, default=str))  # noqa: E731 - tuples vs lists, Paths
    return [a for a in present if jsonish(old.fingerprint(a)) != jsonish(config.fingerprint(a))]


def describe_saved(out_dir: str | Path) -> str:
    """In words, what a (possibly interrupted) run left in ``out_dir`` for the same command to reuse."""
    out = Path(out_dir)
    parts = []
    rec = out / "records"
    if (rec / "records.json").exists() or (rec / "activations.safetensors").exists():
        parts.append("activation records")
    elif rec.is_dir() and any(rec.iterdir()):
        parts.append("a collection checkpoint")
    cache = out / "cache" / "explain"
    if (out / "explanations.jsonl").exists():
        parts.append("explanations")
    elif cache.is_dir():
        n = sum(1 for _ in cache.glob("??/*.json"))
        if n:
            parts.append(f"{n} cached explanations")
    if (out / "concepts.json").exists():
        parts.append("concepts")
    if (out / "results.json").exists():
        parts.append("results")
    return ", ".join(parts) if parts else "nothing yet"


def probe_llm_stages(config: RunConfig) -> None:
    """Check once, in seconds, that the LLM server answers before any stage sends it thousands of requests."""
    from .llm import probe_server

    if config.uses_llm:
        probe_server(config.llm.llm_config(), timeout=config.llm.probe_timeout)
    if config.needs_explanations and config.embed.embedder.startswith("openai:"):
        llm = dataclasses.replace(config.llm, model=config.llm.model or "embedding")
        probe_server(llm.llm_config(), timeout=config.llm.probe_timeout,
                     embedding_model=config.embed.embedder.split(":", 1)[1])


def check_context(model: Any, n_ctx: int, flag: str = "--n-ctx") -> None:
    """Refuse windows longer than the model's context length (which would fail in the allocator)."""
    limit = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(limit, int) and limit > 0 and n_ctx > limit:
        raise ValueError(f"{flag} {n_ctx} is longer than the context of {M.model_name(model)} ({limit} tokens); "
                         f"give at most {flag} {limit}")


def _stop_if_breaker_open(client: Any, explanations: list, config: RunConfig, out: Path) -> None:
    """Raise when the explainer's circuit breaker tripped: the successes are cached, the rerun asks the rest."""
    if client is None or client.breaker is None:
        return
    from .llm import LLMError

    n_ok = sum(e.ok for e in explanations)
    raise LLMError(f"explaining stopped early: {config.llm.breaker_failures} requests in a row failed the same way "
                   f"({client.breaker}); the {n_ok} explanations that succeeded are cached in "
                   f"{out / 'cache' / 'explain'}. Fix the server and rerun the same command: it asks only for the rest")


def run_sweep(config: RunConfig | SweepConfig, out_dir: str | Path, *, model: Any = None,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole experiment of ``config`` into ``out_dir`` and return the results (``results.json``).

    Every argument is checked before anything loads; the LLM server, when a stage needs it, is probed once.
    ``config.json`` is written once the run has started for real (model and data loaded). Artifacts in
    ``out_dir`` from an earlier run are reused when the settings they depend on are the same; artifacts of
    different settings are refused unless ``overwrite`` (settings of stages never computed may change freely).
    """
    from .checks import explanation_stats, warn_if_degenerate
    from .collect import collect
    from .concepts import extract_concepts
    from .corpus import TokenWindows, make_windows
    from .embed import get_embedder
    from .explain import (
        ExplainConfig,
        explain,
        import_explanations,
        load_explanations,
        retry_failed,
        save_explanations,
    )
    from .llm import OpenAIChatClient
    from .results import RunResult, SweepResults
    from .score import NeuronScores, score_neurons
    from .types import DatasetConcepts

    config = as_run_config(config)
    out = Path(out_dir)
    config.check_inputs(out)
    stale = _conflicts(config, out)
    if stale and not overwrite:
        raise FileExistsError(f"{out} holds {', '.join(stale)} of a different configuration (see "
                              f"{out / 'config.json'}); choose another --out or pass --overwrite to replace them")
    probe_llm_stages(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # -- data: read and split by document before the model loads (a bad corpus fails in seconds) ---------
    d = config.data
    forget_texts, retain_texts = load_sides(d)
    f_sel, f_eval = split_documents(forget_texts, d.eval_fraction, d.seed, side=f"forget ({d.forget})")
    r_sel, r_eval = split_documents(retain_texts, d.eval_fraction, d.seed, side=f"retain ({d.retain})")
    timings["load_data"] = time.perf_counter() - t0

    t = time.perf_counter()
    if model is None:
        model = config.model.load()
    n_layers, d_mlp = M.n_layers(model), M.d_mlp(model)
    n_neurons = n_layers * d_mlp
    name = M.model_name(model)
    ks = sorted({parse_k(k, n_neurons) for k in config.select.ks})
    n_judge = judge_candidates(config, ks, n_neurons)  # checked before any LLM call is paid for
    check_context(model, d.n_ctx)
    timings["load_model"] = time.perf_counter() - t

    # -- windows --------------------------------------------------------------------------------------
    win = {
        "forget_sel": make_windows(model, f_sel, n_ctx=d.n_ctx, max_windows=d.select_windows, seed=d.seed,
                                   name="forget", max_doc_tokens=d.max_doc_tokens),
        "retain_sel": make_windows(model, r_sel, n_ctx=d.n_ctx, max_windows=d.select_windows, seed=d.seed,
                                   name="retain", max_doc_tokens=d.max_doc_tokens),
        "forget_eval": make_windows(model, f_eval, n_ctx=d.n_ctx, max_windows=d.eval_windows, seed=d.seed + 1,
                                    name="forget-eval", max_doc_tokens=d.max_doc_tokens),
        "retain_eval": make_windows(model, r_eval, n_ctx=d.n_ctx, max_windows=d.eval_windows, seed=d.seed + 1,
                                    name="retain-eval", max_doc_tokens=d.max_doc_tokens),
    }
    evaluator = _Evaluator(model, win["forget_eval"].tokens, win["retain_eval"].tokens, config, progress)

    # The run starts for real here: replace what another config left (overwrite), then record this config.
    for a in stale:
        p = out / a
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.to_json())

    # -- step 1a: activation records and statistics ------------------------------------------------------
    t = time.perf_counter()
    # The explainer reads each neuron's top windows over forget and retain text together (a broad probe
    # corpus, as the neuron explainer's web text is); statistics are kept per side for the activation method.
    probe = TokenWindows(torch.cat([win["forget_sel"].tokens, win["retain_sel"].tokens]),
                         win["forget_sel"].documents + [len(f_sel) + i for i in win["retain_sel"].documents],
                         "records")
    records = collect(model, {"records": probe, "forget": win["forget_sel"], "retain": win["retain_sel"]},
                      top_k=config.collect.top_k_records, n_random=config.collect.random_records,
                      batch_size=config.model.batch_size,
                      out_dir=out / "records", progress=progress)
    timings["collect"] = time.perf_counter() - t

    explanations: list = []
    concepts: DatasetConcepts | None = None
    scores: dict[str, NeuronScores] = {}
    expl_stats = None
    if config.needs_explanations:
        # -- step 1b: explanations ---------------------------------------------------------------------
        t = time.perf_counter()
        expl_path = out / "explanations.jsonl"
        ex = config.explain
        llm_cfg = _llm_config(config) if ex.explainer == "openai" and not ex.import_explanations else None
        ecfg = ExplainConfig(kind=ex.explainer, explanations=ex.explanations, llm=llm_cfg,
                             local_device=config.model.device, local_dtype=config.model.dtype)
        client = OpenAIChatClient(llm_cfg, seed=ecfg.seed) if llm_cfg is not None else None
        if expl_path.exists():  # written by an earlier run of the same settings (checked above)
            explanations = load_explanations(expl_path)
            if not ex.import_explanations:  # the rerun retries exactly the failures, as explain advises
                explanations, n_retried = retry_failed(explanations, records, ecfg,
                                                       cache_dir=out / "cache" / "explain", progress=progress,
                                                       where=str(expl_path), model=model, client=client)
                _stop_if_breaker_open(client, explanations, config, out)
                if n_retried:
                    save_explanations(expl_path, explanations)
        else:
            if ex.import_explanations:
                explanations = import_explanations(ex.import_explanations, min_score=ex.min_explanation_score,
                                                   n_layers=n_layers, d_mlp=d_mlp)
            else:
                cached = sum(1 for _ in (out / "cache" / "explain").glob("??/*.json"))
                if cached and client is not None:
                    logger.warning("resuming explanations: %d of %d neurons already answered (cached in %s)",
                                   min(cached, n_neurons), n_neurons, out / "cache" / "explain")
                explanations = explain(records, ecfg, cache_dir=out / "cache" / "explain", progress=progress,
                                       model=model, client=client)
                _stop_if_breaker_open(client, explanations, config, out)
            save_explanations(expl_path, explanations)
        expl_stats = explanation_stats(explanations)
        warn_if_degenerate(expl_stats, str(expl_path))
        timings["explain"] = time.perf_counter() - t

        # -- step 2: forget-set concepts ---------------------------------------------------------------
        t = time.perf_counter()
        concepts_path = out / "concepts.json"
        mode = config.concepts.mode
        use_llm = mode == "llm" or (mode == "auto" and config.llm.model)
        if concepts_path.exists():
            concepts = DatasetConcepts.load(concepts_path)
        else:
            concepts = extract_concepts(f_sel, client=_llm_config(config) if use_llm else None,
                                        reference_texts=r_sel, seed=d.seed, cache_dir=out / "cache" / "concepts")
            concepts.save(concepts_path)
        timings["concepts"] = time.perf_counter() - t

        # -- step 3: embed and score -------------------------------------------------------------------
        t = time.perf_counter()
        if config.embed.match != "embedding" and not (concepts.terms and concepts.token_terms):
            # the evidence match's weights, from the same selection documents
            from .concepts import with_evidence_terms

            concepts = with_evidence_terms(concepts, f_sel, r_sel, model)
            concepts.save(concepts_path)
        # The evidence match needs no embeddings (the costliest step), unless quality is scored by embedding.
        from .config import EmbeddingConfig

        needs_embedder = config.embed.match != "evidence" or config.explain.quality_weight == "embedding"
        if not needs_embedder and config.embed.embedder != EmbeddingConfig().embedder:
            logger.warning("--embedder %s is not used: the evidence match embeds nothing (add --match embedding "
                           "or --match both to score with it)", config.embed.embedder)
        embedder = get_embedder(config.embed.embedder, cache_dir=out / "cache" / "embed",
                                base_url=config.llm.base_url, api_key_env=config.llm.api_key_env,
                                progress=progress) if needs_embedder else None
        scores["snip"] = score_neurons(explanations, concepts, embedder, n_layers=n_layers, d_mlp=d_mlp,
                                       match=config.embed.match)
        if config.explain.quality_weight != "none":
            scores["snip"] = _quality_weighted(config, explanations, records, concepts, embedder, scores["snip"],
                                               max(ks), out / "explanations.jsonl", n_layers, d_mlp)
        timings["score"] = time.perf_counter() - t

        quality = explanation_quality(explanations, n_layers, d_mlp)
        snip = scores["snip"]
        # published explanation scores, when there are any, break ties; else score_neurons' own signal
        scores["snip"] = NeuronScores(snip.scores, snip.method, snip.labels, snip.model_name or name,
                                      secondary=quality if quality is not None else snip.secondary,
                                      secondary_name="explanation score" if quality is not None
                                      else snip.secondary_name, tie_seed=d.seed, score_name=snip.score_name)

    sel = config.select
    if any(m in sel.methods for m in ("activation", "hybrid")) or (
            "llm-judge" in sel.methods and "activation" in sel.judge_shortlist):
        scores["activation"] = activation_scores(records, model_name=name, seed=d.seed)
    if "activation-freq" in sel.methods:
        scores["activation-freq"] = activation_scores(records, statistic="freq_pos", model_name=name, seed=d.seed)
    if "hybrid" in sel.methods:
        scores["hybrid"] = hybrid_scores(scores["snip"], scores["activation"], weight=sel.hybrid_weight)
    if "attribution" in sel.methods:
        from .attribution import attribution_scores

        t = time.perf_counter()
        saved = out / "scores" / "attribution.safetensors"  # cleared with the rest when the config changes
        scores["attribution"] = (NeuronScores.load(saved) if saved.exists() else attribution_scores(
            model, win["forget_sel"].tokens, win["retain_sel"].tokens, batch_size=config.batch_size,
            progress=progress))
        timings["attribution"] = time.perf_counter() - t
    if "random" in sel.methods:
        seed = d.seed if sel.random_seed is None else sel.random_seed
        scores["random"] = random_scores(n_layers, d_mlp, seed=seed, model_name=name)
    if "keyword" in sel.methods:
        scores["keyword"] = keyword_scores(explanations, sel.keywords, n_layers=n_layers, d_mlp=d_mlp,
                                           model_name=name, seed=d.seed)
    if "llm-judge" in sel.methods:
        samples = random.Random(d.seed).sample(f_sel, min(5, len(f_sel)))
        shortlist = judge_shortlist(n_judge, explanations, how=sel.judge_shortlist, snip=scores.get("snip"),
                                    activation=scores.get("activation"), seed=d.seed, n_layers=n_layers,
                                    d_mlp=d_mlp)
        scores["llm-judge"] = llm_judge_scores(
            explanations, [s[:400] for s in samples], OpenAIChatClient(_llm_config(config)), n_layers=n_layers,
            d_mlp=d_mlp, model_name=name, candidates=shortlist, cache_dir=out / "cache" / "judge",
            progress=progress, seed=d.seed, shortlist_name=f"{sel.judge_shortlist} shortlist")
    (out / "scores").mkdir(exist_ok=True)
    for method, s in scores.items():
        s.save(out / "scores" / f"{method}.safetensors")

    # -- evaluation ----------------------------------------------------------------------------------------
    t = time.perf_counter()
    if config.generation is not None:
        from .evaluate.generation import GenerationEvaluator

        evaluator.generation = GenerationEvaluator(model, f_eval, r_eval, f_sel, r_sel, config.generation,
                                                   progress=progress)
    results = SweepResults(model=name, n_neurons=n_neurons,
                           baseline=RunResult.from_json(evaluator.run(None), baseline=True),
                           explanations=expl_stats.to_json() if expl_stats is not None else None,
                           more={"select": sel.selection, "tie_break": {m: scores[m].tie_break for m in sel.methods},
                                 "skipped": []})
    if evaluator.generation is not None:
        results.more["generation"] = evaluator.generation.describe()
    if "llm-judge" in sel.methods:
        results.more["judge"] = {"candidates": n_judge, "shortlist": sel.judge_shortlist}
    (out / "masks").mkdir(exist_ok=True)
    details: list[MethodDetail] = []
    expl_by_id = {e.neuron: e for e in explanations}
    mask_mode, factor = parse_mask_mode(sel.mask_mode)
    mask_values = (factor if mask_mode == "scale" else
                   records.stats["retain"].mean.double() if mask_mode == "mean" else None)
    bar = tqdm(total=len(sel.methods) * len(ks), desc="evaluate", unit="run", disable=not progress)
    for method in sel.methods:
        s = scores[method]
        done = 0
        for k in ks:
            bar.set_postfix_str(f"{method} k={k}")
            try:
                mask = mask_from_scores(model, s, k, mode=mask_mode, values=mask_values, select=sel.selection)
            except ValueError as exc:
                # The method ranked fewer neurons than k (keywords matched few explanations, judge answers
                # failed): record why and go on, so the other runs are not lost.
                logger.warning("%s k=%d skipped: %s", method, k, exc)
                results.more["skipped"].append({"method": method, "k": k, "k_percent": 100.0 * k / n_neurons,
                                                "reason": str(exc)})
                bar.update(1)
                continue
            mask.save(out / "masks" / f"{method}_k{k}.safetensors")
            r = evaluator.run(mask)
            # how many neurons the tie-break (secondary signal, then the seeded draw) decided between
            ties = s.cut_ties(k, sel.selection).to_json()
            results.runs.append(RunResult.from_json({"method": method, "k": k, "k_percent": 100.0 * k / n_neurons,
                                                     **r, "ties_at_cut": ties}))
            logger.info("%s k=%d forget top1 %.3f retain top1 %.3f", method, k, r["forget"]["top1"],
                        r["retain"]["top1"])
            done = k
            bar.update(1)
        if not done:
            continue
        top = s.top_k(done, sel.selection)
        hist: dict[int, int] = {}
        for nid in top:
            hist[nid.layer] = hist.get(nid.layer, 0) + 1
        details.append(MethodDetail(method=method, k=done, layer_histogram=hist, neurons=[
            PrunedNeuron(str(nid), float(s.scores[nid.layer, nid.index]),
                         _with_quality(expl_by_id[nid]) if nid in expl_by_id else "",
                         s.labels.get(nid, ""), neuron_evidence(method, nid, scores))
            for nid in top[:200]]))
    bar.close()
    timings["evaluate"] = time.perf_counter() - t
    if config.relearn is not None:
        from .evaluate.relearn import sweep_relearn

        t = time.perf_counter()
        so_far = results.to_json()
        results.more["relearn"] = sweep_relearn(
            model, config.relearn, scores=scores, methods=config.methods, ks=ks, n_neurons=n_neurons,
            forget_sel=f_sel, forget_eval_texts=f_eval, forget_eval=win["forget_eval"].tokens,
            retain_eval=win["retain_eval"].tokens, runs=so_far["runs"], baseline=so_far["baseline"],
            n_ctx=d.n_ctx, data_seed=d.seed, random_seed=d.seed, batch_size=config.batch_size,
            progress=progress)
        timings["relearn"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results.timings_s = {k: round(v, 2) for k, v in timings.items()}
    results.save(out / "results.json")
    res = results.to_json()
    plots = plot_results(res, out / "plots")
    sections = _evaluation_sections(res, out, plots)
    write_report(res, details, out, plots=plots, concepts=concepts.concepts if concepts else None,
                 sections=sections)
    return res


def _evaluation_sections(results: dict, out: Path, plots: list) -> list[tuple[str, str]]:
    """Report sections (and the relearn plot) of the optional evaluations present in ``results``."""
    sections = []
    if "generation" in results:
        from .evaluate.generation import report_section

        sections.append(report_section(results))
    if "relearn" in results:
        from .evaluate.relearn import plot_relearn, report_section as relearn_section

        plot = plot_relearn(results["relearn"], out / "plots", title=f"{results['model']}: relearning attack")
        sections.append(relearn_section(results["relearn"], plot, out))
    return sections


def _with_quality(e: Any) -> str:
    """An explanation as the report shows it: the sentence, then its quality scores when it has any."""
    text = e.explanation or ""
    if e.quality:
        text += " [quality " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(e.quality.items())) + "]"
    return text


def _quality_weighted(config: SweepConfig, explanations: list, records: Any, concepts: Any, embedder: Any,
                      plain: Any, max_k: int, expl_path: Path, n_layers: int, d_mlp: int) -> Any:
    """SNIP scores weighted by explanation quality, scored for every neuron the sweep could prune.

    Quality is computed for the top ``QUALITY_CANDIDATES_FACTOR x max k`` neurons of the unweighted ranking
    (weights only lower scores, and neurons without a quality score get weight 0), attached to the
    explanations and saved with them (the explanations file is rewritten once).
    """
    from .explain import save_explanations
    from .quality import EmbeddingScorer, SimulatorScorer, score_explanations
    from .score import score_neurons

    name = config.quality_weight
    n_cand = min(int(torch.isfinite(plain.scores).sum()), QUALITY_CANDIDATES_FACTOR * max_k)
    candidates = set(plain.top_k(n_cand))
    todo = [e for e in explanations if e.neuron in candidates and name not in e.quality]
    if todo:
        scorer = EmbeddingScorer(embedder) if name == "embedding" else SimulatorScorer(_llm_config(config))
        score_explanations(todo, records, scorer)
        save_explanations(expl_path, explanations)
    return score_neurons(explanations, concepts, embedder, n_layers=n_layers, d_mlp=d_mlp, quality=name,
                         match=config.embed.match)


QUALITY_CANDIDATES_FACTOR = 2
"""With a quality weight, quality is scored for this many times the largest k of SNIP's top neurons."""


class _Evaluator:
    """Forget/retain metrics (plus CBT and toxicity when configured) for one mask, reusing shared work."""

    def __init__(self, model: Any, forget_tokens: torch.Tensor, retain_tokens: torch.Tensor,
                 config: RunConfig | SweepConfig, progress: bool) -> None:
        config = as_run_config(config)
        self.model, self.config, self.progress = model, config, progress
        self.tokens = {"forget": forget_tokens, "retain": retain_tokens}
        self._prefix: dict[tuple[str, int], Any] = {}
        self.generation: Any = None  # a GenerationEvaluator when the config asks for it
        self._scorer: Any = None  # the toxicity classifier, loaded once for every run of the sweep
        self.cbt_items: dict[str, list] = {}
        if config.cbt:
            from .evaluate import build_cloze_items, load_cbt

            for c in config.cbt:
                if config.cbt_source == "prose":
                    if c not in ("P", "V"):
                        raise ValueError(f"CBT items can be built from prose only for P and V, not {c!r}")
                    from .corpus import load_texts

                    self.cbt_items[c] = build_cloze_items(load_texts("prose"), kind=c, n_items=config.cbt_items,
                                                          seed=config.data.seed)
                else:
                    self.cbt_items[c] = load_cbt(config.cbt_source, config=c, split="test",
                                                 max_items=config.cbt_items)

    def _prefix_cache(self, side: str, layer: int) -> Any:
        from .evaluate import prefix_cache

        key = (side, layer)
        if key not in self._prefix:
            self._prefix[key] = prefix_cache(self.model, self.tokens[side], layer,
                                             batch_size=self.config.batch_size)
        return self._prefix[key]

    def run(self, mask: Any) -> dict:
        from .evaluate import lm_metrics

        out: dict[str, Any] = {}
        # Blocks below the mask's lowest pruned layer compute the same residual stream for every mask:
        # run them once per (side, layer) and start each masked run at that layer.
        lowest = min(mask.layers) if mask is not None and len(mask) else 0
        for side, toks in self.tokens.items():
            cache = self._prefix_cache(side, lowest) if lowest > 0 else None
            out[side] = lm_metrics(self.model, toks, batch_size=self.config.batch_size, mask=mask,
                                   start_cache=cache)
        extra: dict[str, Any] = {}
        if self.cbt_items:
            from .evaluate import cbt_accuracy

            for c, items in self.cbt_items.items():
                extra[f"cbt_{c}_accuracy"] = cbt_accuracy(self.model, items, mask=mask)["accuracy"]
        if self.config.toxicity:
            from .evaluate import ToxicityConfig, toxicity_rate

            from .evaluate.toxicity import make_scorer

            tcfg = ToxicityConfig(n=self.config.toxicity_n, scorer=self.config.toxicity_scorer,
                                  detoxify_checkpoint=self.config.detoxify_checkpoint,
                                  detoxify_config=self.config.detoxify_config, seed=self.config.data.seed)
            if self._scorer is None:
                self._scorer = make_scorer(tcfg)
            tox = toxicity_rate(self.model, tcfg, mask=mask, progress=self.progress, scorer=self._scorer)
            extra["pct_toxic"] = tox["pct_toxic"]
            extra["mean_toxicity"] = tox["mean_toxicity"]
        if self.generation is not None:
            from .evaluate.generation import flat_metrics

            out["generation"] = self.generation.run(mask)
            extra.update(flat_metrics(out["generation"]))
        out["extra"] = extra
        return out


def summary_table(results: dict) -> str:
    """The short table the CLI prints at the end of a sweep, and the runs that could not be made."""
    lines = [format_table(results_table(results))]
    for r in results.get("skipped", []):
        lines.append(f"skipped {r['method']} k={r['k']}: {r['reason']}")
    return "\n".join(lines)
